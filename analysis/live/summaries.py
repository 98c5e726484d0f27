"""Small summaries the attribution and embedding-map pages show over a run's stored tables.

Pure functions (no Streamlit): choose and slice an attribution, lay an image input's patch attributions
on its declared grid (:class:`mmoe_core.spec.ImageGrid`, never parsed from labels), the majority expert
of each example, and the embedding map's frame joined with the example fields and predictions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mmoe_core.spec import ImageGrid

__all__ = [
    "attribution_choices",
    "attribution_rows",
    "convergence_delta",
    "patch_grid",
    "input_share_by_label",
    "majority_expert",
    "layer_calls",
    "embedding_frame",
    "ATTRIBUTION_KEYS",
]

# -- attributions

ATTRIBUTION_KEYS = ["method", "target", "layer", "expert"]


def attribution_choices(attributions: pd.DataFrame) -> pd.DataFrame:
    """Distinct (method, target, layer, expert) of an attributions table, with how many examples each."""
    if attributions is None or attributions.empty:
        return pd.DataFrame(columns=[*ATTRIBUTION_KEYS, "examples"])
    keys = [k for k in ATTRIBUTION_KEYS if k in attributions]
    df = attributions[keys + ["example_index"]].copy()
    for k in keys:
        df[k] = df[k].astype(object).where(df[k].notna(), None)
    return df.groupby(keys, dropna=False, sort=True)["example_index"].nunique().reset_index(name="examples")


def _match(df: pd.DataFrame, column: str, value) -> pd.Series:
    if column not in df:
        return pd.Series(True, index=df.index)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return df[column].isna()
    return df[column] == value


def attribution_rows(
    attributions: pd.DataFrame,
    example_index: int | None = None,
    method: str | None = None,
    target: str | None = None,
    layer: str | None = None,
    expert: int | None = None,
) -> pd.DataFrame:
    """Rows of one attribution (example, method, target[, layer, expert]) sorted by input and position.
    A router-logit attribution is picked by layer and expert; the score/answer one by layer=None."""
    df = attributions
    mask = pd.Series(True, index=df.index)
    if example_index is not None:
        mask &= df["example_index"] == int(example_index)
    if method is not None:
        mask &= df["method"] == method
    if target is not None:
        mask &= df["target"] == target
        mask &= _match(df, "layer", layer)
        mask &= _match(df, "expert", None if expert is None else int(expert))
    return df[mask].sort_values(["input", "position"], kind="stable").reset_index(drop=True)


def convergence_delta(rows: pd.DataFrame) -> float | None:
    """The IG convergence delta of one attribution's rows (sum of attributions minus the difference of
    the target between input and baseline); None when the method has none."""
    if rows is None or rows.empty or "delta" not in rows or rows["delta"].isna().all():
        return None
    return float(rows["delta"].dropna().iloc[0])


def input_share_by_label(
    attributions: pd.DataFrame, label: str, method: str = "ig", router_targets: Sequence[str] = ()
) -> pd.DataFrame:
    """Mean share of each input in an example's attribution of the prediction (targets not in
    ``router_targets``), by value of ``label``: one row per value, one column per input, ``n_examples``.
    Each example counts once; an input an example lacks counts as share 0 for it."""
    rows = attributions[(attributions["method"] == method) & ~attributions["target"].isin(list(router_targets))]
    if rows.empty or label not in rows:
        return pd.DataFrame()
    per_example = rows.pivot_table(index="example_index", columns="input", values="share", aggfunc="first")
    per_example = per_example.dropna(how="all").fillna(0.0)
    label_of = rows.groupby("example_index")[label].first().reindex(per_example.index)
    shares = per_example.groupby(label_of).mean()
    shares["n_examples"] = per_example.groupby(label_of).size()
    shares.index.name = label
    shares.columns.name = None
    return shares


def patch_grid(rows: pd.DataFrame, grid: ImageGrid | None, column: str = "value") -> np.ndarray:
    """Attributions of one image input as a [rows, cols] array on its declared ``grid``: the value at
    input position p lies in cell divmod(p - grid.first_position, grid.cols); positions outside the grid
    (a CLS token, say) are left out, cells without a value are NaN. Without a grid: a square grid in
    position order."""
    positions = rows["position"].to_numpy(dtype=int) if "position" in rows else np.arange(len(rows))
    values = rows[column].to_numpy(dtype=float)
    if grid is None:
        side = max(1, int(np.ceil(np.sqrt(len(values)))))
        out = np.full(side * side, np.nan)
        out[: len(values)] = values[np.argsort(positions, kind="stable")]
        return out.reshape(side, side)
    out = np.full((int(grid.rows), int(grid.cols)), np.nan)
    cell = positions - int(grid.first_position)
    inside = (cell >= 0) & (cell < grid.rows * grid.cols)
    r, c = np.divmod(cell[inside], int(grid.cols))
    out[r, c] = values[inside]
    return out


# -- the embedding map


def majority_expert(store, layer: str, call: str | None = None) -> pd.DataFrame:
    """Per example: the expert most often top-1 over the example's positions in ``layer`` (optionally
    one call); ties go to the lower expert id. Columns example_index, expert, share (of positions)."""
    where, params = "layer = ?", [layer]
    if call is not None:
        where += " AND call = ?"
        params.append(call)
    counts = store.sql(
        f"SELECT example_index, top1 AS expert, count(*) AS n FROM routing WHERE {where} GROUP BY example_index, top1",
        params,
    )
    if counts.empty:
        return pd.DataFrame(columns=["example_index", "expert", "share"])
    counts = counts.sort_values(["example_index", "n", "expert"], ascending=[True, False, True], kind="stable")
    total = counts.groupby("example_index")["n"].transform("sum")
    counts["share"] = counts["n"] / total
    top = counts.groupby("example_index", sort=True).head(1)
    return top[["example_index", "expert", "share"]].reset_index(drop=True)


def layer_calls(store, layer: str) -> list[str]:
    """The calls a layer was recorded with in the run's routing table (e.g. one per side of a paired input)."""
    df = store.sql("SELECT DISTINCT call FROM routing WHERE layer = ? ORDER BY call", [layer])
    return [str(c) for c in df["call"] if c is not None]


def embedding_frame(store, layer: str | None = None, call: str | None = None) -> pd.DataFrame:
    """The run's projection joined with the example fields and labels, the prediction (``prediction``,
    ``gold``, ``rank``, ``correct`` as "correct" / "wrong" / "no gold") and, when a layer is given, the
    majority top-1 expert of each example over that layer's positions (all its calls, or ``call``):
    ``expert`` as a string ("expert 2", "none") and ``expert_share``."""
    frame = store.table("projection").merge(store.examples(), on="example_index", how="left")
    if store.has("predictions"):
        pred = store.table("predictions")
        cols = [c for c in ("prediction", "gold", "rank", "correct") if c in pred and c not in frame]
        if cols:
            frame = frame.merge(pred[["example_index", *cols]], on="example_index", how="left")
    if "correct" in frame:
        frame["correct"] = frame["correct"].map({True: "correct", False: "wrong"}).fillna("no gold")
    if layer is not None:
        maj = majority_expert(store, layer, call)
        frame = frame.merge(maj.rename(columns={"share": "expert_share"}), on="example_index", how="left")
        frame["expert"] = frame["expert"].map(lambda e: "none" if pd.isna(e) else f"expert {int(e)}")
    return frame

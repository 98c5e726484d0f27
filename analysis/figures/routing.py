"""The routing of one example: positions as a strip and image patches on their grid, coloured by top-1 expert."""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.figures.base import (
    NOT_ROUTED_LABEL,
    _discrete_scale,
    _layout,
    _legend_swatches,
    empty_figure,
)


def format_ids(ids: object) -> str:
    if ids is None or (isinstance(ids, float) and math.isnan(ids)):
        return ""
    return ", ".join(str(int(i)) for i in list(ids))


def format_weights(weights: object, digits: int = 3) -> str:
    if weights is None or (isinstance(weights, float) and math.isnan(weights)):
        return ""
    return ", ".join(f"{float(w):.{digits}f}" for w in list(weights))


def _num_experts(rows: pd.DataFrame, num_experts: int | None) -> int:
    if num_experts:
        return int(num_experts)
    for col in ("combine", "logits"):
        if col in rows and len(rows):
            return len(rows[col].iloc[0])
    return int(rows["top1"].max()) + 1 if "top1" in rows and len(rows) else 1


def _routed(rows: pd.DataFrame) -> np.ndarray:
    if "routed" in rows:
        return rows["routed"].fillna(False).to_numpy(dtype=bool)
    if "combine" in rows:
        return np.array([float(np.sum(c)) > 0 for c in rows["combine"]], dtype=bool)
    return np.ones(len(rows), dtype=bool)


def _token_label(row) -> str:
    tok = row.get("token") if hasattr(row, "get") else None
    if tok is None or (isinstance(tok, float) and math.isnan(tok)) or str(tok) == "":
        return f"#{int(row['position'])}"
    return str(tok)


def _hover(row, routed: bool, k_label: str) -> str:
    tok = html.escape(_token_label(row))
    lines = [f"<b>{tok}</b> (position {int(row['position'])}, {html.escape(str(row.get('position_kind', '')))})"]
    top1 = row.get("top1")
    if routed:
        lines.append(f"top-1 expert: <b>{int(top1)}</b>")
    else:
        lines.append(
            f"<b>{NOT_ROUTED_LABEL}</b>: combine weights all zero, no expert output "
            f"(router's top-1 would be expert {int(top1)})"
        )
    if "topk_ids" in row and row["topk_ids"] is not None:
        lines.append(f"{k_label} ids: [{format_ids(row['topk_ids'])}]")
    if "topk_weights" in row and row["topk_weights"] is not None:
        lines.append(f"{k_label} weights: [{format_weights(row['topk_weights'])}]")
    if "combine" in row and row["combine"] is not None:
        comb = ", ".join(f"e{i} {float(w):.3f}" for i, w in enumerate(row["combine"]))
        lines.append(f"gate weights (combine): {comb}")
    if "entropy" in row and row["entropy"] is not None and not pd.isna(row["entropy"]):
        lines.append(f"token entropy: {float(row['entropy']):.3f} nats")
    if "top1_prob" in row and row["top1_prob"] is not None and not pd.isna(row["top1_prob"]):
        lines.append(f"top-1 probability: {float(row['top1_prob']):.3f}")
    mods = [str(row.get(c)) for c in ("routed_modality", "gate_modality") if row.get(c) is not None]
    if len(mods) == 2:
        lines.append(f"routed {html.escape(mods[0])}, gate sees {html.escape(mods[1])}")
    return "<br>".join(lines)


def _short(label: str, n: int = 10) -> str:
    label = label.replace("\u0120", "").strip() or label
    return html.escape(label if len(label) <= n else label[: n - 1] + "\u2026")


def _k_label(rows: pd.DataFrame) -> str:
    if "topk_ids" in rows and len(rows):
        return f"top-{len(rows['topk_ids'].iloc[0])}"
    return "top-k"


def token_strip(rows: pd.DataFrame, title: str, num_experts: int | None = None, wrap: int = 12) -> go.Figure:
    """Positions of one layer call as a wrapped strip of cells coloured by top-1 expert (grey: not routed);
    hover gives the combine weights, top-k ids and weights, and token entropy."""
    if rows is None or rows.empty:
        return empty_figure(title, "no routed positions")
    rows = rows.sort_values("position").reset_index(drop=True)
    E = _num_experts(rows, num_experts)
    routed = _routed(rows)
    n = len(rows)
    width = max(1, int(wrap))  # a fixed cell width: a short call fills part of one row
    nrows = math.ceil(n / width)
    z = np.full((nrows, width), np.nan)
    text = [["" for _ in range(width)] for _ in range(nrows)]
    hover = [["" for _ in range(width)] for _ in range(nrows)]
    k_label = _k_label(rows)
    for i, row in rows.iterrows():
        r, c = divmod(i, width)
        z[r, c] = int(row["top1"]) if routed[i] else E
        text[r][c] = _short(_token_label(row)) + ("" if routed[i] else "<br><i>not routed</i>")
        hover[r][c] = _hover(row, bool(routed[i]), k_label)
    fig = _expert_cells(z, text, hover, E, gap=3)
    _legend_swatches(fig, E, not_routed=not routed.all(), used=rows.loc[routed, "top1"].unique())
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    return _layout(fig, title, height=90 + 46 * nrows, legend_below=True, below=45, margin=dict(t=50, b=45, l=10, r=10))


def _expert_cells(z: np.ndarray, text, hover, E: int, gap: int) -> go.Figure:
    """Cells coloured by top-1 expert (value E: not routed), labelled with ``text``, hover ``hover``."""
    return go.Figure(
        go.Heatmap(
            z=z,
            text=text,
            hovertext=hover,
            texttemplate="%{text}",
            hoverinfo="text",
            colorscale=_discrete_scale(E),
            zmin=-0.5,
            zmax=E + 0.5,
            showscale=False,
            xgap=gap,
            ygap=gap,
            textfont=dict(size=12),
        )
    )


def _is_patch(rows: pd.DataFrame) -> pd.Series:
    """Rows that are image patches: those with a recorded grid cell (``grid_row`` >= 0) or of position
    kind ``image_patch``."""
    patch = rows["position_kind"] == "image_patch"
    if "grid_row" in rows:
        patch = patch | (rows["grid_row"].fillna(-1).astype(int) >= 0)
    return patch


def patch_cells(rows: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """The image-patch rows with their grid cell (``grid_row``, ``grid_col``) and the grid's rows and
    columns. Cells are the recorded ones (the model's image grid, as its routing records carry it); when
    the records carry none, the patches lie row-major on a square grid in position order."""
    patches = rows[_is_patch(rows)].sort_values("position").reset_index(drop=True)
    if patches.empty:
        return patches.assign(grid_row=[], grid_col=[]), 0, 0
    if {"grid_row", "grid_col"} <= set(patches) and (patches[["grid_row", "grid_col"]].fillna(-1) >= 0).all().all():
        r = patches["grid_row"].astype(int).tolist()
        c = patches["grid_col"].astype(int).tolist()
        return patches.assign(grid_row=r, grid_col=c), max(r) + 1, max(c) + 1
    side = math.ceil(math.sqrt(len(patches)))
    r = [i // side for i in range(len(patches))]
    c = [i % side for i in range(len(patches))]
    return patches.assign(grid_row=r, grid_col=c), side, side


def patch_grid(rows: pd.DataFrame, title: str, num_experts: int | None = None, height: int = 360) -> go.Figure:
    """Image patches of one layer call on their grid, coloured by top-1 expert (grey: not routed)."""
    patches, n_rows, n_cols = patch_cells(rows)
    if patches.empty:
        return empty_figure(title, "no image patches in this call")
    E = _num_experts(rows, num_experts)
    routed = _routed(patches)
    z = np.full((n_rows, n_cols), np.nan)
    text = [["" for _ in range(n_cols)] for _ in range(n_rows)]
    hover = [["" for _ in range(n_cols)] for _ in range(n_rows)]
    k_label = _k_label(patches)
    for i, row in patches.iterrows():
        r, c = int(row["grid_row"]), int(row["grid_col"])
        z[r, c] = int(row["top1"]) if routed[i] else E
        text[r][c] = f"E{int(row['top1'])}" if routed[i] else "\u2205"
        hover[r][c] = _hover(row, bool(routed[i]), k_label)
    fig = _expert_cells(z, text, hover, E, gap=2)
    _legend_swatches(fig, E, not_routed=not routed.all(), used=patches.loc[routed, "top1"].unique())
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", constrain="domain")
    return _layout(
        fig, title, height=height, legend=dict(orientation="v", x=1.02, y=1), margin=dict(t=50, b=10, l=10, r=10)
    )


def split_call_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(image-patch rows, all other rows) of one layer call."""
    is_patch = _is_patch(rows)
    return rows[is_patch], rows[~is_patch]


def kind_words(kind: str) -> str:
    """A position kind in words, plural, for titles: "text_token" -> "text tokens", "image_patch" ->
    "image patches", "decoder_step" -> "decoder steps"; a one-word kind is an acronym: "cls" -> "CLS
    positions"."""
    parts = str(kind).split("_")
    if len(parts) == 1:
        return f"{parts[0].upper()} positions"
    last = parts[-1]
    last = last + "es" if last.endswith(("s", "x", "ch", "sh")) else last + "s"
    return " ".join([*parts[:-1], last])


def routing_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One display row per position: token, kind, top-1, the k chosen experts and their weights, entropy,
    and whether the position was routed at all."""
    routed = _routed(rows)
    out = pd.DataFrame(
        {
            "position": rows["position"].to_numpy(),
            "token": [_token_label(r) for _, r in rows.iterrows()],
            "kind": rows["position_kind"].to_numpy() if "position_kind" in rows else "",
            "routed": np.where(routed, "routed", NOT_ROUTED_LABEL),
            "top-1 expert": rows["top1"].astype(int).to_numpy(),
            "top-k experts": [format_ids(v) for v in rows["topk_ids"]],
            "top-k weights": [format_weights(v) for v in rows["topk_weights"]] if "topk_weights" in rows else "",
            "gate weights (combine)": [format_weights(v) for v in rows["combine"]] if "combine" in rows else "",
            "entropy (nats)": rows["entropy"].astype(float).round(3).to_numpy() if "entropy" in rows else np.nan,
        }
    )
    return out

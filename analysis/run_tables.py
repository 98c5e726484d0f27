"""A run's per-example tables in the store's layouts: examples, predictions and the declared extra outputs.

Every table keys its rows by ``example_index`` (the example's ``index``: its row in the split).

* ``examples``: example_index, id, every scalar display field, one string column per label.
* ``predictions``: example_index, id, prediction, prediction_id, gold, gold_id, correct, score, and what
  the prediction kind adds (ranking: rank, top_ids / top_names / top_scores as list columns; lm_loss:
  loss, token_losses, next_tokens). Lists of scalars stay list columns; anything nested (a dict) is
  stored as JSON text.
* one table per declared :class:`~mmoe_core.spec.OutputSpec`, named ``output.name``, by kind:

  - ``source_weights``: one row per example and position: example_index, position, token, and one float
    column per :class:`~mmoe_core.spec.SourceSpec` *name* (e.g. image, context). The adapter gives, per
    example, the positions list (``output.positions``) and one list per source (``SourceSpec.column``);
  - ``named_scores``: one row per example and name: example_index, name, score. The adapter gives rows of
    ``{index, name, score}``, or per example ``{index, <output.name>: {name: score}}``; a prediction row
    carrying a ``{name: score}`` dict under the output's name is read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from mmoe_core.spec import ModelSpec, OutputSpec

KEY = "example_index"
SOURCE_WEIGHT_KEYS = (KEY, "position", "token")
NAMED_SCORE_COLUMNS = (KEY, "name", "score")


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.integer, np.floating, np.bool_))


def _key_of(row: Mapping[str, Any]) -> int:
    """The example index of an adapter row (adapters say ``index``; stored rows ``example_index``)."""
    return int(row[KEY] if KEY in row else row["index"])


def examples_frame(examples: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per example: example_index, scalar display fields, labels as string columns."""
    rows = []
    for ex in examples:
        row = {KEY: int(ex["index"])}
        row.update({k: v for k, v in ex.items() if k not in ("index", "labels") and _is_scalar(v)})
        row.update({k: (None if v is None else str(v)) for k, v in (ex.get("labels") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(v: Any) -> Any:
    """A prediction value as a Parquet cell: scalars and lists of scalars as they are, the rest as JSON."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, (list, tuple)) and all(_is_scalar(x) for x in v):
        return list(v)
    if _is_scalar(v):
        return v
    return json.dumps(v, default=str)


def predictions_frame(predictions: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per prediction (see the module docstring), sorted by example_index."""
    rows = [{KEY: _key_of(p), **{k: _cell(v) for k, v in p.items() if k not in ("index", KEY)}} for p in predictions]
    frame = pd.DataFrame(rows)
    return frame.sort_values(KEY, kind="stable").reset_index(drop=True) if len(frame) else frame


def _rows(payload: Any) -> list[dict]:
    if payload is None:
        return []
    if isinstance(payload, pd.DataFrame):
        return payload.to_dict("records")
    return [dict(r) for r in payload]


def source_weights_frame(output: OutputSpec, payload: Any) -> pd.DataFrame:
    """Long table of a ``source_weights`` output: example_index, position, token, <source name>... .

    Per-example rows (a positions list and one weight list per source) are exploded; rows that already
    carry one position each (``position`` plus a float per source name) are kept."""
    names = [s.name for s in output.sources]
    out = []
    for row in _rows(payload):
        key = _key_of(row)
        if "position" in row:  # already one row per position
            out.append(
                {
                    KEY: key,
                    "position": int(row["position"]),
                    "token": str(row.get("token", "")),
                    **{s.name: float(row[s.name] if s.name in row else row[s.column]) for s in output.sources},
                }
            )
            continue
        tokens = list(row.get(output.positions) or [])
        weights = {s.name: np.asarray(row[s.column], dtype=np.float64) for s in output.sources}
        n = max([len(tokens), *(len(w) for w in weights.values())], default=0)
        for i in range(n):
            out.append(
                {
                    KEY: key,
                    "position": i,
                    "token": str(tokens[i]) if i < len(tokens) else "",
                    **{name: float(w[i]) if i < len(w) else float("nan") for name, w in weights.items()},
                }
            )
    frame = pd.DataFrame(out, columns=[*SOURCE_WEIGHT_KEYS, *names])
    return (
        frame.astype({KEY: "int64", "position": "int32", **{n: "float32" for n in names}})
        .sort_values([KEY, "position"], kind="stable")
        .reset_index(drop=True)
    )


def named_scores_frame(output: OutputSpec, payload: Any) -> pd.DataFrame:
    """Long table of a ``named_scores`` output: example_index, name, score (one row per example and name)."""
    out = []
    for row in _rows(payload):
        key = _key_of(row)
        scores = row.get(output.name)
        if isinstance(scores, str):  # a prediction cell stored as JSON
            scores = json.loads(scores)
        if isinstance(scores, Mapping):
            out += [{KEY: key, "name": str(name), "score": float(v)} for name, v in scores.items()]
        elif "name" in row and "score" in row:
            out.append({KEY: key, "name": str(row["name"]), "score": float(row["score"])})
    frame = pd.DataFrame(out, columns=list(NAMED_SCORE_COLUMNS))
    return (
        frame.astype({KEY: "int64", "score": "float64"})
        .sort_values([KEY, "name"], kind="stable")
        .reset_index(drop=True)
    )


_BY_KIND = {"source_weights": source_weights_frame, "named_scores": named_scores_frame}


def output_frame(output: OutputSpec, extras: Mapping[str, Any], predictions: Iterable[Mapping] = ()) -> pd.DataFrame:
    """The stored table of one declared output, from ``RunOutput.extras[output.name]`` or, when the extras
    lack it, from the prediction rows that carry a value under the output's name."""
    if output.kind not in _BY_KIND:
        raise ValueError(
            f"output {output.name!r}: no table layout for kind {output.kind!r} (known: {', '.join(_BY_KIND)})"
        )
    payload = extras.get(output.name)
    if payload is None:
        payload = [p for p in predictions if output.name in p]
    return _BY_KIND[output.kind](output, payload)


def output_frames(spec: ModelSpec, extras: Mapping[str, Any], predictions: Sequence[Mapping] = ()) -> dict:
    """{output name: its table} for every declared output that has rows."""
    frames = {o.name: output_frame(o, extras, predictions) for o in spec.outputs}
    return {name: frame for name, frame in frames.items() if len(frame)}

"""The routing table: a recorder's layer calls -> one row per routed position per layer call.

Precompute (the stored ``routing`` / ``kb_routing`` tables) and live runs both build it here, so a
page reads the same columns whichever path made them:

    layer, call, example_index, example_id, position, position_kind, token, routed_modality,
    gate_modality, grid_row, grid_col (-1 unless an image patch), top1 (int16), topk_ids (list int16,
    as the gate chose them), topk_weights (combine weight of each chosen expert), combine (list float32
    [E]: the weight really applied), probs (list float32 [E]: the gate's own scores, softmax or
    sigmoid), logits (list float32 [E]), entropy (H of the routing distribution, nats), top1_prob
    (largest share of the routing distribution), routed (some expert got weight).

The routing distribution is the gate's scores normalised over the experts, p = probs / sum(probs)
(see :func:`analysis.routing.routing_distribution`): for a softmax gate it is ``probs`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from analysis.routing import routing_distribution, token_entropy

if TYPE_CHECKING:  # the records are torch tensors: pages that only read stored tables must not import torch
    from mmoe_core.routing_record import LayerCall

ROUTING_COLUMNS = [
    "layer",
    "call",
    "example_index",
    "example_id",
    "position",
    "position_kind",
    "token",
    "routed_modality",
    "gate_modality",
    "grid_row",
    "grid_col",
    "top1",
    "topk_ids",
    "topk_weights",
    "combine",
    "probs",
    "logits",
    "entropy",
    "top1_prob",
    "routed",
]
SORT_KEYS = ["example_index", "layer", "call", "position"]
_META_COLUMNS = (
    "layer",
    "call",
    "example_index",
    "position",
    "position_kind",
    "token",
    "routed_modality",
    "gate_modality",
    "grid_row",
    "grid_col",
)


def routing_frame(
    calls: Iterable[LayerCall] | None,
    subject: str = "example",
    ids: Mapping[int, str] | None = None,
    only_examples: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The routing table (columns: module docstring) of the calls on ``subject`` positions.

    ``calls``: a recorder's ``calls`` (a :class:`RoutingRecorder` itself is accepted too).
    ``subject``: "example" (the run's own examples) or "kb" (knowledge-base items routed on the side).
    ``ids``: example index -> display id for the ``example_id`` column (default: the index as text).
    ``only_examples``: keep only calls made on exactly these example indices (a live run of one
    example skips calls on other batches, e.g. a knowledge base encoded on the side, before any work).
    """
    calls = getattr(calls, "calls", calls) or []
    wanted = None if only_examples is None else [int(i) for i in only_examples]
    parts = []
    for call in calls:
        if call.meta is not None and call.meta.subject != subject:
            continue
        if wanted is not None and call.meta is not None and [int(i) for i in call.meta.example_ids] != wanted:
            continue
        frame = call_frame(call)
        if len(frame):
            parts.append(frame)
    if not parts:
        return empty_routing_frame()
    out = pd.concat(parts, ignore_index=True)
    ids = ids or {}
    out["example_id"] = [ids.get(int(i), str(int(i))) for i in out["example_index"]]
    return out[ROUTING_COLUMNS].sort_values(SORT_KEYS, kind="stable").reset_index(drop=True)


def call_frame(call: LayerCall) -> pd.DataFrame:
    """One layer call's rows (without ``example_id``), via :func:`flatten_call`."""
    from mmoe_core.routing_record import flatten_call

    flat = flatten_call(call)
    if len(flat["position"]) == 0:
        return pd.DataFrame()
    topk = np.asarray(flat["topk_ids"]).astype(np.int64)
    combine = np.asarray(flat["combine"], dtype=np.float32)
    probs = np.asarray(flat["probs"], dtype=np.float32)
    dist = routing_distribution(probs)
    frame = pd.DataFrame({k: flat[k] for k in _META_COLUMNS})
    frame["top1"] = topk[:, 0].astype(np.int16)
    frame["topk_ids"] = list(topk.astype(np.int16))
    frame["topk_weights"] = list(np.take_along_axis(combine, topk, axis=1))
    frame["combine"] = list(combine)
    frame["probs"] = list(probs)
    frame["logits"] = list(np.asarray(flat["logits"], dtype=np.float32))
    frame["entropy"] = token_entropy(dist).astype(np.float32)
    frame["top1_prob"] = dist.max(axis=1).astype(np.float32)
    frame["routed"] = combine.sum(axis=1) > 0
    return frame


def empty_routing_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ROUTING_COLUMNS})


def stack(column: pd.Series) -> np.ndarray:
    """A list column (one array per row) as one [rows, width] array."""
    return np.stack(column.to_numpy()) if len(column) else np.zeros((0, 0))


def layer_arrays(routing: pd.DataFrame, layer: str | None = None) -> dict[str, np.ndarray]:
    """probs [T, E], logits [T, E], topk_ids [T, k] (int64) and combine [T, E] of one layer's rows
    (all rows when ``layer`` is None): the inputs of :func:`analysis.routing.layer_summary`."""
    rows = routing if layer is None else routing[routing["layer"] == layer]
    return {
        "probs": stack(rows["probs"]),
        "logits": stack(rows["logits"]),
        "topk_ids": stack(rows["topk_ids"]).astype(np.int64),
        "combine": stack(rows["combine"]),
    }

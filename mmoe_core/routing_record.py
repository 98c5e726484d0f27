"""Routing records: what every MoE layer call can report about its routing decisions.

Models expose routing the way Hugging Face MoE models expose ``output_router_logits``: opt in by
passing a :class:`RoutingRecorder` down the forward; with ``recorder=None`` (the default) no tensor
is copied and nothing is kept, so the off path costs nothing.

One recorder serves two users:

* training (``keep_graph=True``): the live router logits/probabilities are kept *with* their autograd
  graph so auxiliary losses (balance, z-loss, entropy schedule) can be computed from them;
* analysis (``keep_graph=False``): detached CPU copies plus per-position metadata (example, position,
  position kind, modality of the routed input and of the gate input) are kept for the artifact store.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# Vocabulary of position kinds; families may add their own strings, these are the shared ones.
POSITION_KINDS = ("cls", "text_token", "image_patch", "question_token", "context_token", "joint_token", "decoder_step")


@dataclass(frozen=True)
class PositionMeta:
    """Describes the positions of one routed call whose routed input has shape [B, L, D] (or [N, D]).

    ``example_ids`` names the example of each row b (length B); ``kinds``/``routed_modality``/
    ``gate_modality`` describe each sequence position l (length L; length 1 for 2-D inputs), or each
    (b, l) when given as B nested sequences of length L (rows laid out differently, e.g. an image's
    tokens at a different place in each prompt). ``grid`` optionally gives the (row, col) image patch
    of each position (None where it is not a patch), in the same two shapes.
    ``call`` tells apart several calls of the same layer (e.g. "mention" vs "entity" side).
    ``tokens`` optionally carries the surface string of each (b, l) position for display.
    """

    call: str
    example_ids: Sequence[int]
    kinds: Sequence[str]
    routed_modality: Sequence[str]
    gate_modality: Sequence[str]
    tokens: Sequence[Sequence[str]] | None = None
    valid: Tensor | None = None  # optional bool [B, L]: False for padding positions (not recorded)
    # "example" for the run's own examples; "kb" for knowledge-base items routed on the other side
    # (e.g. MMoE entities), whose ids index the KB, not the examples.
    subject: str = "example"
    grid: Sequence | None = None

    @staticmethod
    def uniform(
        call: str,
        example_ids: Sequence[int],
        length: int,
        kind: str,
        routed: str,
        gate: str,
        first_kind: str | None = None,
        first_routed: str | None = None,
        first_gate: str | None = None,
        tokens=None,
        valid=None,
        subject: str = "example",
    ) -> PositionMeta:
        """Meta for the common layout [first position; length-1 positions of one kind]."""
        kinds = [kind] * length
        routed_m = [routed] * length
        gate_m = [gate] * length
        if first_kind is not None:
            kinds[0] = first_kind
        if first_routed is not None:
            routed_m[0] = first_routed
        if first_gate is not None:
            gate_m[0] = first_gate
        return PositionMeta(call, list(example_ids), kinds, routed_m, gate_m, tokens, valid, subject)


def _per_position(values, i: int, j: int, default=None):
    """values[j] (one per position) or values[i][j] (one per row and position)."""
    if values is None or len(values) == 0:
        return default
    first = values[0]
    nested = isinstance(first, (list, tuple)) and not (len(first) == 2 and all(isinstance(v, int) for v in first))
    if nested:
        row = values[i]
        return row[j] if j < len(row) else default
    return values[j] if j < len(values) else default


@dataclass
class RouterOutput:
    """What a gate decided for a batch of positions; all tensors have leading dims [..., ] = positions.

    ``combine`` is dense over experts: the weight *actually* multiplied into each expert's output.
    For the standard gate it is the renormalised top-k probabilities scattered into E slots; for the
    faithful ``mmoe_reference`` gate it can differ from what ``topk_ids`` says (see moe.py).
    """

    logits: Tensor  # [..., E]
    probs: Tensor  # [..., E] softmax(logits)
    topk_ids: Tensor  # [..., k]
    combine: Tensor  # [..., E]


@dataclass
class LayerCall:
    """One recorded call of one MoE layer."""

    layer: str
    router: RouterOutput
    meta: PositionMeta | None


@dataclass
class RoutingRecorder:
    """Collects :class:`LayerCall` s during a forward. Pass it down; read ``calls`` afterwards."""

    keep_graph: bool = False
    calls: list[LayerCall] = field(default_factory=list)

    def add(self, layer: str, router: RouterOutput, meta: PositionMeta | None) -> None:
        if not self.keep_graph:
            router = RouterOutput(
                *(
                    t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()
                    for t in (router.logits, router.probs, router.topk_ids, router.combine)
                )
            )
        self.calls.append(LayerCall(layer, router, meta))

    def by_layer(self) -> dict[str, list[LayerCall]]:
        out: dict[str, list[LayerCall]] = {}
        for call in self.calls:
            out.setdefault(call.layer, []).append(call)
        return out

    def clear(self) -> None:
        self.calls.clear()


def flatten_call(call: LayerCall) -> dict:
    """Flatten one recorded call to per-position rows (numpy-friendly columns).

    Returns a dict of equal-length lists/arrays: layer, call, example_index, position, position_kind,
    routed_modality, gate_modality, grid_row / grid_col (-1 unless an image patch), token, logits [N,E],
    probs [N,E] (the gate's own scores: softmax or sigmoid), combine [N,E], topk_ids [N,k].
    Padding positions (meta.valid False) are dropped.
    """
    r = call.router
    logits = r.logits
    if logits.dim() == 2:  # [B, E] -> one position per example
        logits, probs, topk, combine = (t.unsqueeze(1) for t in (r.logits, r.probs, r.topk_ids, r.combine))
    else:
        probs, topk, combine = r.probs, r.topk_ids, r.combine
    b, length, e = logits.shape
    meta = call.meta
    if meta is None:
        meta = PositionMeta.uniform("", list(range(b)), length, "position", "unknown", "unknown")
    valid = meta.valid if meta.valid is not None else torch.ones(b, length, dtype=torch.bool)
    valid = valid.reshape(b, length).cpu()
    bi, li = torch.nonzero(valid, as_tuple=True)
    bl, ll = bi.tolist(), li.tolist()
    tokens = meta.tokens
    return {
        "subject": [meta.subject] * len(bl),
        "layer": [call.layer] * len(bl),
        "call": [meta.call] * len(bl),
        "example_index": [int(meta.example_ids[i]) for i in bl],
        "position": ll,
        "position_kind": [_per_position(meta.kinds, i, j, "position") for i, j in zip(bl, ll)],
        "routed_modality": [_per_position(meta.routed_modality, i, j, "unknown") for i, j in zip(bl, ll)],
        "gate_modality": [_per_position(meta.gate_modality, i, j, "unknown") for i, j in zip(bl, ll)],
        "grid_row": [_grid_part(meta.grid, i, j, 0) for i, j in zip(bl, ll)],
        "grid_col": [_grid_part(meta.grid, i, j, 1) for i, j in zip(bl, ll)],
        "token": [(tokens[i][j] if tokens is not None and j < len(tokens[i]) else "") for i, j in zip(bl, ll)],
        "logits": logits[bi, li].float().numpy(),
        "probs": probs[bi, li].float().numpy(),
        "combine": combine[bi, li].float().numpy(),
        "topk_ids": topk[bi, li].numpy(),
    }


def _grid_part(grid, i: int, j: int, part: int) -> int:
    """Row (part 0) or column (part 1) of position (i, j)'s image patch; -1 when it is not a patch."""
    if grid is None:
        return -1
    first = next((g for g in grid if g is not None), None)
    nested = isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple, type(None)))
    cell = (grid[i][j] if j < len(grid[i]) else None) if nested else (grid[j] if j < len(grid) else None)
    return -1 if cell is None else int(cell[part])

"""Switch mixture-of-experts layer with two gate kinds, opt-in routing records and auxiliary losses.

Module and parameter names mirror the published MEL-MMoE ``SwitchMoE`` (``experts.<i>.ff.0.0``,
``experts.<i>.ff.2``, ``gate.w_gate``) so that checkpoints trained with that code map key-for-key.

Gate kinds
----------
``topk_softmax`` (the standard gate): per-position softmax over experts, keep the top-k, renormalise
the kept probabilities so they sum to 1. ``combine[..., e]`` is that weight for chosen experts, else 0.

``mmoe_reference``: a faithful copy of the *behaviour* of the published ``SwitchGate``::

    gate_scores = softmax(w_gate(g), dim=-1)
    capacity = int(capacity_factor * g.size(0))          # size(0) is the BATCH size
    _, top_k_indices = gate_scores.topk(k, dim=-1)
    mask = zeros_like(gate_scores).scatter_(1, top_k_indices, 1)
    combine = gate_scores * mask / (sum over dim 0 of (gate_scores * mask) + eps) * capacity

For 2-D gate inputs [N, E] this is "top-k mask, then normalise each expert column over the batch".
For the 3-D inputs the published model feeds it ([B, L, E]: CLS + tokens), ``scatter_`` along dim 1
writes along the *sequence* axis: with ``idx = top_k_indices`` of shape [B, L, k] it sets
``mask[b, idx[b, l, j], j] = 1`` for every l and every j < k. Consequences, which the dashboard shows:

* only sequence positions 0..E-1 (the CLS and the first E-1 tokens) can ever receive a non-zero weight;
  every later position gets an all-zero combine row: its MoE output is exactly 0 ("never routed");
* only expert columns 0..k-1 can ever be non-zero: with E=4, k=3 expert 3 never receives weight;
* position p gets weight on expert column j iff some position of the same example ranked expert p
  as its j-th choice: the weights do not follow the position's own top-k at all;
* each column is divided by its sum over the batch axis and multiplied by ``int(cf * B)``, so one
  example's output depends on which other examples share its batch (on the entity side: its chunk).

All experts are computed for every position and weighted by ``combine`` (NaNs zeroed), as published.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.routing_record import PositionMeta, RouterOutput, RoutingRecorder

GATE_KINDS = ("topk_softmax", "mmoe_reference")
DISPATCH_KINDS = ("dense", "sparse")


class FeedForward(nn.Module):
    """Expert FFN: Linear -> GELU -> Dropout -> Linear (layout of the published FeedForward)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: float = 4, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


def topk_softmax_gate(logits: Tensor, top_k: int) -> RouterOutput:
    """Standard gate: softmax, top-k, renormalise over the chosen k. Works on any leading shape."""
    probs = F.softmax(logits, dim=-1)
    top_vals, top_ids = probs.topk(top_k, dim=-1)
    weights = top_vals / top_vals.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    combine = torch.zeros_like(probs).scatter(-1, top_ids, weights)
    return RouterOutput(logits, probs, top_ids, combine)


def mmoe_reference_gate(
    logits: Tensor, top_k: int, capacity_factor: float = 1.0, epsilon: float = 1e-6
) -> RouterOutput:
    """Published MEL-MMoE SwitchGate arithmetic, reproduced exactly (see the module docstring)."""
    probs = F.softmax(logits, dim=-1)
    capacity = int(capacity_factor * logits.size(0))
    _, top_ids = probs.topk(top_k, dim=-1)
    mask = torch.zeros_like(probs).scatter_(1, top_ids, 1)  # dim 1, as published (sequence axis on 3-D)
    masked = probs * mask
    denominators = masked.sum(0, keepdim=True) + epsilon  # over the batch axis, as published
    combine = masked / denominators * capacity
    combine = torch.nan_to_num(combine, nan=0.0)
    return RouterOutput(logits, probs, top_ids, combine)


class SwitchGate(nn.Module):
    """Router: a linear map from the gate input to one logit per expert, then a gate kind."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        kind: str = "topk_softmax",
        capacity_factor: float = 1.0,
        epsilon: float = 1e-6,
    ):
        super().__init__()
        if kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {kind!r}; choose one of {GATE_KINDS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts, self.top_k, self.kind = num_experts, top_k, kind
        self.capacity_factor, self.epsilon = capacity_factor, epsilon
        self.w_gate = nn.Linear(dim, num_experts)

    def forward(self, gate_input: Tensor, knocked_out: Iterable[int] = ()) -> RouterOutput:
        logits = self.w_gate(gate_input)
        routed_logits = logits
        knocked = sorted(set(knocked_out))
        if knocked:  # a knocked-out expert can never be chosen: its probability is 0
            blocked = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
            blocked[knocked] = True
            routed_logits = logits.masked_fill(blocked, float("-inf"))
        if self.kind == "topk_softmax":
            out = topk_softmax_gate(routed_logits, self.top_k)
        else:
            out = mmoe_reference_gate(routed_logits, self.top_k, self.capacity_factor, self.epsilon)
        out.logits = logits  # record the router's own opinion, before any knockout
        return out


class SwitchMoE(nn.Module):
    """E expert FFNs behind one router. ``gate_input`` defaults to ``x`` (the InterMoE passes the
    other modality). Records routing only when a recorder is passed.

    ``dispatch="dense"`` runs every expert on every position (the published approach);
    ``"sparse"`` runs each expert only on positions with a non-zero combine weight (same result).

    ``ablated`` (set through :meth:`mmoe_core.adapter.ModelAdapter.ablate_layer`): the gate still runs
    and is recorded, but the layer returns zeros: its MoE output is removed, the rest of the model unchanged.
    """

    def __init__(
        self,
        dim: int,
        output_dim: int,
        num_experts: int = 4,
        top_k: int = 2,
        *,
        gate: str = "topk_softmax",
        capacity_factor: float = 1.0,
        mult: float = 4,
        dropout: float = 0.0,
        dispatch: str = "dense",
        name: str = "moe",
    ):
        super().__init__()
        if dispatch not in DISPATCH_KINDS:
            raise ValueError(f"unknown dispatch {dispatch!r}; choose one of {DISPATCH_KINDS}")
        self.dim, self.output_dim, self.num_experts, self.top_k = dim, output_dim, num_experts, top_k
        self.dispatch, self.name = dispatch, name
        self.experts = nn.ModuleList([FeedForward(dim, output_dim, mult, dropout) for _ in range(num_experts)])
        self.gate = SwitchGate(dim, num_experts, top_k, gate, capacity_factor)
        self.knocked_out: frozenset[int] = frozenset()
        self.ablated = False

    @property
    def gate_kind(self) -> str:
        return self.gate.kind

    def forward(
        self,
        x: Tensor,
        gate_input: Tensor | None = None,
        *,
        recorder: RoutingRecorder | None = None,
        meta: PositionMeta | None = None,
    ) -> Tensor:
        router = self.gate(x if gate_input is None else gate_input, self.knocked_out)
        if recorder is not None:
            recorder.add(self.name, router, meta)
        if self.ablated:
            return x.new_zeros(*x.shape[:-1], self.output_dim)
        if self.dispatch == "dense":
            return self._dense(x, router.combine)
        return self._sparse(x, router.combine)

    def _dense(self, x: Tensor, combine: Tensor) -> Tensor:
        stacked = torch.stack([expert(x) for expert in self.experts], dim=-1)  # [..., D_out, E]
        stacked = torch.nan_to_num(stacked, nan=0.0)
        return (combine.unsqueeze(-2) * stacked).sum(dim=-1)

    def _sparse(self, x: Tensor, combine: Tensor) -> Tensor:
        flat_x = x.reshape(-1, x.shape[-1])
        flat_w = combine.reshape(-1, self.num_experts)
        out = flat_x.new_zeros(flat_x.shape[0], self.output_dim)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(flat_w[:, e], as_tuple=True)[0]
            if rows.numel():
                out.index_add_(0, rows, flat_w[rows, e, None] * expert(flat_x[rows]))
        return out.reshape(*x.shape[:-1], self.output_dim)


# ---------------------------------------------------------------------------------------------
# Auxiliary losses: small pure functions over router outputs (torch, differentiable).
# ---------------------------------------------------------------------------------------------


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def switch_balance_loss(probs: Tensor, topk_ids: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i.

    f_i is the share of the T*k routing slots given to expert i (so sum f = 1 for any k) and P_i the
    mean router probability; the loss is 1 for perfectly balanced routing and E when collapsed.
    """
    probs, ids = _flat(probs), topk_ids.reshape(-1)
    load = torch.bincount(ids, minlength=num_experts).to(probs.dtype) / max(ids.numel(), 1)
    importance = probs.mean(dim=0)
    return num_experts * (load.detach() * importance).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over positions of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(_flat(logits).float(), dim=-1).pow(2).mean()


def token_entropy(probs: Tensor) -> Tensor:
    """Per-position entropy H(p) in nats."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)


def coverage_loss(probs: Tensor) -> Tensor:
    """Coverage phase: log E - H(mean routing distribution) (>= 0; rewards using every expert)."""
    probs = _flat(probs)
    return math.log(probs.shape[-1]) - token_entropy(probs.mean(dim=0))


def specialisation_loss(probs: Tensor) -> Tensor:
    """Specialisation phase: mean per-position entropy normalised by log E (rewards decisive routers)."""
    probs = _flat(probs)
    return token_entropy(probs).mean() / math.log(probs.shape[-1])


class EntropyTwoStage:
    """MAGNET-style entropy-triggered two-stage routing regulariser.

    Phase "coverage" rewards high marginal entropy; it switches (once, for good) to "specialisation",
    which penalises token entropy, when the mean normalised token entropy falls below
    ``trigger_entropy`` or when ``step >= trigger_step``. ``trigger_at`` keeps the step it happened.
    """

    def __init__(self, trigger_entropy: float = 0.6, trigger_step: int | None = None):
        self.trigger_entropy, self.trigger_step = trigger_entropy, trigger_step
        self.trigger_at: int | None = None

    @property
    def phase(self) -> str:
        return "coverage" if self.trigger_at is None else "specialisation"

    def update(self, step: int, mean_token_entropy_norm: float) -> str:
        if self.trigger_at is None and (
            mean_token_entropy_norm < self.trigger_entropy
            or (self.trigger_step is not None and step >= self.trigger_step)
        ):
            self.trigger_at = step
        return self.phase

    def loss(self, probs: Tensor) -> Tensor:
        return coverage_loss(probs) if self.phase == "coverage" else specialisation_loss(probs)


def aux_losses(
    recorder: RoutingRecorder,
    balance: float = 0.0,
    z_loss: float = 0.0,
    two_stage: EntropyTwoStage | None = None,
    two_stage_weight: float = 0.0,
    num_experts: int | None = None,
) -> dict[str, Tensor]:
    """Sum each enabled auxiliary loss over the calls a (keep_graph) recorder collected."""
    parts: dict[str, Tensor] = {}
    for call in recorder.calls:
        r = call.router
        keep = valid_positions(call)
        probs, logits = _flat(r.probs)[keep], _flat(r.logits)[keep]
        topk_ids = _flat(r.topk_ids)[keep]
        e = num_experts or r.probs.shape[-1]
        if balance:
            parts["balance"] = parts.get("balance", 0) + balance * switch_balance_loss(probs, topk_ids, e)
        if z_loss:
            parts["z_loss"] = parts.get("z_loss", 0) + z_loss * router_z_loss(logits)
        if two_stage is not None and two_stage_weight:
            parts["entropy_stage"] = parts.get("entropy_stage", 0) + two_stage_weight * two_stage.loss(probs)
    return parts


def valid_positions(call) -> slice | Tensor:
    """Rows of a call's flattened router tensors that are real positions (padding excluded).

    The losses then balance the positions the dashboard measures: with padding counted, most of a
    short mention's text positions are padding, which route alike, and balancing them leaves the
    real tokens free to crowd onto one expert.
    """
    valid = getattr(call.meta, "valid", None) if call.meta is not None else None
    rows = call.router.probs.reshape(-1, call.router.probs.shape[-1]).shape[0]
    if valid is None or valid.numel() != rows:
        return slice(None)
    return valid.reshape(-1).to(call.router.probs.device)

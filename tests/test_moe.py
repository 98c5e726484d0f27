"""SwitchMoE gates, dispatch, routing records and auxiliary losses on hand-built tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mmoe_core.moe import (
    EntropyTwoStage,
    SwitchMoE,
    aux_losses,
    coverage_loss,
    mmoe_reference_gate,
    router_z_loss,
    specialisation_loss,
    switch_balance_loss,
    topk_softmax_gate,
)
from mmoe_core.routing_record import PositionMeta, RouterOutput, RoutingRecorder
from mmoe_core.training import routing_indicators


def logits_of(probs: list) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (rows sum to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log()


# ---------------------------------------------------------------------------------- gates


def test_topk_softmax_renormalises_over_the_chosen_k():
    out = topk_softmax_gate(logits_of([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]), top_k=2)
    expected = torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0], [0.0, 0.0, 0.3 / 0.7, 0.4 / 0.7]], dtype=torch.float64)
    torch.testing.assert_close(out.combine, expected)
    torch.testing.assert_close(out.combine.sum(-1), torch.ones(2, dtype=torch.float64))
    assert out.topk_ids.tolist() == [[0, 1], [3, 2]]


def test_topk_softmax_works_on_3d_positions_independently():
    logits = torch.randn(3, 5, 4)
    out = topk_softmax_gate(logits, top_k=3)
    flat = topk_softmax_gate(logits.reshape(15, 4), top_k=3)
    torch.testing.assert_close(out.combine.reshape(15, 4), flat.combine)
    assert ((out.combine > 0).sum(-1) == 3).all()


# Hand-worked example of the published SwitchGate on a 3-D input [B=2, L=4, E=3], k=2, cf=1:
#   mask[b, top_k_indices[b, l, j], j] = 1 (scatter_ along dim 1 = the sequence axis),
#   combine = probs * mask / (sum over the batch axis + eps) * int(cf * B).
REF_PROBS = [
    [[0.50, 0.30, 0.20], [0.10, 0.60, 0.30], [0.25, 0.15, 0.60], [0.70, 0.20, 0.10]],  # top-2: [0,1] [1,2] [2,0] [0,1]
    [[0.20, 0.50, 0.30], [0.60, 0.10, 0.30], [0.10, 0.20, 0.70], [0.40, 0.35, 0.25]],  # top-2: [1,2] [0,2] [2,1] [0,1]
]
# example 0: j=0 sets rows {0,1,2} of column 0, j=1 sets rows {1,2,0} of column 1
# example 1: j=0 sets rows {1,0,2} of column 0, j=1 sets rows {2,1} of column 1
# masked:   ex0 [[.5,.3,0],[.1,.6,0],[.25,.15,0],[0,0,0]]   ex1 [[.2,0,0],[.6,.1,0],[.1,.2,0],[0,0,0]]
# batch sums per (l, e): [[.7,.3,0],[.7,.7,0],[.35,.35,0],[0,0,0]]; capacity int(1.0 * 2) = 2
REF_COMBINE = [
    [
        [0.5 / 0.7 * 2, 0.3 / 0.3 * 2, 0.0],
        [0.1 / 0.7 * 2, 0.6 / 0.7 * 2, 0.0],
        [0.25 / 0.35 * 2, 0.15 / 0.35 * 2, 0.0],
        [0.0, 0.0, 0.0],
    ],
    [
        [0.2 / 0.7 * 2, 0.0, 0.0],
        [0.6 / 0.7 * 2, 0.1 / 0.7 * 2, 0.0],
        [0.1 / 0.35 * 2, 0.2 / 0.35 * 2, 0.0],
        [0.0, 0.0, 0.0],
    ],
]


def test_mmoe_reference_gate_pins_the_published_3d_behaviour():
    out = mmoe_reference_gate(logits_of(REF_PROBS), top_k=2, capacity_factor=1.0)
    torch.testing.assert_close(out.combine, torch.tensor(REF_COMBINE, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    # positions >= E (here position 3) never get any weight; expert columns >= k (here 2) are never weighted
    assert (out.combine[:, 3:] == 0).all()
    assert (out.combine[..., 2:] == 0).all()
    # the weights do not follow the position's own top-k: position 2 of example 0 chose experts {2, 0}
    assert out.topk_ids[0, 2].tolist() == [2, 0] and out.combine[0, 2, 1] > 0


def test_mmoe_reference_gate_2d_normalises_each_column_over_the_batch():
    probs = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]
    out = mmoe_reference_gate(logits_of(probs), top_k=1, capacity_factor=2.0)
    # 2-D: the mask is the usual top-1 mask; each expert column sums to capacity int(2.0 * 3) = 6
    assert out.topk_ids.reshape(-1).tolist() == [0, 1, 2]
    torch.testing.assert_close(out.combine, torch.eye(3, dtype=torch.float64) * 6, atol=1e-4, rtol=1e-5)


def test_mmoe_reference_depends_on_the_batch():
    torch.manual_seed(0)
    moe = SwitchMoE(8, 8, num_experts=4, top_k=3, gate="mmoe_reference")
    x = torch.randn(5, 6, 8)
    alone = moe(x[:1])
    batched = moe(x)[:1]
    assert not torch.allclose(alone, batched)


# ---------------------------------------------------------------------------------- dispatch and records


@pytest.mark.parametrize("gate", ["topk_softmax", "mmoe_reference"])
def test_sparse_and_dense_dispatch_give_equal_outputs(gate):
    torch.manual_seed(0)
    dense = SwitchMoE(8, 6, num_experts=4, top_k=2, gate=gate, dispatch="dense")
    sparse = SwitchMoE(8, 6, num_experts=4, top_k=2, gate=gate, dispatch="sparse")
    sparse.load_state_dict(dense.state_dict())
    x, g = torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    torch.testing.assert_close(sparse(x, g), dense(x, g), atol=1e-6, rtol=1e-5)


def test_recording_is_opt_in_and_changes_nothing():
    torch.manual_seed(0)
    moe = SwitchMoE(8, 8, num_experts=4, top_k=2, name="layer")
    x = torch.randn(2, 5, 8)
    plain = moe(x)
    recorder = RoutingRecorder()
    meta = PositionMeta.uniform("call", [7, 9], 5, "text_token", "text", "text", first_kind="cls")
    recorded = moe(x, recorder=recorder, meta=meta)
    assert torch.equal(plain, recorded)
    assert len(recorder.calls) == 1 and recorder.calls[0].layer == "layer"
    assert recorder.calls[0].router.logits.shape == (2, 5, 4)
    assert not recorder.calls[0].router.logits.requires_grad  # analysis copies are detached


def test_knockout_blocks_an_expert():
    torch.manual_seed(0)
    moe = SwitchMoE(8, 8, num_experts=4, top_k=2)
    x = torch.randn(4, 6, 8)
    before = RoutingRecorder()
    moe(x, recorder=before)
    moe.knocked_out = frozenset({int(before.calls[0].router.topk_ids[0, 0, 0])})
    after = RoutingRecorder()
    moe(x, recorder=after)
    blocked = next(iter(moe.knocked_out))
    assert (after.calls[0].router.topk_ids != blocked).all()
    assert (after.calls[0].router.combine[..., blocked] == 0).all()
    torch.testing.assert_close(after.calls[0].router.logits, before.calls[0].router.logits)  # router's own opinion


# ---------------------------------------------------------------------------------- auxiliary losses

E = 4


def balanced_routing(t: int = 8):
    probs = torch.full((t, E), 1 / E)
    ids = torch.arange(t).remainder(E).unsqueeze(1)
    return probs, ids


def collapsed_routing(t: int = 8):
    probs = torch.zeros(t, E)
    probs[:, 0] = 1.0
    return probs, torch.zeros(t, 1, dtype=torch.long)


def test_switch_balance_loss_is_1_balanced_and_e_collapsed():
    assert float(switch_balance_loss(*balanced_routing(), E)) == pytest.approx(1.0)
    assert float(switch_balance_loss(*collapsed_routing(), E)) == pytest.approx(E)


def test_aux_losses_skip_padding_positions():
    # 2 examples x 6 positions: the 4 real ones per example are balanced, the 2 padding ones collapsed
    probs, ids = balanced_routing(12)
    probs, ids = probs.reshape(2, 6, E).clone(), ids.reshape(2, 6, 1).clone()
    valid = torch.tensor([[True] * 4 + [False] * 2] * 2)
    probs[~valid], ids[~valid] = torch.tensor([1.0, 0, 0, 0]), 0
    ids[valid] = torch.arange(8).remainder(E).unsqueeze(1)
    router = RouterOutput(logits=probs.clamp_min(1e-9).log(), probs=probs, topk_ids=ids, combine=probs)
    recorder = RoutingRecorder()
    recorder.add("layer", router, PositionMeta.uniform("call", [0, 1], 6, "text_token", "text", "text", valid=valid))
    assert float(aux_losses(recorder, balance=1.0)["balance"]) == pytest.approx(1.0)
    unmasked = RoutingRecorder()
    unmasked.add("layer", router, PositionMeta.uniform("call", [0, 1], 6, "text_token", "text", "text"))
    assert float(aux_losses(unmasked, balance=1.0)["balance"]) > 1.2


def test_router_z_loss_values():
    assert float(router_z_loss(torch.zeros(5, E))) == pytest.approx(math.log(E) ** 2)
    assert float(router_z_loss(torch.full((5, E), 2.0))) == pytest.approx((2.0 + math.log(E)) ** 2)


def test_coverage_and_specialisation_losses():
    uniform, _ = balanced_routing()
    one_hot, _ = collapsed_routing()
    assert float(coverage_loss(uniform)) == pytest.approx(0.0, abs=1e-6)
    assert float(coverage_loss(one_hot)) == pytest.approx(math.log(E), abs=1e-5)
    assert float(specialisation_loss(uniform)) == pytest.approx(1.0, abs=1e-6)
    assert float(specialisation_loss(one_hot)) == pytest.approx(0.0, abs=1e-6)


def test_entropy_two_stage_triggers_once_on_entropy_or_step():
    by_entropy = EntropyTwoStage(trigger_entropy=0.5)
    assert by_entropy.update(0, 0.9) == "coverage"
    assert by_entropy.update(1, 0.4) == "specialisation" and by_entropy.trigger_at == 1
    assert by_entropy.update(2, 0.95) == "specialisation" and by_entropy.trigger_at == 1
    by_step = EntropyTwoStage(trigger_entropy=0.0, trigger_step=5)
    assert by_step.update(4, 0.9) == "coverage"
    assert by_step.update(5, 0.9) == "specialisation" and by_step.trigger_at == 5
    uniform, _ = balanced_routing()
    assert float(by_step.loss(uniform)) == pytest.approx(1.0, abs=1e-6)  # specialisation penalises entropy


def test_routing_indicators_on_balanced_and_collapsed_routing():
    probs, ids = balanced_routing()
    combine = torch.zeros_like(probs).scatter(1, ids, 1.0)
    healthy = routing_indicators(probs, ids, combine, E)
    assert healthy["effective_experts"] == pytest.approx(E)
    assert healthy["max_load"] == pytest.approx(1.0)
    assert healthy["balance_loss"] == pytest.approx(1.0)
    assert healthy["token_entropy_norm"] == pytest.approx(1.0)
    probs, ids = collapsed_routing()
    combine = torch.zeros_like(probs).scatter(1, ids, 1.0)
    collapsed = routing_indicators(probs, ids, combine, E)
    assert collapsed["effective_experts"] == pytest.approx(1.0)
    assert collapsed["max_load"] == pytest.approx(E)
    assert collapsed["balance_loss"] == pytest.approx(E)
    assert collapsed["max_weight_share"] == pytest.approx(E)
    assert collapsed["token_entropy"] == pytest.approx(0.0, abs=1e-6)

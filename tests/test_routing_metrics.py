"""Routing indicators and verdicts on constructed routings with hand-computed answers."""

import dataclasses
import json
import math

import numpy as np
import pytest

from analysis import routing as r

E = 4


def summary_of(logits, ids, combine=None):
    """layer_summary of a softmax gate built from ``logits`` (probs recorded as softmax(logits))."""
    return r.layer_summary(r.softmax(logits), ids, combine, logits=logits)


def standard_gate(logits, k):
    """Per-position softmax, top-k, renormalised over the k chosen (the standard gate)."""
    probs = r.softmax(logits)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(probs))[:, None]
    combine = np.zeros_like(probs)
    combine[rows, ids] = probs[rows, ids]
    return ids, combine / combine.sum(axis=1, keepdims=True)


def round_robin(T, k, experts=E):
    """Perfectly balanced top-k: position t picks experts t, t+1, ..., t+k-1 (mod E)."""
    ids = (np.arange(T)[:, None] + np.arange(k)) % experts
    combine = np.zeros((T, experts))
    combine[np.arange(T)[:, None], ids] = 1.0 / k
    return ids, combine


def dominant_logits(T, expert=2, margin=5.0):
    logits = np.zeros((T, E))
    logits[:, expert] = margin
    return logits


# --------------------------------------------------------------------------- basics


def test_softmax_hand_value():
    np.testing.assert_allclose(r.softmax(np.array([[0.0, math.log(3.0)]])), [[0.25, 0.75]])


def test_load_fraction_counts_slots_and_rejects_bad_ids():
    ids = np.array([[0, 1], [0, 2], [0, 1]])
    np.testing.assert_allclose(r.load_fraction(ids, 4), [3 / 6, 2 / 6, 1 / 6, 0.0])
    np.testing.assert_allclose(r.load_fraction(np.array([3, 3, 1]), 4), [0, 1 / 3, 0, 2 / 3])
    with pytest.raises(ValueError):
        r.load_fraction(np.array([[0, -1]]), 4)
    with pytest.raises(ValueError):
        r.load_fraction(np.array([[0, 4]]), 4)


def test_importance_is_mean_probability():
    probs = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    np.testing.assert_allclose(r.importance(probs), [0.3, 0.35, 0.35])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_is_one_when_balanced_for_any_k(k):
    ids, _ = round_robin(8, k)
    f = r.load_fraction(ids, E)
    assert r.switch_balance_loss(f, np.full(E, 0.25)) == pytest.approx(1.0)


def test_balance_loss_is_E_when_collapsed():
    one_hot = np.array([0.0, 0.0, 1.0, 0.0])
    assert r.switch_balance_loss(one_hot, one_hot) == pytest.approx(4.0)


def test_z_loss_hand_value():
    # logsumexp rows: log 2 and log(3 + 1) = 2 log 2 -> mean of squares 2.5 (log 2)^2
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert r.router_z_loss(logits) == pytest.approx(2.5 * math.log(2.0) ** 2)


def test_token_entropy_hand_values():
    probs = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(r.token_entropy(probs), [math.log(2.0), 0.0], atol=1e-12)
    assert r.mean_token_entropy(probs) == pytest.approx(math.log(2.0) / 2)
    # (log 2 / 2) / log 4 = 1/4
    assert r.mean_token_entropy(probs, normalised=True) == pytest.approx(0.25)


def test_marginal_entropy_and_effective_experts():
    P = np.array([0.5, 0.5, 0.0, 0.0])
    assert r.marginal_entropy(P) == pytest.approx(math.log(2.0))
    assert r.effective_experts(P) == pytest.approx(2.0)
    assert r.effective_experts_ratio(P) == pytest.approx(0.5)
    assert r.effective_experts_ratio(np.full(4, 0.25)) == pytest.approx(1.0)
    assert r.effective_experts_ratio(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)


def test_load_shape_indicators():
    f = np.array([0.5, 0.5, 0.0, 0.0])
    assert r.load_cv(f) == pytest.approx(1.0)  # std 0.25 / mean 0.25
    assert r.max_load_ratio(f) == pytest.approx(2.0)
    assert r.gini(f) == pytest.approx(0.5)
    assert r.gini(np.full(4, 0.25)) == pytest.approx(0.0)
    assert r.gini(np.array([0.0, 0.0, 1.0, 0.0])) == pytest.approx(0.75)  # (E-1)/E


def test_dead_and_nearly_dead():
    f = np.array([0.6, 0.38, 0.02, 0.0])  # 0.02 < 0.1 / 4
    assert r.dead_experts(f) == [3]
    assert r.nearly_dead_experts(f) == [2]
    assert r.nearly_dead_experts(np.array([0.6, 0.37, 0.03, 0.0])) == []


def test_router_confidence_hand_values():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    top1_prob, gap = r.router_confidence(probs)
    assert top1_prob == pytest.approx(0.55)
    assert gap == pytest.approx(0.25)


def test_co_selection_three_positions():
    ids = np.array([[0, 1], [1, 2], [0, 1]])
    expected = np.array([[2, 2, 0], [2, 3, 1], [0, 1, 1]])
    np.testing.assert_array_equal(r.co_selection(ids, 3), expected)


def test_cross_layer_pairs_use_top1():
    a = np.array([[0, 1], [1, 2], [0, 2]])
    b = np.array([[2, 0], [2, 1], [1, 0]])
    expected = np.zeros((3, 3), dtype=int)
    expected[0, 2] = expected[1, 2] = expected[0, 1] = 1
    np.testing.assert_array_equal(r.cross_layer_pairs(a, b, 3, 3), expected)
    with pytest.raises(ValueError):
        r.cross_layer_pairs(a, b[:2], 3, 3)


# --------------------------------------------------------------------------- specialisation


def test_perfect_specialisation_beats_shuffled_baseline():
    chosen = np.array([0] * 50 + [1] * 50)
    labels = np.array(["text"] * 50 + ["image"] * 50)
    spec = r.specialisation(chosen, labels)
    assert spec["mi"] == pytest.approx(math.log(2.0))
    assert spec["nmi"] == pytest.approx(1.0)
    base = r.specialisation_vs_shuffled(chosen, labels, n_shuffles=20, seed=0)
    assert base["mi"] == pytest.approx(math.log(2.0))
    assert base["shuffled_max"] < 0.1 * base["mi"]
    assert base == r.specialisation_vs_shuffled(chosen, labels, n_shuffles=20, seed=0)


def test_random_routing_matches_shuffled_baseline():
    rng = np.random.default_rng(1)
    chosen = rng.integers(0, 4, size=2000)
    labels = rng.choice(["text", "image"], size=2000)
    base = r.specialisation_vs_shuffled(chosen, labels)
    # Finite-sample MI bias is about (4-1)(2-1)/(2*2000) = 0.00075 nats.
    assert base["mi"] < 0.005
    assert abs(base["mi"] - base["shuffled_mean"]) < 0.003
    assert r.specialisation(chosen, labels)["nmi"] < 0.01


# --------------------------------------------------------------------------- weighted reality


def batch_normalised_gate(probs, eps=1e-6):
    """Like the published SwitchGate: top-1 mask, then normalise over the *batch* axis (0)."""
    top = probs.argmax(axis=-1)
    masked = probs * (np.arange(probs.shape[-1]) == top[..., None])
    return masked / (masked.sum(axis=0, keepdims=True) + eps)


def test_batch_dependence_hand_case():
    probs = np.array([[[0.8, 0.2]], [[0.6, 0.4]]])  # batch 2, one position, 2 experts
    alone = batch_normalised_gate(probs[:1])[0]  # 0.8 / 0.8 = 1
    in_batch = batch_normalised_gate(probs)[0]  # 0.8 / 1.4
    dep = r.batch_dependence(alone, in_batch)
    assert dep["max_abs_change"] == pytest.approx(1 - 0.8 / 1.4, abs=1e-5)
    assert dep["mean_abs_change"] == pytest.approx((1 - 0.8 / 1.4) / 2, abs=1e-5)


def test_batch_dependence_batch_of_eight_vs_per_position_gate():
    rng = np.random.default_rng(0)
    probs = r.softmax(rng.normal(size=(8, 6, E)))  # batch 8, 6 positions
    dep = r.batch_dependence(batch_normalised_gate(probs[:1])[0], batch_normalised_gate(probs)[0])
    assert dep["mean_abs_change"] > 0.05
    assert dep["max_abs_change"] > 0.5
    # The standard gate is per position: the same example alone or in a batch is unchanged.
    alone = standard_gate(np.log(probs[0]), 2)[1]
    in_batch = standard_gate(np.log(probs.reshape(-1, E)), 2)[1][:6]
    assert r.batch_dependence(alone, in_batch) == {"mean_abs_change": 0.0, "max_abs_change": 0.0}
    with pytest.raises(ValueError):
        r.batch_dependence(alone, in_batch[:5])


def test_unrouted_weight_share_never_weighted_outside_topk():
    combine = np.array([[0.5, 0.5, 0, 0], [0, 0, 0, 0], [1.0, 0, 0, 0]])
    np.testing.assert_array_equal(r.unrouted_positions(combine), [False, True, False])
    np.testing.assert_allclose(r.weight_share(combine), [0.75, 0.25, 0, 0])
    assert r.experts_never_weighted(combine) == [2, 3]
    ids = np.array([[0, 1], [2, 3], [1, 2]])  # position 2 weights expert 0, not in its top-2
    np.testing.assert_array_equal(r.weighted_outside_topk(combine, ids), [False, False, True])
    np.testing.assert_array_equal(r.unrouted_positions(combine * 1e-9, tol=1e-6), [True] * 3)


# --------------------------------------------------------------------------- summaries

SUMMARY_KEYS = {
    "num_positions",
    "num_experts",
    "top_k",
    "load",
    "importance",
    "switch_balance_loss",
    "z_loss",
    "token_entropy",
    "token_entropy_norm",
    "marginal_entropy",
    "effective_experts",
    "effective_experts_ratio",
    "load_cv",
    "max_load_ratio",
    "dead_experts",
    "nearly_dead_experts",
    "gini",
    "top1_prob",
    "top1_gap",
    "unrouted_fraction",
    "experts_never_weighted",
    "weight_share",
    "weighted_outside_topk_fraction",
}


def test_layer_summary_uniform_routing():
    ids, combine = round_robin(40, 2)
    s = summary_of(np.zeros((40, E)), ids, combine)
    assert set(s) == SUMMARY_KEYS
    json.dumps(s)  # plain Python values only
    assert (s["num_positions"], s["num_experts"], s["top_k"]) == (40, 4, 2)
    assert s["load"] == [0.25] * 4
    assert s["switch_balance_loss"] == pytest.approx(1.0)
    assert s["effective_experts_ratio"] == pytest.approx(1.0)
    assert s["gini"] == pytest.approx(0.0)
    assert s["load_cv"] == pytest.approx(0.0)
    assert s["token_entropy_norm"] == pytest.approx(1.0)
    assert s["z_loss"] == pytest.approx(math.log(4.0) ** 2)
    assert s["top1_prob"] == pytest.approx(0.25) and s["top1_gap"] == pytest.approx(0.0)
    assert s["dead_experts"] == [] and s["nearly_dead_experts"] == []
    assert s["unrouted_fraction"] == 0.0 and s["experts_never_weighted"] == []
    assert s["weight_share"] == pytest.approx([0.25] * 4)
    assert s["weighted_outside_topk_fraction"] == 0.0


def test_layer_summary_without_combine_leaves_weighted_fields_unknown():
    ids, _ = round_robin(8, 1)
    s = summary_of(np.zeros((8, E)), ids)
    assert s["unrouted_fraction"] is None and s["weight_share"] is None
    assert s["experts_never_weighted"] is None and s["weighted_outside_topk_fraction"] is None
    assert r.verdict(s)[0] == "healthy"


def test_layer_summary_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        summary_of(np.zeros((0, E)), np.zeros((0, 1), dtype=int))
    with pytest.raises(ValueError):
        summary_of(np.zeros((4, E)), np.zeros((3, 1), dtype=int))
    with pytest.raises(ValueError):
        summary_of(np.zeros((4, E)), np.zeros((4, 1), dtype=int), np.zeros((4, 3)))


def test_summaries_by_slice_separate_modalities():
    logits = np.zeros((6, E))
    logits[:3, 0] = logits[3:, 1] = 4.0
    ids, combine = standard_gate(logits, 1)
    labels = np.array(["text"] * 3 + ["image"] * 3)
    by_slice = r.summaries_by_slice(r.softmax(logits), ids, combine, labels)
    assert list(by_slice) == ["image", "text"]
    assert by_slice["text"]["load"] == [1.0, 0.0, 0.0, 0.0]
    assert by_slice["image"]["load"] == [0.0, 1.0, 0.0, 0.0]
    assert by_slice["image"]["num_positions"] == 3
    assert r.summaries_by_slice(r.softmax(logits), ids, None, labels)["text"]["weight_share"] is None


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("k, ratio_max", [(1, "4"), (2, "2"), (3, "1.33")])
def test_uniform_routing_is_healthy(k, ratio_max):
    ids, combine = round_robin(40, k)
    label, reason = r.verdict(summary_of(np.zeros((40, E)), ids, combine))
    assert label == "healthy"
    assert reason == (
        f"healthy: effective experts 4.00 of 4, load CV 0.00, max-load ratio 1.00 of {ratio_max}, no dead experts"
    )


def test_one_expert_takes_all_is_collapsed_and_named():
    logits = dominant_logits(100)
    ids, combine = standard_gate(logits, 1)
    s = summary_of(logits, ids, combine)
    p = math.exp(5) / (math.exp(5) + 3)  # hand-computed probability of expert 2
    q = (1 - p) / 3
    eff = math.exp(-(p * math.log(p) + 3 * q * math.log(q)))
    assert s["effective_experts"] == pytest.approx(eff)
    label, reason = r.verdict(s)
    assert label == "collapsed"
    assert reason == (
        "collapsed: expert 2 takes 100% of routing slots (max-load ratio 4.00 of 4) and 100% "
        f"of the combine weight; effective experts {eff:.2f} of 4 (router mass on about one "
        "expert); 3 dead experts (0, 1, 3); load CV 1.73 > 0.50"
    )


def test_nearly_all_on_one_expert_names_the_nearly_dead_one():
    logits = dominant_logits(100)
    logits[0, 0] = 10.0  # one position in 100 goes to expert 0
    ids, combine = standard_gate(logits, 1)
    label, reason = r.verdict(summary_of(logits, ids, combine))
    assert label == "collapsed"
    assert reason.startswith("collapsed: expert 2 takes 99% of routing slots (max-load ratio 3.96 of 4)")
    assert "3 of 4 experts do no work (0, 1, 3); 2 dead experts (1, 3); " in reason
    assert "1 nearly dead expert (0: 1.0% of slots)" in reason


def test_one_dead_expert_is_a_warning_naming_it():
    logits = np.tile([0.0, 0.0, 0.0, -1.0], (30, 1))
    ids = (np.arange(30) % 3)[:, None]  # experts 0, 1, 2 in turn; 3 never
    combine = np.zeros((30, E))
    combine[np.arange(30), ids[:, 0]] = 1.0
    label, reason = r.verdict(summary_of(logits, ids, combine))
    assert label == "warning"
    assert reason == "warning: load CV 0.58 > 0.50; 1 dead expert (3)"


def test_two_expert_collapse_of_four_is_collapsed():
    """Decision: half the experts unused is a collapse (THRESHOLDS.unused_experts_collapse)."""
    logits = np.tile([2.0, 2.0, -2.0, -2.0], (40, 1))
    ids = (np.arange(40) % 2)[:, None]
    combine = np.zeros((40, E))
    combine[np.arange(40), ids[:, 0]] = 1.0
    label, reason = r.verdict(summary_of(logits, ids, combine))
    assert label == "collapsed"
    assert "2 dead experts (2, 3)" in reason
    # Top-2 over the same two experts: every position picks {0, 1}.
    ids2, combine2 = standard_gate(logits, 2)
    label2, reason2 = r.verdict(summary_of(logits, ids2, combine2))
    assert label2 == "collapsed"
    assert "2 dead experts (2, 3)" in reason2
    assert "every position picks the same 2 experts (0, 1): the top-k choice ignores the input" in reason2


def test_top3_of_four_with_fourth_dead_is_a_warning():
    logits = np.tile([1.0, 1.0, 1.0, -2.0], (30, 1))
    logits[:, :3] += np.random.default_rng(0).normal(0, 0.1, size=(30, 3))
    ids, combine = standard_gate(logits, 3)
    label, reason = r.verdict(summary_of(logits, ids, combine))
    assert label == "warning"
    assert reason == (
        "warning: expert 0 takes 33% of routing slots, chosen by 100% of positions "
        "(max-load ratio 1.33 > 1.17; at most 1.33); load CV 0.58 > 0.29; 1 dead expert (3); "
        "every position picks the same 3 experts (0, 1, 2): the top-k choice ignores the input"
    )


@pytest.mark.parametrize("k", [2, 3])
def test_topk_router_on_one_expert_collapses_by_weight(k):
    """With k >= 2 no expert can hold more than 1/k of the slots; the weights still collapse."""
    rng = np.random.default_rng(k)
    logits = dominant_logits(200) + rng.normal(0, 0.1, size=(200, E))
    ids, combine = standard_gate(logits, k)
    s = summary_of(logits, ids, combine)
    assert max(s["load"]) == pytest.approx(1 / k)
    label, reason = r.verdict(s)
    assert label == "collapsed"
    # Renormalised over the k chosen: e^5 / (e^5 + k - 1) ~ 0.993 (k=2), 0.987 (k=3).
    assert s["weight_share"][2] == pytest.approx(math.exp(5) / (math.exp(5) + k - 1), abs=3e-3)
    assert reason.startswith("collapsed: expert 2 carries 99% of the combine weight; effective experts 1.1")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_router_is_healthy(k):
    logits = np.random.default_rng(0).normal(size=(400, E))
    ids, combine = standard_gate(logits, k)
    assert r.verdict(summary_of(logits, ids, combine))[0] == "healthy"


def published_switch_gate_combine(logits, k):
    """The MMoE SwitchGate's mask bug for one sequence: scatter_ along dim 1 of [B, S, E]
    writes mask[position = expert id, expert = slot j]; weights are probs * mask."""
    probs = r.softmax(logits)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(probs)
    for j in range(k):
        mask[ids[:, j], j] = 1.0
    return ids, probs * mask


def test_published_gate_flags_unrouted_and_never_weighted_expert():
    logits = np.tile([0.0, 0.1, 0.2, 0.3], (12, 1))  # top-3 = (3, 2, 1) everywhere
    ids, combine = published_switch_gate_combine(logits, 3)
    s = summary_of(logits, ids, combine)
    assert s["experts_never_weighted"] == [3]
    # Only positions 1, 2, 3 (the expert ids) get a mask entry, in expert columns 0, 1, 2.
    assert s["unrouted_fraction"] == pytest.approx(9 / 12)
    assert s["weighted_outside_topk_fraction"] == pytest.approx(1 / 12)  # position 3 -> expert 0
    label, reason = r.verdict(s)
    assert label == "collapsed"
    assert "75% of positions (9 of 12) get no expert weight (unrouted)" in reason
    assert "expert 3 never gets combine weight although top-k picks it for 100% of positions" in reason
    assert "8.3% of positions put combine weight on experts outside their top-k" in reason


def test_few_unrouted_positions_are_a_warning():
    ids, combine = round_robin(40, 1)
    combine[7] = 0.0
    label, reason = r.verdict(summary_of(np.zeros((40, E)), ids, combine))
    assert label == "warning"
    assert reason == "warning: 2.5% of positions (1 of 40) get no expert weight (unrouted)"


def test_weight_outside_topk_is_a_warning():
    ids, combine = round_robin(40, 1)
    combine[5] = [0.5, 0.5, 0.0, 0.0]  # position 5 chose expert 1 only
    label, reason = r.verdict(summary_of(np.zeros((40, E)), ids, combine))
    assert label == "warning"
    assert reason == "warning: 2.5% of positions put combine weight on experts outside their top-k"


def test_too_few_positions_adds_a_note_without_changing_the_verdict():
    ids, combine = round_robin(8, 1)
    label, reason = r.verdict(summary_of(np.zeros((8, E)), ids, combine))
    assert label == "healthy"
    assert reason.endswith("; only 8 routing slots for 4 experts: too few to judge reliably")


def test_thresholds_are_frozen_and_replaceable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.THRESHOLDS.load_cv_warning = 1.0
    logits = np.tile([0.0, 0.0, 0.0, -1.0], (30, 1))
    ids = (np.arange(30) % 3)[:, None]
    s = summary_of(logits, ids)
    lenient = dataclasses.replace(r.THRESHOLDS, load_cv_warning=0.6)
    assert r.verdict(s, lenient) == ("warning", "warning: 1 dead expert (3)")
    strict = dataclasses.replace(r.THRESHOLDS, unused_experts_collapse=0.25)
    assert r.verdict(s, strict)[0] == "collapsed"


def test_mutual_information_of_codes_equals_sklearn():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(3)
    for n, na, nb in ((1, 1, 1), (50, 3, 4), (5000, 7, 2)):
        a, b = rng.integers(0, na, size=n), rng.integers(0, nb, size=n)
        b = np.where(rng.random(n) < 0.5, a % nb, b)  # some dependence
        assert r.mutual_information_of_codes(a, b) == pytest.approx(mutual_info_score(a, b), abs=1e-12)


# --------------------------------------------------------------------------- a sigmoid gate, from its records


def sigmoid_call(T=60, seed=0):
    """One recorded call of a sigmoid top-2 gate (DeepSeek-V3 style): probs = sigmoid(logits) + a bias
    that the scores carry but the logits do not, so softmax(logits) is *not* the gate's distribution."""
    import torch

    from mmoe_core.routing_record import LayerCall, PositionMeta, RouterOutput

    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(1, T, E)).astype(np.float32)
    logits[..., 0] += 5.0  # softmax(logits) piles onto expert 0 ...
    probs = 1 / (1 + np.exp(-logits))
    probs[..., 1:] = np.clip(probs[..., 1:] + 0.6, 0, 1)  # ... the gate's own scores spread out
    top = np.argsort(-probs, axis=-1)[..., :2]
    combine = np.zeros_like(probs)
    np.put_along_axis(combine, top, np.take_along_axis(probs, top, -1), -1)  # raw top-k weights
    router = RouterOutput(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (logits, probs, top, combine)))
    meta = PositionMeta.uniform("c", [7], T, "text_token", "text", "text")
    return LayerCall("sig", router, meta), logits[0], probs[0]


def test_sigmoid_gate_indicators_use_the_recorded_probs():
    from analysis.indicator_tables import layer_metrics_frame
    from analysis.routing_table import routing_frame

    call, logits, probs = sigmoid_call()
    table = routing_frame([call])
    assert list(table.columns[:6]) == ["layer", "call", "example_index", "example_id", "position", "position_kind"]
    np.testing.assert_allclose(np.stack(table["probs"]), probs)
    dist = probs / probs.sum(axis=1, keepdims=True)
    assert not np.allclose(dist, r.softmax(logits), atol=0.05)  # the two readings really differ
    np.testing.assert_allclose(table["entropy"], r.token_entropy(dist), rtol=1e-5)
    np.testing.assert_allclose(table["top1_prob"], dist.max(axis=1), rtol=1e-5)
    row = layer_metrics_frame(table).iloc[0]
    assert row["importance"] == pytest.approx(dist.mean(axis=0).tolist(), rel=1e-5)
    assert row["token_entropy"] == pytest.approx(r.token_entropy(dist).mean(), rel=1e-5)
    assert row["effective_experts"] == pytest.approx(math.exp(r.marginal_entropy(dist.mean(axis=0))), rel=1e-5)
    from_logits = summary_of(logits, np.stack(table["topk_ids"]).astype(int))
    assert from_logits["effective_experts"] < 2.0 < row["effective_experts"]  # softmax(logits) would say collapse
    assert row["z_loss"] == pytest.approx(r.router_z_loss(logits), rel=1e-5)  # the z-loss does read logits


def test_routing_distribution_normalises_scores_and_keeps_softmax():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(r.routing_distribution(r.softmax(logits)), r.softmax(logits))
    np.testing.assert_allclose(
        r.routing_distribution([[0.5, 0.25, 0.25], [0.0, 0.0, 0.0]]), [[0.5, 0.25, 0.25], [0.0, 0.0, 0.0]]
    )
    np.testing.assert_allclose(r.routing_distribution([[0.9, 0.9, 0.2]]), [[0.45, 0.45, 0.1]])

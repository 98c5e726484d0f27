"""Routing measures of the literature (analysis.routing_measures) on constructed routings with
hand-computed answers, plus property tests (ranges, invariance to relabelling the experts)."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import mutual_info_score

from analysis import routing as r
from analysis import routing_findings as findings
from analysis import routing_measures as m

LOG2, LOG4 = math.log(2), math.log(4)


def onehot(ids, E):
    out = np.zeros((len(ids), E))
    out[np.arange(len(ids)), ids] = 1.0
    return out


def standard_gate(probs, k):
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(probs))[:, None]
    combine = np.zeros_like(probs)
    combine[rows, ids] = probs[rows, ids]
    return ids, combine / combine.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- loads


def test_slot_and_weight_load_hand_values():
    ids = np.array([[0, 1], [0, 2], [0, 1]])
    combine = np.array([[0.9, 0.1, 0, 0], [0.6, 0, 0.4, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(m.slot_load(ids, 4), [3 / 6, 2 / 6, 1 / 6, 0])
    np.testing.assert_allclose(m.weight_load(combine), [2.0 / 3, 0.6 / 3, 0.4 / 3, 0])
    both = m.slot_and_weight_load(ids, combine)
    assert both["slots"] == pytest.approx([0.5, 1 / 3, 1 / 6, 0])
    assert both["weight"] == pytest.approx([2 / 3, 0.2, 0.4 / 3, 0])
    assert m.weight_load(np.zeros((2, 3))).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        m.slot_load(np.array([[0, 4]]), 4)


def test_top_n_coverage_hand_values():
    assert m.top_n_coverage([0.25] * 4, 2) == {"share": 0.5, "uniform": 0.5, "ratio": 1.0}
    assert m.top_n_coverage([1, 0, 0, 0], 1)["ratio"] == 4.0  # E / N when the top N take all
    cov = m.top_n_coverage([10, 30, 50, 10], 2)  # counts work too: 0.5 + 0.3
    assert cov["share"] == pytest.approx(0.8) and cov["ratio"] == pytest.approx(1.6)
    with pytest.raises(ValueError):
        m.top_n_coverage([0.5, 0.5], 3)


def test_expert_diversity_and_dead_fraction():
    assert m.expert_diversity([0.25] * 4) == pytest.approx(1.0)
    assert m.expert_diversity([1, 0, 0, 0]) == pytest.approx(0.25)
    assert m.expert_diversity([0.5, 0.5, 0, 0]) == pytest.approx(0.5)  # exp(log 2) / 4
    assert m.dead_expert_fraction([0.5, 0.5, 0, 0]) == 0.5
    assert m.dead_expert_fraction([0.25] * 4) == 0.0
    assert m.effective_count([0.0, 0.0]) == 0.0


# --------------------------------------------------------------------------- entropy


def test_uniform_router_has_full_entropy_and_no_information():
    probs = np.full((10, 4), 0.25)
    assert m.local_entropy(probs) == pytest.approx(LOG4)
    assert m.global_entropy(probs) == pytest.approx(LOG4)
    assert m.expert_token_mi(probs) == pytest.approx(0.0, abs=1e-12)


def test_committed_balanced_router_has_maximal_information():
    probs = onehot(np.arange(40) % 4, 4)
    assert m.local_entropy(probs) == pytest.approx(0.0)
    assert m.global_entropy(probs) == pytest.approx(LOG4)
    assert m.expert_token_mi(probs) == pytest.approx(LOG4)


def test_collapsed_router_has_no_entropy_at_all():
    probs = onehot(np.zeros(8, dtype=int), 4)
    assert m.local_entropy(probs) == m.global_entropy(probs) == m.expert_token_mi(probs) == 0.0


def test_mixed_router_hand_value():
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    local = LOG2 / 2
    glob = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert m.local_entropy(probs) == pytest.approx(local)
    assert m.global_entropy(probs) == pytest.approx(glob)
    assert m.expert_token_mi(probs) == pytest.approx(glob - local)


def test_expert_token_mi_equals_sklearn_for_hard_routing():
    chosen = np.random.default_rng(0).integers(0, 4, size=300)
    tokens = np.arange(300)
    assert m.expert_token_mi(onehot(chosen, 4)) == pytest.approx(mutual_info_score(tokens, chosen))


def test_sigmoid_scores_are_normalised_first():
    probs = np.random.default_rng(1).dirichlet(np.ones(4), size=20)
    scaled = probs * np.linspace(0.3, 2.0, 20)[:, None]  # sigmoid-like scores, rows not summing to 1
    assert m.local_entropy(scaled) == pytest.approx(m.local_entropy(probs))
    assert m.global_entropy(scaled) == pytest.approx(m.global_entropy(probs))


def test_per_modality_entropy_sees_what_the_layer_hides():
    """LIMoE's point: text all on expert 0, image all on expert 1 -> each modality collapsed,
    the layer as a whole balanced."""
    probs = onehot(np.r_[np.zeros(10, int), np.ones(10, int)], 2)
    labels = np.array(["text"] * 10 + ["image"] * 10)
    per = m.modality_entropies(probs, labels)
    assert list(per) == ["image", "text"]
    for label in per:
        assert per[label] == {"local": 0.0, "global": 0.0, "mi": 0.0, "positions": 10}
    assert m.modality_entropies(probs)["all"]["global"] == pytest.approx(LOG2)
    assert m.modality_entropies(probs)["all"]["mi"] == pytest.approx(LOG2)
    with pytest.raises(ValueError):
        m.modality_entropies(probs, labels[:5])


# --------------------------------------------------------------------------- saturation


def test_router_saturation_hand_values():
    final = np.array([[0, 1], [2, 3]])
    snapshots = [np.array([[2, 3], [0, 1]]), np.array([[2, 0], [2, 3]]), np.array([[1, 0], [3, 2]])]
    # overlaps: (0 + 0) / 4, (1 + 2) / 4, (2 + 2) / 4 (the order inside a top-k does not matter)
    np.testing.assert_allclose(m.router_saturation(snapshots, final), [0.0, 0.75, 1.0])
    # top-1 saturation: first columns only
    np.testing.assert_allclose(m.router_saturation(snapshots, final, k=1), [0.0, 0.5, 0.0])
    np.testing.assert_allclose(m.router_saturation(np.stack(snapshots), final), [0.0, 0.75, 1.0])
    assert m.router_saturation(final, final).tolist() == [1.0]
    with pytest.raises(ValueError):
        m.router_saturation([final[:1]], final)
    with pytest.raises(ValueError):
        m.router_saturation([final], final, k=3)


# --------------------------------------------------------------------------- co-activation


def test_co_activation_hand_values():
    ids = np.array([[0, 1], [0, 1], [0, 2]])
    c = m.co_activation(ids, 4)
    # n(0) = 3, n(1) = 2, n(2) = 1, expert 3 never chosen
    expected = np.array([[0, 2 / 3, 1 / 3, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(c, expected)
    assert m.co_activation(ids, 4, diagonal=1.0)[0, 0] == 1.0
    assert m.co_activation(ids, 4, diagonal=1.0)[3, 3] == 1.0


def test_cross_layer_consistency_hand_values():
    a = np.array([[0, 1], [0, 1], [2, 3]])
    assert m.cross_layer_consistency(a, a) == 1.0
    assert m.cross_layer_consistency(a, np.array([[2, 3], [2, 3], [0, 1]])) == 0.0
    b = np.array([[1, 2], [1, 0], [2, 0]])  # Jaccard 1/3, 1, 1/3
    np.testing.assert_allclose(m.jaccard_per_position(a, b), [1 / 3, 1.0, 1 / 3])
    assert m.cross_layer_consistency(a, b) == pytest.approx(5 / 9)
    assert m.cross_layer_consistency_chain([a, a, b]) == pytest.approx([1.0, 5 / 9])
    with pytest.raises(ValueError):
        m.cross_layer_consistency(a, b[:2])


def test_consistency_of_independent_random_top2_is_chance():
    rng = np.random.default_rng(0)
    E, T = 4, 4000
    a = np.stack([rng.permutation(E)[:2] for _ in range(T)])
    b = np.stack([rng.permutation(E)[:2] for _ in range(T)])
    # two random 2-sets of 4: overlap 2 w.p. 1/6 (J=1), 1 w.p. 4/6 (J=1/3), 0 w.p. 1/6 (J=0)
    assert m.cross_layer_consistency(a, b) == pytest.approx(1 / 6 + 4 / 6 / 3, abs=0.02)


# --------------------------------------------------------------------------- weight collapse


def test_issue_example_warns():
    """mmoe-balanced image_intra: slots 29/23/24/24%, importance 11/10/47/33%."""
    level, reason = findings.weight_collapse_clause([0.29, 0.23, 0.24, 0.24], [0.11, 0.10, 0.47, 0.33])
    assert level == "warning"
    assert reason == (
        "weight collapse under top-k: the slots name 3.98 effective experts of 4 (at most 29% each) "
        "but expert 2 gets 47% of the router importance for 24% of slots (1.94x)"
    )


def test_even_slots_and_weights_are_not_flagged():
    assert findings.weight_collapse_clause([0.25] * 4, [0.25] * 4, [0.25] * 4) is None
    assert findings.weight_collapse_clause([0.26, 0.24, 0.25, 0.25], [0.24, 0.27, 0.25, 0.24]) is None
    # weight spread *more* evenly than the slots is no collapse
    assert findings.weight_collapse_clause([0.4, 0.2, 0.2, 0.2], [0.25] * 4, [0.25] * 4) is None
    assert findings.weight_collapse_clause([1.0], [1.0]) is None  # one expert: nothing to compare
    assert findings.weight_collapse_clause([0.5, 0.5]) is None  # no weight view at all


def test_two_experts_holding_the_weight_is_collapsed_and_names_the_starved():
    level, reason = findings.weight_collapse_clause([1 / 3, 1 / 3, 1 / 6, 1 / 6], None, [0.49, 0.49, 0.01, 0.01])
    assert level == "collapsed"
    assert "the combine weight spreads over only 2.21 effective experts (0.58x the slots')" in reason
    assert "most of it on experts 0, 1" in reason
    assert "2 starved experts (2, 3: 17%, 17% of slots but 1.0%, 1.0% of the combine weight)" in reason


def test_one_starved_expert_is_a_warning():
    level, reason = findings.weight_collapse_clause([0.25] * 4, None, [0.33, 0.33, 0.32, 0.02])
    assert level == "warning"
    assert "1 starved expert (3: 25% of slots but 2.0% of the combine weight)" in reason


def test_worst_view_first_and_the_other_summarised():
    level, reason = findings.weight_collapse_clause([0.25] * 4, [0.55, 0.15, 0.15, 0.15], [0.7, 0.1, 0.1, 0.1])
    assert level == "warning"
    assert reason.index("of the combine weight for 25% of slots (2.80x)") < reason.index(
        "the router importance agrees (3.26 effective experts, at most 55% on one)"
    )


def constructed_issue_layer():
    """Top-3 of 4: slot loads exactly 0.29/0.23/0.24/0.24 (positions omit experts 0..3 13/31/28/28
    times), router mass leaning on experts 2 and 3."""
    w = np.array([0.11, 0.10, 0.47, 0.33])
    omit = np.repeat([0, 1, 2, 3], [13, 31, 28, 28])
    probs = np.zeros((len(omit), 4))
    for t, j in enumerate(omit):
        chosen = [e for e in range(4) if e != j]
        probs[t, chosen] = 0.98 * w[chosen] / w[chosen].sum()
        probs[t, j] = 0.02
    ids, combine = standard_gate(probs, 3)
    return probs, ids, combine


def test_weight_collapse_the_routing_verdict_misses():
    probs, ids, combine = constructed_issue_layer()
    s = r.layer_summary(probs, ids, combine)
    assert s["load"] == pytest.approx([0.29, 0.23, 0.24, 0.24])
    label, reason = r.verdict(s)
    # what the issue reports: the verdict said healthy; with the rule wired in it warns, saying why
    assert label == "warning" and "weight collapse under top-k" in reason
    level, reason = findings.weight_collapse_finding(probs, ids, combine)
    assert level == "warning"
    assert "expert 2 gets 42% of the combine weight for 24% of slots (1.76x)" in reason
    assert findings.weight_collapse_from_summary(s) == (level, reason)
    ind = m.weight_collapse_indicators(probs, ids, combine)
    assert ind["slots"] == pytest.approx(s["load"])
    assert ind["weight_displacement"] == pytest.approx(0.27, abs=0.005)
    assert ind["weight_per_slot"] == pytest.approx(0.422 / 0.24, abs=0.005)
    assert ind["importance_per_slot"] == pytest.approx(0.419 / 0.24, abs=0.005)
    assert ind["effective_by_slots"] == pytest.approx(3.98, abs=0.005)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_standard_gate_is_not_flagged(k):
    probs = r.softmax(np.random.default_rng(k).normal(size=(400, 4)))
    ids, combine = standard_gate(probs, k)
    assert findings.weight_collapse_finding(probs, ids, combine) is None


def test_thresholds_are_frozen_and_replaceable():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        findings.FINDING_THRESHOLDS.weight_per_slot_warning = 2.5
    strict = dataclasses.replace(findings.FINDING_THRESHOLDS, weight_per_slot_warning=2.5)
    assert findings.weight_collapse_clause([0.29, 0.23, 0.24, 0.24], [0.11, 0.10, 0.47, 0.33], None, strict) is None


# --------------------------------------------------------------------------- position, batch


def test_position_dependence():
    rng = np.random.default_rng(0)
    positions = np.tile(np.arange(16), 40)
    content = rng.integers(0, 4, size=len(positions))[:, None]
    d = findings.position_dependence(content, positions)
    assert d["u_adjusted"] < 0.05 and d["rows_per_position"] == 40
    assert findings.position_dependence_finding(content, positions) is None
    by_position = (positions % 4)[:, None]
    d = findings.position_dependence(by_position, positions)
    assert d["u"] == pytest.approx(1.0) and d["u_adjusted"] == pytest.approx(1.0, abs=0.01)
    level, reason = findings.position_dependence_finding(by_position, positions)
    assert level == "warning" and reason.startswith("position-dependent routing: the position index")
    # every position seen once: nothing can be judged
    assert findings.position_dependence_finding(by_position[:16], positions[:16]) is None
    assert findings.position_dependence(np.zeros((10, 1), int), np.arange(10))["u"] == 0.0


def test_position_dependence_within_position_kinds():
    """CLS (always position 0) on its own expert, every token on another: the *kind* decides, not the
    position; within the kinds nothing is left for the position to explain."""
    positions = np.tile(np.arange(10), 30)
    kinds = np.where(positions == 0, "cls", "token")
    top1 = np.where(positions == 0, 1, 3)[:, None]
    assert findings.position_dependence_finding(top1, positions) is not None  # without the kinds: flagged
    assert findings.position_dependence_finding(top1, positions, kinds=kinds) is None
    d = findings.position_dependence(top1, positions, kinds)
    assert d["expert_entropy"] == 0.0 and d["u_adjusted"] == 0.0
    # tokens routed by position (mod 3) are still caught inside their kind
    by_position = np.where(positions == 0, 1, positions % 3)[:, None]
    assert findings.position_dependence_finding(by_position, positions, kinds=kinds)[0] == "warning"


def test_conditional_mi_with_one_group_is_sklearns_mi():
    rng = np.random.default_rng(3)
    e, q = rng.integers(0, 4, 500), rng.integers(0, 7, 500)
    e[:200] = q[:200] % 4
    assert findings.position_dependence(e[:, None], q, n_shuffles=0)["mi"] == pytest.approx(mutual_info_score(q, e))


def test_batch_dependence():
    combine = np.random.default_rng(0).dirichlet(np.ones(4), size=10)
    assert findings.batch_dependence_finding(combine, combine.copy()) is None
    assert findings.batch_dependence_finding(None, combine) is None
    changed = combine.copy()
    changed[3] = [1, 0, 0, 0]
    level, reason = findings.batch_dependence_finding(combine, changed)
    assert level == "warning" and "10% of positions change by more than 0.01" in reason
    dep = findings.batch_change(combine, changed)
    assert dep["mean_abs_change"] == pytest.approx(r.batch_dependence(combine, changed)["mean_abs_change"])


def test_layer_measures_is_json_friendly():
    probs = r.softmax(np.random.default_rng(0).normal(size=(50, 4)))
    ids, combine = standard_gate(probs, 2)
    out = m.layer_measures(probs, ids, combine, labels=np.array(["text", "image"] * 25), top_n=2)
    json.dumps(out)
    assert set(out["by_label"]) == {"image", "text"}
    assert out["top_n_coverage"]["uniform"] == 0.5


# --------------------------------------------------------------------------- properties


@st.composite
def routings(draw, min_k=1):
    E = draw(st.integers(2, 6))
    k = draw(st.integers(min(min_k, E), E))
    T = draw(st.integers(1, 25))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(E, draw(st.sampled_from([0.1, 1.0, 10.0]))), size=T)
    probs = np.maximum(probs, 1e-12)
    ids, combine = standard_gate(probs, k)
    perm = rng.permutation(E)
    return probs, ids, combine, perm


def relabel(probs, ids, combine, perm):
    """Expert e becomes expert perm[e]."""
    inv = np.argsort(perm)
    return probs[:, inv], perm[ids], combine[:, inv]


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(routings())
def test_entropy_ranges(case):
    probs, _, _, _ = case
    E = probs.shape[1]
    local, glob = m.local_entropy(probs), m.global_entropy(probs)
    assert -1e-9 <= local <= glob + 1e-9 <= math.log(E) + 2e-9  # H(mean p) >= mean H(p)
    assert 0 <= m.expert_token_mi(probs) <= math.log(E) + 1e-9


@PROPERTY
@given(routings())
def test_load_measure_ranges(case):
    _, ids, combine, _ = case
    E = combine.shape[1]
    f = m.slot_load(ids, E)
    assert f.sum() == pytest.approx(1.0) and m.weight_load(combine).sum() == pytest.approx(1.0)
    assert 1 / E - 1e-9 <= m.expert_diversity(f) <= 1 + 1e-9
    shares = [m.top_n_coverage(f, n)["share"] for n in range(1, E + 1)]
    assert all(a <= b + 1e-12 for a, b in zip(shares, shares[1:])) and shares[-1] == pytest.approx(1)
    for n in range(1, E + 1):
        assert 1 - 1e-9 <= m.top_n_coverage(f, n)["ratio"] <= E / n + 1e-9
    c = m.co_activation(ids, E)
    assert ((0 <= c) & (c <= 1)).all()


@PROPERTY
@given(routings(), st.integers(0, 2**31 - 1))
def test_saturation_and_consistency_ranges(case, seed):
    _, ids, _, _ = case
    E = int(ids.max()) + 1
    rng = np.random.default_rng(seed)
    other = np.stack([rng.permutation(max(E, ids.shape[1]))[: ids.shape[1]] for _ in range(len(ids))])
    sat = m.router_saturation([other, ids], ids)
    assert 0 <= sat[0] <= 1 and sat[1] == 1.0
    j = m.jaccard_per_position(ids, other)
    assert ((0 <= j) & (j <= 1)).all()
    np.testing.assert_allclose(j, m.jaccard_per_position(other, ids))
    assert m.cross_layer_consistency(ids, other) == pytest.approx(j.mean())


@PROPERTY
@given(routings())
def test_measures_do_not_depend_on_expert_labels(case):
    probs, ids, combine, perm = case
    p2, i2, c2 = relabel(probs, ids, combine, perm)
    E = probs.shape[1]
    for fn in (m.local_entropy, m.global_entropy, m.expert_token_mi):
        assert fn(p2) == pytest.approx(fn(probs), abs=1e-9)
    f, f2 = m.slot_load(ids, E), m.slot_load(i2, E)
    np.testing.assert_allclose(f2[perm], f)
    assert m.expert_diversity(f2) == pytest.approx(m.expert_diversity(f))
    assert m.dead_expert_fraction(f2) == m.dead_expert_fraction(f)
    assert m.top_n_coverage(f2, 1) == pytest.approx(m.top_n_coverage(f, 1))
    np.testing.assert_allclose(m.co_activation(i2, E)[np.ix_(perm, perm)], m.co_activation(ids, E))
    assert m.cross_layer_consistency(i2, perm[ids[::-1]]) == pytest.approx(m.cross_layer_consistency(ids, ids[::-1]))
    assert m.router_saturation([i2[::-1]], perm[ids[::-1]]).tolist() == pytest.approx(
        m.router_saturation([ids[::-1]], ids[::-1]).tolist()
    )
    a, b = findings.weight_collapse_finding(probs, ids, combine), findings.weight_collapse_finding(p2, i2, c2)
    assert (a is None) == (b is None) and (a is None or a[0] == b[0])
    ind, ind2 = m.weight_collapse_indicators(probs, ids, combine), m.weight_collapse_indicators(p2, i2, c2)
    for key in (
        "weight_displacement",
        "importance_displacement",
        "effective_by_weight",
        "weight_per_slot",
        "effective_by_slots",
        "weight_spread_ratio",
    ):
        assert ind2[key] == pytest.approx(ind[key], abs=1e-9)


@PROPERTY
@given(st.integers(2, 8), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_balanced_round_robin_is_never_flagged(E, k, seed):
    """Slots and weights both even (each expert in turn): the rule stays silent, whatever E and k."""
    k = min(k, E)
    T = E * 10
    ids = (np.arange(T)[:, None] + np.arange(k)) % E
    combine = np.zeros((T, E))
    combine[np.arange(T)[:, None], ids] = 1.0 / k
    probs = np.random.default_rng(seed).permutation(np.full((T, E), 1.0 / E))
    assert findings.weight_collapse_finding(probs, ids, combine) is None

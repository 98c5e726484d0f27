"""Collapse, utilization and entropy indicators for one routed MoE layer.

Pure functions on numpy arrays: no torch, no streamlit, no file I/O.

Shapes, for one layer and T routed positions over E experts with top-k routing:

* ``probs``    float [T, E]  the gate's own scores over all experts, as recorded (softmax, or sigmoid
  for gates such as DeepSeek-V3's): never re-derived from logits here
* ``logits``   float [T, E]  router logits over all experts (only the z-loss reads them)
* ``topk_ids`` int   [T, k]  chosen experts, column 0 the top-1 (``torch.topk`` sorts by default)
* ``combine``  float [T, E]  weights actually applied to each expert's output (0 where unused)

``topk_ids`` says what the router chose; ``combine`` says what the layer really did with it.
They agree for the standard gate (softmax, top-k, renormalise over the k) but not for every gate: one
that normalises each expert over the batch and scatters its mask along the sequence axis (a published
``SwitchGate`` does) leaves many positions with no weight at all, puts weight on experts outside the
top-k and never weights the experts whose id is >= k.  Both views are reported so that this stays visible.

Indicators that need a distribution over experts (importance, entropies, confidence) use the
*routing distribution* p = probs / sum_e probs (``routing_distribution``): the softmax itself for a
softmax gate, the normalised scores for a sigmoid gate (whose scores need not sum to 1).

Entropies and mutual information are in nats.  ``layer_summary`` gathers every scalar indicator
of a layer into a JSON-friendly dict; ``verdict`` (from :mod:`analysis.verdict`) turns a summary into
("healthy" | "warning" | "collapsed", a reason that quotes the numbers) using ``THRESHOLDS``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp
from scipy.special import softmax as _scipy_softmax

from analysis.lazy_stats import entropy as _entropy
from analysis.lazy_stats import mutual_info_score, normalized_mutual_info_score

# The verdict and its thresholds live in analysis.verdict; re-exported here, where callers look first.
from analysis.verdict import THRESHOLDS, Thresholds, verdict

__all__ = [
    "THRESHOLDS",
    "Thresholds",
    "batch_dependence",
    "co_selection",
    "cross_layer_pairs",
    "dead_experts",
    "effective_experts",
    "effective_experts_ratio",
    "experts_never_weighted",
    "gini",
    "importance",
    "layer_summary",
    "load_cv",
    "load_fraction",
    "marginal_entropy",
    "max_load_ratio",
    "mean_token_entropy",
    "mutual_information_of_codes",
    "nearly_dead_experts",
    "router_confidence",
    "router_z_loss",
    "routing_distribution",
    "softmax",
    "specialisation",
    "specialisation_vs_shuffled",
    "summaries_by_slice",
    "switch_balance_loss",
    "token_entropy",
    "top1",
    "unrouted_positions",
    "verdict",
    "weight_share",
    "weighted_outside_topk",
]


# --------------------------------------------------------------------------- basics


def softmax(logits: np.ndarray) -> np.ndarray:
    """softmax over the expert axis (last); for building test patterns, not for reading a gate."""
    return _scipy_softmax(np.asarray(logits, dtype=np.float64), axis=-1)


def routing_distribution(probs: np.ndarray) -> np.ndarray:
    """p_e = s_e / sum_e' s_e' of the gate's recorded scores s (float64); unchanged for a softmax gate.

    A row whose scores are all zero stays all zero (it has no distribution)."""
    s = np.asarray(probs, dtype=np.float64)
    total = s.sum(axis=-1, keepdims=True)
    return np.divide(s, total, out=np.zeros_like(s), where=total > 0)


def top1(topk_ids: np.ndarray) -> np.ndarray:
    """Top-1 expert per position: column 0 of ``topk_ids`` (or the array itself if 1-D)."""
    ids = np.asarray(topk_ids)
    return ids if ids.ndim == 1 else ids[:, 0]


def _as_topk(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    ids = np.asarray(topk_ids)
    if ids.ndim == 1:
        ids = ids[:, None]
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        # Dropped tokens are sometimes marked -1; they are not routing slots of any expert.
        raise ValueError(f"topk_ids must lie in [0, {num_experts}), got {ids.min()}..{ids.max()}")
    return ids.astype(np.int64, copy=False)


def load_fraction(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """f_i: share of the T*k routing slots given to expert i (sums to 1; zeros if T = 0)."""
    ids = _as_topk(topk_ids, num_experts)
    counts = np.bincount(ids.ravel(), minlength=num_experts).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def importance(probs: np.ndarray) -> np.ndarray:
    """P_i: mean over positions of the routing distribution's share of expert i (pass p, not raw
    sigmoid scores, so that P sums to 1)."""
    return np.asarray(probs, dtype=np.float64).mean(axis=0)


def switch_balance_loss(f: np.ndarray, P: np.ndarray) -> float:
    """Switch Transformer balance loss E * sum_i f_i P_i; 1 when balanced, E when collapsed.

    f here is the share of *slots* (sums to 1 for any k), so no extra 1/k is needed for top-k.
    Implementations that count f as the share of *positions* choosing i (sums to k, e.g. Hugging
    Face's Mixtral loss) give k at balance and must be divided by k to compare.
    """
    f, P = np.asarray(f, dtype=np.float64), np.asarray(P, dtype=np.float64)
    return float(len(f) * np.sum(f * P))


def router_z_loss(logits: np.ndarray) -> float:
    """ST-MoE router z-loss: mean over positions of logsumexp(logits)^2."""
    return float(np.mean(logsumexp(np.asarray(logits, dtype=np.float64), axis=-1) ** 2))


# --------------------------------------------------------------------------- entropy


def token_entropy(probs: np.ndarray) -> np.ndarray:
    """H(p) per position (nats): how undecided the router is for that position."""
    return _entropy(np.asarray(probs, dtype=np.float64), axis=-1)


def mean_token_entropy(probs: np.ndarray, normalised: bool = False) -> float:
    """Mean per-position entropy; with ``normalised`` divided by log E (1 = uniform router)."""
    probs = np.asarray(probs, dtype=np.float64)
    mean = float(np.mean(token_entropy(probs)))
    if not normalised:
        return mean
    num_experts = probs.shape[-1]
    return mean / math.log(num_experts) if num_experts > 1 else 0.0


def marginal_entropy(P: np.ndarray) -> float:
    """H(P) of the mean routing distribution (nats): log E when balanced, 0 when collapsed."""
    return float(_entropy(np.asarray(P, dtype=np.float64)))


def effective_experts(P: np.ndarray) -> float:
    """exp(H(P)): how many equally used experts would give the same marginal entropy."""
    return float(math.exp(marginal_entropy(P)))


def effective_experts_ratio(P: np.ndarray) -> float:
    """exp(H(P)) / E: 1 when uniform, 1/E when all router mass is on one expert."""
    return effective_experts(P) / len(P)


# --------------------------------------------------------------------------- load shape


def load_cv(f: np.ndarray) -> float:
    """Coefficient of variation std(f) / mean(f) (population std); 0 when balanced."""
    f = np.asarray(f, dtype=np.float64)
    mean = f.mean()
    return float(f.std() / mean) if mean > 0 else 0.0


def max_load_ratio(f: np.ndarray) -> float:
    """max_i f_i / (1/E): 1 when balanced, at most E/k under top-k."""
    f = np.asarray(f, dtype=np.float64)
    return float(f.max() * len(f))


def dead_experts(f: np.ndarray) -> list[int]:
    """Experts that receive no routing slot at all."""
    return [int(i) for i in np.flatnonzero(np.asarray(f) == 0)]


def nearly_dead_experts(f: np.ndarray, share: float = THRESHOLDS.nearly_dead_share) -> list[int]:
    """Experts with 0 < f_i < share / E (default: under a tenth of their fair share)."""
    f = np.asarray(f, dtype=np.float64)
    return [int(i) for i in np.flatnonzero((f > 0) & (f < share / len(f)))]


def gini(f: np.ndarray) -> float:
    """Gini coefficient of the load: 0 when balanced, (E-1)/E when one expert takes all."""
    x = np.sort(np.asarray(f, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    rank = np.arange(1, n + 1)
    return float(2.0 * np.sum(rank * x) / (n * total) - (n + 1) / n)


def router_confidence(probs: np.ndarray) -> tuple[float, float]:
    """(mean top-1 probability, mean gap between top-1 and top-2 probability)."""
    probs = np.sort(np.asarray(probs, dtype=np.float64), axis=-1)
    first = probs[:, -1]
    second = probs[:, -2] if probs.shape[1] > 1 else np.zeros_like(first)
    return float(first.mean()), float((first - second).mean())


# --------------------------------------------------------------------------- co-selection


def co_selection(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """E x E counts of expert pairs chosen for the same position; diagonal = times chosen."""
    ids = _as_topk(topk_ids, num_experts)
    chosen = np.zeros((ids.shape[0], num_experts), dtype=np.int64)
    np.add.at(chosen, (np.arange(ids.shape[0])[:, None], ids), 1)
    return chosen.T @ chosen


def cross_layer_pairs(topk_a: np.ndarray, topk_b: np.ndarray, num_experts_a: int, num_experts_b: int) -> np.ndarray:
    """[E_a, E_b] counts of (top-1 expert in layer a, top-1 in layer b) for the same positions."""
    a = top1(_as_topk(topk_a, num_experts_a))
    b = top1(_as_topk(topk_b, num_experts_b))
    if len(a) != len(b):
        raise ValueError(f"layers must cover the same positions, got {len(a)} and {len(b)}")
    pairs = np.zeros((num_experts_a, num_experts_b), dtype=np.int64)
    np.add.at(pairs, (a, b), 1)
    return pairs


# --------------------------------------------------------------------------- specialisation


def specialisation(chosen_expert: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mutual information (nats) between the chosen expert and a categorical label.

    Returns ``{"mi": ..., "nmi": ...}``; nmi is sklearn's arithmetic-mean normalisation
    (0 = independent, 1 = the expert determines the label and vice versa).
    """
    chosen, labels = np.asarray(chosen_expert), np.asarray(labels)
    return {
        "mi": float(mutual_info_score(labels, chosen)),
        "nmi": float(normalized_mutual_info_score(labels, chosen)),
    }


def specialisation_vs_shuffled(
    chosen: np.ndarray, labels: np.ndarray, n_shuffles: int = 20, seed: int = 0
) -> dict[str, float]:
    """MI against a shuffled-label baseline, since MI on finite samples is biased upward.

    Returns ``{"mi", "shuffled_mean", "shuffled_max"}``: MI well above ``shuffled_max`` is
    specialisation that chance does not explain.
    """
    _, chosen_codes = np.unique(np.asarray(chosen), return_inverse=True)
    _, label_codes = np.unique(np.asarray(labels), return_inverse=True)
    rng = np.random.default_rng(seed)
    shuffled = [mutual_information_of_codes(rng.permutation(label_codes), chosen_codes) for _ in range(n_shuffles)]
    return {
        "mi": mutual_information_of_codes(label_codes, chosen_codes),
        "shuffled_mean": float(np.mean(shuffled)),
        "shuffled_max": float(np.max(shuffled)),
    }


def mutual_information_of_codes(a: np.ndarray, b: np.ndarray) -> float:
    """MI (nats) of two integer-coded label arrays from their contingency table.

    Equals ``sklearn.metrics.mutual_info_score(a, b)``; codes once, then one bincount per call, which
    makes the shuffled baseline (20 permutations of tens of thousands of positions) cheap.
    """
    a, b = np.asarray(a, dtype=np.int64).ravel(), np.asarray(b, dtype=np.int64).ravel()
    if a.size == 0:
        return 0.0
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb) / a.size
    pa, pb = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float(max(0.0, (joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum()))


# --------------------------------------------------------------------------- weighted reality


def batch_dependence(combine_alone: np.ndarray, combine_in_batch: np.ndarray) -> dict[str, float]:
    """How much the combine weights of the same positions change when run alone vs in a batch.

    Returns ``{"mean_abs_change", "max_abs_change"}`` over all (position, expert) entries.
    Zero for per-position gates; positive for gates that normalise across the batch.
    """
    alone = np.asarray(combine_alone, dtype=np.float64)
    in_batch = np.asarray(combine_in_batch, dtype=np.float64)
    if alone.shape != in_batch.shape:
        raise ValueError(f"shapes differ: {alone.shape} vs {in_batch.shape}")
    change = np.abs(alone - in_batch)
    return {"mean_abs_change": float(change.mean()), "max_abs_change": float(change.max())}


def unrouted_positions(combine: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """Bool [T]: positions whose combine row is all zero (no expert output reaches them)."""
    return np.all(np.abs(np.asarray(combine)) <= tol, axis=-1)


def weight_share(combine: np.ndarray) -> np.ndarray:
    """Share of the total combine weight that each expert receives (zeros if none at all)."""
    per_expert = np.abs(np.asarray(combine, dtype=np.float64)).sum(axis=0)
    total = per_expert.sum()
    return per_expert / total if total > 0 else per_expert


def experts_never_weighted(combine: np.ndarray, tol: float = 0.0) -> list[int]:
    """Experts whose combine weight is zero at every position."""
    unused = np.all(np.abs(np.asarray(combine)) <= tol, axis=0)
    return [int(i) for i in np.flatnonzero(unused)]


def weighted_outside_topk(combine: np.ndarray, topk_ids: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """Bool [T]: positions that put combine weight on an expert that is not in their top-k."""
    combine = np.asarray(combine)
    ids = _as_topk(topk_ids, combine.shape[1])
    in_topk = np.zeros(combine.shape, dtype=bool)
    in_topk[np.arange(len(ids))[:, None], ids] = True
    return np.any((np.abs(combine) > tol) & ~in_topk, axis=-1)


# --------------------------------------------------------------------------- summaries


def layer_summary(
    probs: np.ndarray,
    topk_ids: np.ndarray,
    combine: np.ndarray | None = None,
    logits: np.ndarray | None = None,
) -> dict:
    """Every scalar indicator of one layer, as plain Python values (JSON / Parquet friendly).

    ``probs`` are the gate's recorded scores (softmax or sigmoid); distributions over experts come
    from ``routing_distribution(probs)``.  ``logits`` feed the router z-loss only (None without them).
    Without ``combine`` the weighted-reality fields (``unrouted_fraction``,
    ``experts_never_weighted``, ``weight_share``, ``weighted_outside_topk_fraction``) are None:
    they are unknown, not assumed to follow the standard gate.
    """
    scores = np.asarray(probs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"probs must be [T, E] with T > 0, got shape {scores.shape}")
    num_positions, num_experts = scores.shape
    ids = _as_topk(topk_ids, num_experts)
    if ids.shape[0] != num_positions:
        raise ValueError(f"topk_ids covers {ids.shape[0]} positions, probs {num_positions}")
    if logits is not None and np.shape(logits) != scores.shape:
        raise ValueError(f"logits must match probs {scores.shape}, got {np.shape(logits)}")

    dist = routing_distribution(scores)
    f, P = load_fraction(ids, num_experts), importance(dist)
    top1_prob, top1_gap = router_confidence(dist)
    summary = {
        "num_positions": int(num_positions),
        "num_experts": int(num_experts),
        "top_k": int(ids.shape[1]),
        "load": f.tolist(),
        "importance": P.tolist(),
        "switch_balance_loss": switch_balance_loss(f, P),
        "z_loss": None if logits is None else router_z_loss(logits),
        "token_entropy": mean_token_entropy(dist),
        "token_entropy_norm": mean_token_entropy(dist, normalised=True),
        "marginal_entropy": marginal_entropy(P),
        "effective_experts": effective_experts(P),
        "effective_experts_ratio": effective_experts_ratio(P),
        "load_cv": load_cv(f),
        "max_load_ratio": max_load_ratio(f),
        "dead_experts": dead_experts(f),
        "nearly_dead_experts": nearly_dead_experts(f),
        "gini": gini(f),
        "top1_prob": top1_prob,
        "top1_gap": top1_gap,
        "unrouted_fraction": None,
        "experts_never_weighted": None,
        "weight_share": None,
        "weighted_outside_topk_fraction": None,
    }
    if combine is not None:
        combine = np.asarray(combine, dtype=np.float64)
        if combine.shape != scores.shape:
            raise ValueError(f"combine must match probs {scores.shape}, got {combine.shape}")
        summary["unrouted_fraction"] = float(unrouted_positions(combine).mean())
        summary["experts_never_weighted"] = experts_never_weighted(combine)
        summary["weight_share"] = weight_share(combine).tolist()
        outside = weighted_outside_topk(combine, ids)
        summary["weighted_outside_topk_fraction"] = float(outside.mean())
    return summary


def summaries_by_slice(
    probs: np.ndarray,
    topk_ids: np.ndarray,
    combine: np.ndarray | None,
    slice_labels: np.ndarray,
    logits: np.ndarray | None = None,
) -> dict:
    """``layer_summary`` per slice (modality, position kind, entity / question type, ...).

    Keys are the distinct labels in sorted order; each slice is summarised on its own positions.
    """
    labels = np.asarray(slice_labels)
    probs, ids = np.asarray(probs), np.asarray(topk_ids)
    if len(labels) != len(probs):
        raise ValueError(f"slice_labels has {len(labels)} entries, probs {len(probs)} positions")
    out = {}
    for label in np.unique(labels):
        rows = labels == label
        key = label.item() if hasattr(label, "item") else label
        out[key] = layer_summary(
            probs[rows],
            ids[rows],
            None if combine is None else np.asarray(combine)[rows],
            None if logits is None else np.asarray(logits)[rows],
        )
    return out

"""The routing measures the MoE literature uses.

Pure functions on numpy arrays (no pandas, no torch, no streamlit, no file I/O), for one routed layer
with T positions, E experts and top-k routing:

* ``probs``    float [T, E]  the gate's recorded scores (softmax, or sigmoid: they are normalised
  over the experts here, p = probs / sum_e probs, as ``analysis.routing.routing_distribution`` does)
* ``topk_ids`` int   [T, k]  the experts the gate chose, column 0 the top-1
* ``combine``  float [T, E]  the weight really applied to each expert's output (0 where unused)
* ``labels``   any   [T]     a categorical label per position (modality, position kind, ...)

Entropies and mutual information are in nats.  Where a measure is hand-written it says why (no
maintained library computes it); otherwise it calls scipy or scikit-learn.

The verdict rules that read these measures live in ``analysis.routing_findings``. This module
imports nothing from ``analysis`` but the leaf :mod:`analysis.lazy_stats`, so the rules and the verdict
can import it without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from analysis.lazy_stats import entropy as _entropy
from analysis.lazy_stats import jaccard_score

__all__ = [
    "co_activation",
    "cross_layer_consistency",
    "cross_layer_consistency_chain",
    "dead_expert_fraction",
    "effective_count",
    "expert_diversity",
    "expert_token_mi",
    "global_entropy",
    "jaccard_per_position",
    "layer_measures",
    "local_entropy",
    "modality_entropies",
    "router_saturation",
    "slot_load",
    "slot_and_weight_load",
    "top_n_coverage",
    "weight_collapse_indicators",
    "weight_load",
]


# --------------------------------------------------------------------------- helpers


def _distribution(probs: np.ndarray) -> np.ndarray:
    """p = s / sum_e s (float64) of recorded gate scores; an all-zero row stays zero.

    Same as ``analysis.routing.routing_distribution``, repeated here to keep this module free of
    imports from ``analysis`` (``analysis.verdict`` will import this module)."""
    s = np.asarray(probs, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"probs must be [T, E], got shape {s.shape}")
    total = s.sum(axis=-1, keepdims=True)
    return np.divide(s, total, out=np.zeros_like(s), where=total > 0)


def _as_ids(topk_ids: np.ndarray, num_experts: int | None = None) -> np.ndarray:
    ids = np.asarray(topk_ids)
    if ids.ndim == 1:
        ids = ids[:, None]
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise ValueError(f"topk_ids must be >= 0, got {ids.min()}")
    if num_experts is not None and ids.size and ids.max() >= num_experts:
        raise ValueError(f"topk_ids must lie in [0, {num_experts}), got max {ids.max()}")
    return ids


def _chosen_mask(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Bool [T, E]: expert e is among the position's chosen experts."""
    ids = _as_ids(topk_ids, num_experts)
    mask = np.zeros((ids.shape[0], num_experts), dtype=bool)
    mask[np.arange(ids.shape[0])[:, None], ids] = True
    return mask


def _shares(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    total = v.sum()
    return v / total if total > 0 else v


def _pct(share: float) -> str:
    """Percent as routing's reasons write it: one decimal below 10%, else none."""
    return f"{100 * share:.1f}%" if 0 < share < 0.1 else f"{100 * share:.0f}%"


def _ids_text(experts: Sequence[int]) -> str:
    return ", ".join(str(int(i)) for i in experts)


# --------------------------------------------------------------------------- loads


def slot_load(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """f_i = (1 / (T k)) * #{(t, j): topk_ids[t, j] = i}: share of the T*k routing slots of expert i.

    The Switch Transformer's f_i (Fedus et al. 2021, eq. 5) counted over all k slots.  Zeros if T = 0.
    """
    ids = _as_ids(topk_ids, num_experts)
    counts = np.bincount(ids.ravel(), minlength=num_experts).astype(np.float64)
    return _shares(counts)


def weight_load(combine: np.ndarray) -> np.ndarray:
    """w_i = sum_t |c_ti| / sum_t,e |c_te|: share of the total combine weight expert i receives.

    Load by weight, beside the slot load f_i: top-k can spread the slots evenly while the weight
    sits on one or two experts (DESIGN.md, "load by weight").  Zeros when no weight at all.
    """
    c = np.abs(np.asarray(combine, dtype=np.float64))
    if c.ndim != 2:
        raise ValueError(f"combine must be [T, E], got shape {c.shape}")
    return _shares(c.sum(axis=0))


def slot_and_weight_load(topk_ids: np.ndarray, combine: np.ndarray) -> dict[str, list[float]]:
    """``{"slots": f, "weight": w}`` side by side (lists, JSON friendly)."""
    combine = np.asarray(combine)
    return {"slots": slot_load(topk_ids, combine.shape[1]).tolist(), "weight": weight_load(combine).tolist()}


def effective_count(shares: np.ndarray) -> float:
    """exp(H(s)) of a share vector (normalised first): the number of equally used experts that would
    give the same entropy; E when uniform, 1 when one expert takes all (0 for an all-zero vector)."""
    s = _shares(shares)
    return float(math.exp(_entropy(s))) if s.sum() > 0 else 0.0


def top_n_coverage(load: np.ndarray, n: int) -> dict[str, float]:
    """Share of the load held by the N busiest experts, against the uniform N / E.

    coverage_N = sum of the N largest load shares; ratio = coverage_N / (N / E): 1 when balanced,
    E / N when the N busiest take everything.  Megatron-LM's concentration measure for MoE routing
    (the load of the top-N experts, tracked per layer).  ``load`` may be counts or shares.
    Returns ``{"share", "uniform", "ratio"}``.
    """
    f = _shares(load)
    num_experts = len(f)
    if not 1 <= n <= num_experts:
        raise ValueError(f"n must lie in [1, {num_experts}], got {n}")
    share = float(np.sort(f)[::-1][:n].sum())
    uniform = n / num_experts
    return {"share": share, "uniform": uniform, "ratio": share / uniform}


def expert_diversity(load: np.ndarray) -> float:
    """exp(H(f)) / E of the load shares f: 1 when balanced, 1/E when one expert takes all.

    NeMo's load-balance metric (the normalised exponential entropy of the expert load)."""
    f = _shares(load)
    return effective_count(f) / len(f)


def dead_expert_fraction(load: np.ndarray, tol: float = 0.0) -> float:
    """#{i: f_i <= tol} / E: the share of experts that receive no load (NeMo's dead-expert fraction)."""
    f = _shares(load)
    return float(np.mean(f <= tol))


# --------------------------------------------------------------------------- entropy (LIMoE)


def local_entropy(probs: np.ndarray) -> float:
    """Local entropy L = mean_x H(p(x)) (nats): how undecided the router is for a single token.

    LIMoE (Mustafa et al. 2022, "Multimodal Contrastive Learning with LIMoE", sec. 3.1): low local
    entropy means each token commits to few experts."""
    p = _distribution(probs)
    return float(np.mean(_entropy(p, axis=-1))) if len(p) else 0.0


def global_entropy(probs: np.ndarray) -> float:
    """Global entropy G = H(mean_x p(x)) (nats): how many experts the tokens use together.

    LIMoE: high global entropy means the experts are used evenly across tokens (low means collapse)."""
    p = _distribution(probs)
    return float(_entropy(p.mean(axis=0))) if len(p) else 0.0


def expert_token_mi(probs: np.ndarray) -> float:
    """I(X; expert) = G - L (nats), with X a token drawn uniformly and the expert drawn from p(x).

    The difference of LIMoE's global and local entropies is exactly the mutual information between
    token and expert: H(expert) - H(expert | token).  0 when every token routes alike; log E when
    each token commits to one expert and the experts are used evenly.  For one-hot p it equals
    ``sklearn.metrics.mutual_info_score(token index, chosen expert)``."""
    return max(0.0, global_entropy(probs) - local_entropy(probs))


def modality_entropies(probs: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """LIMoE's per-modality entropies: ``{label: {"local", "global", "mi", "positions"}}``.

    Per modality m (or any label): L_m = mean_{x in m} H(p(x)), G_m = H(mean_{x in m} p(x)),
    mi = G_m - L_m.  LIMoE regularises them separately per modality, since a modality can collapse
    onto its own experts while the layer as a whole looks balanced.  ``labels`` None: one key "all".
    Keys are the distinct labels, sorted.
    """
    p = _distribution(probs)
    labels = np.full(len(p), "all", dtype=object) if labels is None else np.asarray(labels)
    if len(labels) != len(p):
        raise ValueError(f"labels has {len(labels)} entries, probs {len(p)} positions")
    out = {}
    for label in np.unique(labels):
        rows = p[labels == label]
        local, glob = local_entropy(rows), global_entropy(rows)
        key = label.item() if hasattr(label, "item") else label
        out[key] = {"local": local, "global": glob, "mi": max(0.0, glob - local), "positions": int(len(rows))}
    return out


# --------------------------------------------------------------------------- saturation (OLMoE)


def router_saturation(
    snapshot_topk: Sequence[np.ndarray] | np.ndarray,
    final_topk: np.ndarray,
    k: int | None = None,
    num_experts: int | None = None,
) -> np.ndarray:
    """Router saturation per snapshot: share of a token's final top-k already chosen at step t.

    saturation(t) = (1 / (N k)) * sum_x |topk_t(x) ∩ topk_final(x)|, over the same N tokens routed by
    each snapshot's router and by the final one (OLMoE, Muennighoff et al. 2024, sec. 5.1: routing
    saturates early, ~60% at 1% of training).  1 at the final snapshot itself.

    ``snapshot_topk``: one [N, k] array per snapshot (or an [S, N, k] array); ``k`` truncates both to
    the first k columns (k = 1: top-1 agreement).  Returns float [S].
    Hand-written: no library computes set overlap of routing choices across checkpoints.
    """
    final = _as_ids(final_topk)
    if isinstance(snapshot_topk, np.ndarray) and snapshot_topk.ndim == 2:
        snapshot_topk = [snapshot_topk]  # one snapshot
    snaps = [_as_ids(s) for s in snapshot_topk]
    k = final.shape[1] if k is None else int(k)
    if not 1 <= k <= final.shape[1]:
        raise ValueError(f"k must lie in [1, {final.shape[1]}], got {k}")
    final = final[:, :k]
    if num_experts is None:
        num_experts = 1 + max([int(final.max()) if final.size else 0] + [int(s.max()) for s in snaps if s.size])
    final_mask = _chosen_mask(final, num_experts)
    out = []
    for s in snaps:
        if s.shape[0] != final.shape[0]:
            raise ValueError(f"a snapshot routes {s.shape[0]} tokens, the final router {final.shape[0]}")
        if s.shape[1] < k:
            raise ValueError(f"a snapshot has top-{s.shape[1]}, need at least {k}")
        common = (_chosen_mask(s[:, :k], num_experts) & final_mask).sum(axis=1)
        out.append(float(common.mean() / k) if len(common) else 0.0)
    return np.asarray(out)


# --------------------------------------------------------------------------- co-activation


def co_activation(topk_ids: np.ndarray, num_experts: int, diagonal: float = 0.0) -> np.ndarray:
    """[E, E] matrix C[a, b] = P(b chosen | a chosen) = n(a and b) / n(a) over the positions.

    OLMoE's co-activation (sec. 5.4): how often expert b joins expert a in the same top-k.  Rows of
    experts never chosen are 0; the diagonal (P(a | a) = 1) is set to ``diagonal`` so that a heatmap
    shows only pairs.  Not symmetric: C[a, b] n(a) = C[b, a] n(b).
    Hand-written (one matrix product of the chosen-expert indicators).
    """
    chosen = _chosen_mask(topk_ids, num_experts).astype(np.float64)
    together = chosen.T @ chosen
    n = np.diag(together).copy()
    out = np.divide(together, n[:, None], out=np.zeros_like(together), where=n[:, None] > 0)
    np.fill_diagonal(out, diagonal)
    return out


def jaccard_per_position(topk_a: np.ndarray, topk_b: np.ndarray) -> np.ndarray:
    """J(x) = |S_a(x) ∩ S_b(x)| / |S_a(x) ∪ S_b(x)| of each position's expert sets in two layers.

    Hand-written per position (sklearn's ``jaccard_score(average="samples")`` gives only the mean)."""
    a, b = _as_ids(topk_a), _as_ids(topk_b)
    if len(a) != len(b):
        raise ValueError(f"layers must cover the same positions, got {len(a)} and {len(b)}")
    num_experts = 1 + max(int(a.max()) if a.size else 0, int(b.max()) if b.size else 0)
    ma, mb = _chosen_mask(a, num_experts), _chosen_mask(b, num_experts)
    union = (ma | mb).sum(axis=1)
    return np.divide((ma & mb).sum(axis=1), union, out=np.zeros(len(a)), where=union > 0)


def cross_layer_consistency(topk_a: np.ndarray, topk_b: np.ndarray) -> float:
    """Mean over positions of the Jaccard index of a token's expert sets in two routed layers.

    consistency = mean_x |S_a(x) ∩ S_b(x)| / |S_a(x) ∪ S_b(x)|, S_l(x) the top-k of x in layer l
    (expert ids compared by index, as OLMoE's cross-layer routing analysis does).  1 when every token
    goes to the same experts in both layers; for independent uniform top-k of E it is about the
    expected Jaccard of two random k-sets.  Uses ``sklearn.metrics.jaccard_score(average="samples")``.
    """
    a, b = _as_ids(topk_a), _as_ids(topk_b)
    if len(a) != len(b):
        raise ValueError(f"layers must cover the same positions, got {len(a)} and {len(b)}")
    if len(a) == 0:
        return 0.0
    # at least 2 columns: sklearn reads a one-column indicator as binary labels, not as sets
    num_experts = max(2, 1 + max(int(a.max()), int(b.max())))
    return float(
        jaccard_score(_chosen_mask(a, num_experts), _chosen_mask(b, num_experts), average="samples", zero_division=1.0)
    )


def cross_layer_consistency_chain(topk_by_layer: Sequence[np.ndarray]) -> list[float]:
    """``cross_layer_consistency`` of each pair of consecutive routed layers (same positions, in order)."""
    return [cross_layer_consistency(a, b) for a, b in zip(topk_by_layer, topk_by_layer[1:])]


# --------------------------------------------------------------------------- weight collapse


# DESIGN.md's "nearly dead" expert: slot share below 0.1 / E. Per-slot ratios skip such experts.
NEARLY_DEAD_SHARE = 0.1


def weight_collapse_indicators(
    probs: np.ndarray | None, topk_ids: np.ndarray, combine: np.ndarray | None = None
) -> dict:
    """Slot view against weight views of one layer (JSON friendly).

    * ``slots`` f, ``importance`` P (mean routing distribution; None without probs) and ``weight``
      w (``weight_load(combine)``; None without combine or when nothing is weighted);
    * per weight view v in (importance, weight): ``{view}_per_slot`` = max_i v_i / f_i over experts
      with f_i >= 0.1 / E (1 when every expert gets as much weight as slots; at most k for the
      combine weight), ``{view}_displacement`` = 1/2 sum_i |v_i - f_i| (total variation distance;
      0 when weight and slots agree), ``{view}_max_ratio`` = max_i v_i / max_i f_i and
      ``{view}_spread_ratio`` = exp(H(v)) / exp(H(f)) (effective experts by weight over effective
      experts by slots: 1 when they agree, small when the weight sits on fewer experts);
    * ``effective_by_slots``, ``effective_by_importance``, ``effective_by_weight``.
    """
    if probs is None and combine is None:
        raise ValueError("need probs or combine")
    num_experts = np.shape(probs if probs is not None else combine)[1]
    f = slot_load(topk_ids, num_experts)
    views = {
        "importance": None if probs is None else _distribution(probs).mean(axis=0),
        "weight": None if combine is None else weight_load(combine),
    }
    return _indicators(f, views)


def _indicators(f: np.ndarray, views: Mapping[str, np.ndarray | None]) -> dict:
    f = np.asarray(f, dtype=np.float64)
    out = {"slots": f.tolist(), "effective_by_slots": effective_count(f)}
    for name, v in views.items():
        v = None if v is None else _shares(v)
        if v is not None and v.sum() == 0:
            v = None
        out[name] = None if v is None else v.tolist()
        out[f"effective_by_{name}"] = None if v is None else effective_count(v)
        keep = f >= NEARLY_DEAD_SHARE / len(f)
        out[f"{name}_per_slot"] = None if v is None or not keep.any() else float(np.max(v[keep] / f[keep]))
        out[f"{name}_displacement"] = None if v is None else 0.5 * float(np.abs(v - f).sum())
        out[f"{name}_max_ratio"] = None if v is None or f.max() == 0 else float(v.max() / f.max())
        out[f"{name}_spread_ratio"] = (
            None if v is None or out["effective_by_slots"] == 0 else effective_count(v) / out["effective_by_slots"]
        )
    return out


# --------------------------------------------------------------------------- one layer


def layer_measures(
    probs: np.ndarray,
    topk_ids: np.ndarray,
    combine: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    top_n: int = 1,
) -> dict:
    """The measures of this module for one layer, JSON friendly: per-label LIMoE entropies (with
    ``labels``), top-N coverage of the slot load, expert diversity, dead-expert fraction, the slot
    and weight loads, co-activation, and the weight-collapse indicators."""
    p = _distribution(probs)
    E = p.shape[1]
    f = slot_load(topk_ids, E)
    out = {
        "local_entropy": local_entropy(p),
        "global_entropy": global_entropy(p),
        "expert_token_mi": expert_token_mi(p),
        "by_label": None if labels is None else modality_entropies(p, labels),
        "top_n": int(top_n),
        "top_n_coverage": top_n_coverage(f, top_n),
        "expert_diversity": expert_diversity(f),
        "dead_expert_fraction": dead_expert_fraction(f),
        "load_slots": f.tolist(),
        "load_weight": None if combine is None else weight_load(combine).tolist(),
        "co_activation": co_activation(topk_ids, E).tolist(),
        "weight_collapse": weight_collapse_indicators(p, topk_ids, combine),
    }
    return out

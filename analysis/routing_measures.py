"""The routing measures the MoE literature uses, and three verdict rules that read them.

Pure functions on numpy arrays (no pandas, no torch, no streamlit, no file I/O), for one routed layer
with T positions, E experts and top-k routing:

* ``probs``    float [T, E]  the gate's recorded scores (softmax, or sigmoid: they are normalised
  over the experts here, p = probs / sum_e probs, as ``analysis.routing.routing_distribution`` does)
* ``topk_ids`` int   [T, k]  the experts the gate chose, column 0 the top-1
* ``combine``  float [T, E]  the weight really applied to each expert's output (0 where unused)
* ``labels``   any   [T]     a categorical label per position (modality, position kind, ...)

Entropies and mutual information are in nats.  Where a measure is hand-written it says why (no
maintained library computes it); otherwise it calls scipy or scikit-learn.

This module deliberately imports nothing from ``analysis`` (neither ``analysis.routing`` nor
``analysis.verdict``), so that ``analysis.verdict`` can import the rules below into its verdict
without an import cycle.

Rules (drop-ins for ``analysis.verdict.verdict``, re-exported as ``analysis.routing.verdict``: each returns ``None`` or ``(level, reason)`` with
level "warning" | "collapsed" and a lowercase reason that quotes its numbers, like routing's clauses):

* ``weight_collapse_finding`` / ``weight_collapse_clause``: top-k spreads the *slots* evenly while the
  router importance or the combine weight sits on one or two experts;
* ``position_dependence_finding``: the top-1 expert follows the position index, not the content;
* ``batch_dependence_finding``: the same example gets other combine weights alone than in a batch.

Their thresholds live in one place, ``FINDING_THRESHOLDS`` (a frozen ``FindingThresholds``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import entropy as _entropy
from sklearn.metrics import jaccard_score

__all__ = [
    "FINDING_THRESHOLDS",
    "FindingThresholds",
    "batch_change",
    "batch_dependence_finding",
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
    "position_dependence",
    "position_dependence_finding",
    "router_saturation",
    "slot_load",
    "slot_and_weight_load",
    "top_n_coverage",
    "weight_collapse_clause",
    "weight_collapse_finding",
    "weight_collapse_from_summary",
    "weight_collapse_indicators",
    "weight_load",
]


# --------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class FindingThresholds:
    """Every threshold of the three rules of this module, in one place.

    Numbers are quoted for the families the dashboard serves (E = 4 experts, top-1..3).
    """

    weight_per_slot_warning: float = 1.5
    """Weight collapse, concentration: warning when some expert's share of the weight view v
    (router importance, or combine weight) is at least 1.5x its own share of the routing slots,
    v_i / f_i >= 1.5 (over experts that are not nearly dead by slots, f_i >= 0.1 / E), and the
    heaviest expert by weight is heavier than the busiest by slots (the weight concentrates; weight
    spread more evenly than the slots is no collapse).  For the combine weight v_i / f_i is at most
    k (the expert takes the whole weight of every position that chooses it) and is about 1 for a
    healthy gate.  The ``mmoe-balanced`` demo's ``image_intra`` (slots 29/23/24/24%, importance
    11/10/47/33%) gives 1.94 for expert 2 (0.47 / 0.24, the shares normalised to sum to 1)."""

    weight_spread_ratio_warning: float = 0.75
    """Weight collapse, spread: warning when the effective number of experts by weight,
    exp(H(weight shares)), is at most 0.75x the effective number by slots, exp(H(f)): the weight
    is spread over a quarter fewer experts than the slots say (4 -> 3)."""

    weight_spread_ratio_collapse: float = 0.6
    """... collapsed at 0.6x or below (4 -> 2.4: the weight sits on about two experts while the
    slots name four).  Two experts of four holding 98% of the weight under top-3 gives ~0.58."""

    starved_weight_share: float = 0.1
    """An expert is *starved* when top-k still gives it slots (f_i >= 0.1 / E, i.e. it is not
    nearly dead by slots, which routing's verdict already says) but its share of the combine weight
    (or importance) is below 0.1 / E and above 0 (exactly 0 is routing's "never gets combine
    weight"): it is chosen, yet contributes almost nothing."""

    starved_experts_collapse: float = 0.5
    """Collapsed when at least half of the E experts are starved (the same share as routing's
    ``unused_experts_collapse``); one or more starved experts is a warning."""

    min_expert_slots: float = 20.0
    """The concentration and starved tests consider an expert only when it holds at least 20 routing
    slots (T * k * f_i >= 20, when the slot count is known): over fewer, a ratio of weight to slots is
    sampling noise (64 experts, top-8, 100 positions: 12.5 slots each, ratios up to 2.6 by chance)."""

    position_explained_warning: float = 0.75
    """Position dependence: warning when the position index alone explains at least 75% of the
    top-1 expert's entropy (chance-corrected uncertainty coefficient, see
    ``position_dependence``).  Content-driven routing that merely correlates with position (image
    edges are often background) stays well below; a gate that routes by position reaches ~1."""

    position_min_rows_per_position: float = 5.0
    """Position dependence is judged only when positions recur: at least 5 rows per position on
    average (e.g. 5 examples of the same length).  Below, the rule says nothing."""

    batch_change_warning: float = 0.01
    """Batch dependence: warning when any combine weight changes by more than 0.01 between the same
    example run alone and in a batch.  A per-position gate changes by 0 (float noise is ~1e-6)."""


FINDING_THRESHOLDS = FindingThresholds()


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
    return {"slots": slot_load(topk_ids, combine.shape[1]).tolist(),
            "weight": weight_load(combine).tolist()}


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
        out[key] = {"local": local, "global": glob, "mi": max(0.0, glob - local),
                    "positions": int(len(rows))}
    return out


# --------------------------------------------------------------------------- saturation (OLMoE)


def router_saturation(snapshot_topk: Sequence[np.ndarray] | np.ndarray, final_topk: np.ndarray,
                      k: int | None = None, num_experts: int | None = None) -> np.ndarray:
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
        num_experts = 1 + max([int(final.max()) if final.size else 0]
                              + [int(s.max()) for s in snaps if s.size])
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
    return float(jaccard_score(_chosen_mask(a, num_experts), _chosen_mask(b, num_experts),
                               average="samples", zero_division=1.0))


def cross_layer_consistency_chain(topk_by_layer: Sequence[np.ndarray]) -> list[float]:
    """``cross_layer_consistency`` of each pair of consecutive routed layers (same positions, in order)."""
    return [cross_layer_consistency(a, b) for a, b in zip(topk_by_layer, topk_by_layer[1:])]


# --------------------------------------------------------------------------- weight collapse


def weight_collapse_indicators(probs: np.ndarray | None, topk_ids: np.ndarray,
                               combine: np.ndarray | None = None) -> dict:
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
    views = {"importance": None if probs is None else _distribution(probs).mean(axis=0),
             "weight": None if combine is None else weight_load(combine)}
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
        keep = f >= FINDING_THRESHOLDS.starved_weight_share / len(f)
        out[f"{name}_per_slot"] = (None if v is None or not keep.any()
                                   else float(np.max(v[keep] / f[keep])))
        out[f"{name}_displacement"] = None if v is None else 0.5 * float(np.abs(v - f).sum())
        out[f"{name}_max_ratio"] = None if v is None or f.max() == 0 else float(v.max() / f.max())
        out[f"{name}_spread_ratio"] = (None if v is None or out["effective_by_slots"] == 0
                                       else effective_count(v) / out["effective_by_slots"])
    return out


_LEVEL = {"warning": 1, "collapsed": 2}


def _view_finding(name: str, f: np.ndarray, v: np.ndarray, t: FindingThresholds,
                  num_slots: float | None):
    """(severity, largest weight-per-slot ratio, phrases, short) of one weight view, or None."""
    E = len(f)
    what = "router importance" if name == "importance" else "combine weight"
    n_f, n_v = effective_count(f), effective_count(v)
    spread = n_v / n_f
    floor = t.starved_weight_share / E
    judged = f >= floor
    if num_slots is not None:
        judged &= f * num_slots >= t.min_expert_slots
    ratio = np.divide(v, f, out=np.zeros_like(v), where=judged)
    heavy = int(np.argmax(ratio))
    # 0 < v_i: an expert with no weight at all is routing's "never gets combine weight" clause
    starved = [i for i in range(E) if judged[i] and 0 < v[i] < floor]
    severity, parts = 0, []
    if ratio[heavy] >= t.weight_per_slot_warning and v.max() > f.max():
        severity = 1
        parts.append(f"expert {heavy} gets {_pct(v[heavy])} of the {what} for {_pct(f[heavy])} of "
                     f"slots ({ratio[heavy]:.2f}x)")
    if spread <= t.weight_spread_ratio_warning:
        severity = max(severity, 2 if spread <= t.weight_spread_ratio_collapse else 1)
        top = [i for i in range(E) if v[i] > 1 / E]  # above their fair share
        parts.append(f"the {what} spreads over only {n_v:.2f} effective experts ({spread:.2f}x "
                     f"the slots'), most of it on "
                     f"{'expert' if len(top) == 1 else 'experts'} {_ids_text(top)}")
    if starved:
        many = len(starved) >= t.starved_experts_collapse * E
        severity = max(severity, 2 if many else 1)
        noun = "expert" if len(starved) == 1 else "experts"
        parts.append(f"{len(starved)} starved {noun} ({_ids_text(starved)}: "
                     f"{', '.join(_pct(f[i]) for i in starved)} of slots but "
                     f"{', '.join(_pct(v[i]) for i in starved)} of the {what})")
    if not severity:
        return None
    short = f"the {what} agrees ({n_v:.2f} effective experts, at most {_pct(v.max())} on one)"
    return severity, float(ratio[heavy]), parts, short


def weight_collapse_clause(load: Sequence[float], importance: Sequence[float] | None = None,
                           weight_share: Sequence[float] | None = None,
                           thresholds: FindingThresholds = FINDING_THRESHOLDS,
                           num_slots: float | None = None):
    """The weight-collapse rule on share vectors: ``None`` or ``(level, reason)``.

    Under top-k (k >= 2) every position names k experts, so the slot load f can stay even while the
    router importance P (mean routing distribution) or the combine weight share w concentrates on one
    or two experts; slot-based indicators (max-load ratio, load CV, dead experts) then say healthy.
    For each available weight view v in (P, w), against f:

    * concentration  max_i v_i / f_i >= ``weight_per_slot_warning`` (1.5), over experts with
                     f_i >= 0.1/E, and max_i v_i > max_i f_i (the weight concentrates)   -> warning
    * spread         exp(H(v)) / exp(H(f)) <= ``weight_spread_ratio_warning`` (0.75)       -> warning,
                                           <= ``weight_spread_ratio_collapse`` (0.6)       -> collapsed
    * starved        experts with f_i >= 0.1/E but 0 < v_i < 0.1/E (``starved_weight_share``): any
                     -> warning,
                     at least half of E (``starved_experts_collapse``)                     -> collapsed

    ``num_slots`` (T * k), when given, leaves experts with fewer than ``min_expert_slots`` slots out
    of the concentration and starved tests.  The worst view (ties: the larger weight-per-slot
    ratio) sets the level and is quoted in full; the other view, when it fires too, is summarised
    ("the router importance agrees (...)").  The reason reads like the clauses of
    ``analysis.verdict.verdict``.  ``None`` when E < 2, without a weight view, or when nothing fires.
    """
    f = _shares(load)
    E = len(f)
    if E < 2 or f.sum() == 0:
        return None
    found = []
    for name, v in (("weight", weight_share), ("importance", importance)):
        if v is None:
            continue
        v = _shares(v)
        if len(v) != E:
            raise ValueError(f"{name} has {len(v)} experts, load {E}")
        if v.sum() == 0:
            continue
        hit = _view_finding(name, f, v, thresholds, num_slots)
        if hit:
            found.append(hit)
    if not found:
        return None
    found.sort(key=lambda h: (-h[0], -h[1]))
    level = "collapsed" if found[0][0] == 2 else "warning"
    slots = (f"the slots name {effective_count(f):.2f} effective experts of {E} "
             f"(at most {_pct(f.max())} each)")
    parts = found[0][2] + [h[3] for h in found[1:]]
    return level, f"weight collapse under top-k: {slots} but " + "; ".join(parts)


def weight_collapse_finding(probs: np.ndarray | None, topk_ids: np.ndarray,
                            combine: np.ndarray | None = None,
                            thresholds: FindingThresholds = FINDING_THRESHOLDS):
    """``weight_collapse_clause`` from a layer's arrays: ``None`` or ``(level, reason)``.

    Example (the issue's ``mmoe-balanced`` ``image_intra``): slots 0.29/0.23/0.24/0.24 with router
    importance 0.11/0.10/0.47/0.33 gives ("warning", "... expert 2 gets 47% of the router importance
    for 24% of slots (1.94x)").  Even slots with even weight give ``None``.
    """
    ind = weight_collapse_indicators(probs, topk_ids, combine)
    return weight_collapse_clause(ind["slots"], ind["importance"], ind["weight"], thresholds,
                                  num_slots=_as_ids(topk_ids).size)


def weight_collapse_from_summary(summary: Mapping, thresholds: FindingThresholds = FINDING_THRESHOLDS):
    """``weight_collapse_clause`` from an ``analysis.routing.layer_summary`` dict (its ``load``,
    ``importance``, ``weight_share``, ``num_positions`` and ``top_k``): the form
    ``analysis.verdict.verdict`` can call."""
    slots = (summary["num_positions"] * summary["top_k"]
             if "num_positions" in summary and "top_k" in summary else None)
    return weight_collapse_clause(summary["load"], summary.get("importance"),
                                  summary.get("weight_share"), thresholds, num_slots=slots)


# --------------------------------------------------------------------------- position dependence


def _codes(values: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(values), return_inverse=True)[1].ravel()


def _entropy_of_codes(*codes: np.ndarray) -> float:
    """H of the joint distribution of integer codings (nats), from one bincount."""
    joint = np.zeros(len(codes[0]), dtype=np.int64)
    for c in codes:
        joint = joint * (int(c.max()) + 1) + c
    return float(_entropy(np.bincount(_codes(joint))))


def _conditional_mi(e: np.ndarray, q: np.ndarray, g: np.ndarray) -> float:
    """I(e; q | g) = H(e, g) + H(q, g) - H(e, q, g) - H(g) (nats): hand-written, since neither
    scipy nor sklearn offers conditional mutual information.  With one group it is I(e; q), which
    equals ``sklearn.metrics.mutual_info_score``."""
    return max(0.0, _entropy_of_codes(e, g) + _entropy_of_codes(q, g) - _entropy_of_codes(e, q, g)
               - _entropy_of_codes(g))


def _shuffle_within(q: np.ndarray, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """q with its values permuted at random inside each group of g."""
    grouped = np.argsort(g, kind="stable")
    shuffled = np.lexsort((rng.random(len(q)), g))
    out = np.empty_like(q)
    out[grouped] = q[shuffled]
    return out


def position_dependence(topk_ids: np.ndarray, positions: np.ndarray, kinds: np.ndarray | None = None,
                        n_shuffles: int = 20, seed: int = 0) -> dict[str, float]:
    """How much of the top-1 expert the position index alone explains.

    With e the top-1 expert, q the position and g the position kind (CLS / text token / image patch;
    None: one kind): MI = I(e; q | g), H = H(e | g), U = MI / H (Theil's uncertainty coefficient:
    the share of the expert's entropy the position explains beyond the kind), and the
    chance-corrected U_adj = (MI - MI_0) / (H - MI_0), MI_0 the mean MI over ``n_shuffles``
    shuffles of the positions within each kind (finite samples bias MI upward, most when positions
    are many and rows per position few).  Conditioning on the kind keeps "CLS goes to its own
    expert" (CLS is always position 0) from reading as position dependence.  U_adj ~ 0 for
    content-driven routing, 1 when the position determines the expert.  Returns ``{"mi",
    "expert_entropy", "u", "u_adjusted", "shuffled_mi", "rows_per_position"}``.  Hand-written:
    sklearn's ``adjusted_mutual_info_score`` neither conditions on a third variable nor normalises
    by H(e) alone.
    """
    top1 = _as_ids(topk_ids)[:, 0]
    positions = np.asarray(positions).ravel()
    if len(positions) != len(top1):
        raise ValueError(f"positions has {len(positions)} entries, topk_ids {len(top1)} rows")
    kinds = np.zeros(len(top1), dtype=np.int64) if kinds is None else np.asarray(kinds).ravel()
    if len(kinds) != len(top1):
        raise ValueError(f"kinds has {len(kinds)} entries, topk_ids {len(top1)} rows")
    out = {"mi": 0.0, "expert_entropy": 0.0, "u": 0.0, "u_adjusted": 0.0, "shuffled_mi": 0.0,
           "rows_per_position": 0.0}
    if len(top1) == 0:
        return out
    e, q, g = _codes(top1), _codes(positions), _codes(kinds)
    out["rows_per_position"] = len(q) / len(np.unique(_codes(q * (int(g.max()) + 1) + g)))
    h = max(0.0, _entropy_of_codes(e, g) - _entropy_of_codes(g))
    out["expert_entropy"] = h
    if h <= 1e-12:
        return out  # one expert per kind: nothing for the position to explain
    mi = _conditional_mi(e, q, g)
    rng = np.random.default_rng(seed)
    mi0 = (float(np.mean([_conditional_mi(e, _shuffle_within(q, g, rng), g) for _ in range(n_shuffles)]))
           if n_shuffles else 0.0)
    out.update(mi=mi, u=mi / h, shuffled_mi=mi0,
               u_adjusted=float(np.clip((mi - mi0) / (h - mi0), 0.0, 1.0)) if h > mi0 else 0.0)
    return out


def position_dependence_finding(topk_ids: np.ndarray, positions: np.ndarray,
                                thresholds: FindingThresholds = FINDING_THRESHOLDS,
                                kinds: np.ndarray | None = None, **kwargs):
    """``None`` or ("warning", reason) when the position explains at least
    ``position_explained_warning`` of the top-1 expert's entropy within each position kind
    (``position_dependence``'s U_adj), judged only when positions recur
    (``position_min_rows_per_position`` rows each on average)."""
    d = position_dependence(topk_ids, positions, kinds, **kwargs)
    t = thresholds
    if d["rows_per_position"] < t.position_min_rows_per_position:
        return None
    if d["u_adjusted"] < t.position_explained_warning:
        return None
    return "warning", (f"position-dependent routing: the position index alone explains "
                       f"{_pct(d['u_adjusted'])} of the top-1 choice (chance-corrected; MI "
                       f"{d['mi']:.2f} of {d['expert_entropy']:.2f} nats; limit "
                       f"{_pct(t.position_explained_warning)})")


# --------------------------------------------------------------------------- batch dependence


def batch_change(combine_alone: np.ndarray, combine_in_batch: np.ndarray,
                 tol: float = FINDING_THRESHOLDS.batch_change_warning) -> dict[str, float]:
    """|c_alone - c_batch| of the same positions' combine weights (alone vs in a batch).

    Returns ``{"mean_abs_change", "max_abs_change", "changed_fraction"}``: the first two over all
    (position, expert) entries as ``analysis.routing.batch_dependence`` gives them, and the share of
    positions whose largest change exceeds ``tol``."""
    a = np.asarray(combine_alone, dtype=np.float64)
    b = np.asarray(combine_in_batch, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return {"mean_abs_change": 0.0, "max_abs_change": 0.0, "changed_fraction": 0.0}
    change = np.abs(a - b)
    return {"mean_abs_change": float(change.mean()), "max_abs_change": float(change.max()),
            "changed_fraction": float(np.mean(change.reshape(len(a), -1).max(axis=1) > tol))}


def batch_dependence_finding(combine_alone: np.ndarray | None, combine_in_batch: np.ndarray,
                             thresholds: FindingThresholds = FINDING_THRESHOLDS):
    """``None`` or ("warning", reason) when some combine weight changes by more than
    ``batch_change_warning`` between the same example alone and in a batch (``None`` also when
    ``combine_alone`` is unknown)."""
    if combine_alone is None:
        return None
    t = thresholds
    c = batch_change(combine_alone, combine_in_batch, t.batch_change_warning)
    if c["max_abs_change"] <= t.batch_change_warning:
        return None
    return "warning", (f"batch-dependent gate: the combine weights of the same example change when "
                       f"it runs in a batch (mean |change| {c['mean_abs_change']:.3f}, max "
                       f"{c['max_abs_change']:.2f}; {_pct(c['changed_fraction'])} of positions change "
                       f"by more than {t.batch_change_warning:g})")


# --------------------------------------------------------------------------- one layer


def layer_measures(probs: np.ndarray, topk_ids: np.ndarray, combine: np.ndarray | None = None,
                   labels: np.ndarray | None = None, top_n: int = 1) -> dict:
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

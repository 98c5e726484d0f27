"""Verdict rules that read the routing measures: weight collapse, position and batch dependence.

Drop-ins for ``analysis.verdict.verdict``: each returns ``None`` or ``(level, reason)`` with level
"warning" | "collapsed" and a lowercase reason that quotes its numbers, like the verdict's clauses:

* ``weight_collapse_finding`` / ``weight_collapse_clause``: top-k spreads the *slots* evenly while the
  router importance or the combine weight sits on one or two experts;
* ``position_dependence_finding``: the top-1 expert follows the position index, not the content;
* ``batch_dependence_finding``: the same example gets other combine weights alone than in a batch.

Their thresholds live in one place, ``FINDING_THRESHOLDS`` (a frozen ``FindingThresholds``), reached
from the verdict's own ``THRESHOLDS.weight_collapse``. Imports nothing from ``analysis`` but the
measures, so the verdict can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from analysis.lazy_stats import entropy as _entropy
from analysis.routing_measures import (
    NEARLY_DEAD_SHARE,
    _as_ids,
    _ids_text,
    _pct,
    _shares,
    effective_count,
    weight_collapse_indicators,
)

__all__ = [
    "FINDING_THRESHOLDS",
    "FindingThresholds",
    "batch_change",
    "batch_dependence_finding",
    "position_dependence",
    "position_dependence_finding",
    "weight_collapse_clause",
    "weight_collapse_finding",
    "weight_collapse_from_summary",
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

    starved_weight_share: float = NEARLY_DEAD_SHARE
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


_LEVEL = {"warning": 1, "collapsed": 2}


def _view_finding(name: str, f: np.ndarray, v: np.ndarray, t: FindingThresholds, num_slots: float | None):
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
        parts.append(
            f"expert {heavy} gets {_pct(v[heavy])} of the {what} for {_pct(f[heavy])} of slots ({ratio[heavy]:.2f}x)"
        )
    if spread <= t.weight_spread_ratio_warning:
        severity = max(severity, 2 if spread <= t.weight_spread_ratio_collapse else 1)
        top = [i for i in range(E) if v[i] > 1 / E]  # above their fair share
        parts.append(
            f"the {what} spreads over only {n_v:.2f} effective experts ({spread:.2f}x "
            f"the slots'), most of it on "
            f"{'expert' if len(top) == 1 else 'experts'} {_ids_text(top)}"
        )
    if starved:
        many = len(starved) >= t.starved_experts_collapse * E
        severity = max(severity, 2 if many else 1)
        noun = "expert" if len(starved) == 1 else "experts"
        parts.append(
            f"{len(starved)} starved {noun} ({_ids_text(starved)}: "
            f"{', '.join(_pct(f[i]) for i in starved)} of slots but "
            f"{', '.join(_pct(v[i]) for i in starved)} of the {what})"
        )
    if not severity:
        return None
    short = f"the {what} agrees ({n_v:.2f} effective experts, at most {_pct(v.max())} on one)"
    return severity, float(ratio[heavy]), parts, short


def weight_collapse_clause(
    load: Sequence[float],
    importance: Sequence[float] | None = None,
    weight_share: Sequence[float] | None = None,
    thresholds: FindingThresholds = FINDING_THRESHOLDS,
    num_slots: float | None = None,
):
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
    slots = f"the slots name {effective_count(f):.2f} effective experts of {E} (at most {_pct(f.max())} each)"
    parts = found[0][2] + [h[3] for h in found[1:]]
    return level, f"weight collapse under top-k: {slots} but " + "; ".join(parts)


def weight_collapse_finding(
    probs: np.ndarray | None,
    topk_ids: np.ndarray,
    combine: np.ndarray | None = None,
    thresholds: FindingThresholds = FINDING_THRESHOLDS,
):
    """``weight_collapse_clause`` from a layer's arrays: ``None`` or ``(level, reason)``.

    Example (the issue's ``mmoe-balanced`` ``image_intra``): slots 0.29/0.23/0.24/0.24 with router
    importance 0.11/0.10/0.47/0.33 gives ("warning", "... expert 2 gets 47% of the router importance
    for 24% of slots (1.94x)").  Even slots with even weight give ``None``.
    """
    ind = weight_collapse_indicators(probs, topk_ids, combine)
    return weight_collapse_clause(
        ind["slots"], ind["importance"], ind["weight"], thresholds, num_slots=_as_ids(topk_ids).size
    )


def weight_collapse_from_summary(summary: Mapping, thresholds: FindingThresholds = FINDING_THRESHOLDS):
    """``weight_collapse_clause`` from an ``analysis.routing.layer_summary`` dict (its ``load``,
    ``importance``, ``weight_share``, ``num_positions`` and ``top_k``): the form
    ``analysis.verdict.verdict`` can call."""
    slots = summary["num_positions"] * summary["top_k"] if "num_positions" in summary and "top_k" in summary else None
    return weight_collapse_clause(
        summary["load"], summary.get("importance"), summary.get("weight_share"), thresholds, num_slots=slots
    )


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
    return max(
        0.0, _entropy_of_codes(e, g) + _entropy_of_codes(q, g) - _entropy_of_codes(e, q, g) - _entropy_of_codes(g)
    )


def _shuffle_within(q: np.ndarray, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """q with its values permuted at random inside each group of g."""
    grouped = np.argsort(g, kind="stable")
    shuffled = np.lexsort((rng.random(len(q)), g))
    out = np.empty_like(q)
    out[grouped] = q[shuffled]
    return out


def position_dependence(
    topk_ids: np.ndarray, positions: np.ndarray, kinds: np.ndarray | None = None, n_shuffles: int = 20, seed: int = 0
) -> dict[str, float]:
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
    out = {"mi": 0.0, "expert_entropy": 0.0, "u": 0.0, "u_adjusted": 0.0, "shuffled_mi": 0.0, "rows_per_position": 0.0}
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
    mi0 = (
        float(np.mean([_conditional_mi(e, _shuffle_within(q, g, rng), g) for _ in range(n_shuffles)]))
        if n_shuffles
        else 0.0
    )
    out.update(
        mi=mi,
        u=mi / h,
        shuffled_mi=mi0,
        u_adjusted=float(np.clip((mi - mi0) / (h - mi0), 0.0, 1.0)) if h > mi0 else 0.0,
    )
    return out


def position_dependence_finding(
    topk_ids: np.ndarray,
    positions: np.ndarray,
    thresholds: FindingThresholds = FINDING_THRESHOLDS,
    kinds: np.ndarray | None = None,
    **kwargs,
):
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
    return "warning", (
        f"position-dependent routing: the position index alone explains "
        f"{_pct(d['u_adjusted'])} of the top-1 choice (chance-corrected; MI "
        f"{d['mi']:.2f} of {d['expert_entropy']:.2f} nats; limit "
        f"{_pct(t.position_explained_warning)})"
    )


# --------------------------------------------------------------------------- batch dependence


def batch_change(
    combine_alone: np.ndarray, combine_in_batch: np.ndarray, tol: float = FINDING_THRESHOLDS.batch_change_warning
) -> dict[str, float]:
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
    return {
        "mean_abs_change": float(change.mean()),
        "max_abs_change": float(change.max()),
        "changed_fraction": float(np.mean(change.reshape(len(a), -1).max(axis=1) > tol)),
    }


def batch_dependence_finding(
    combine_alone: np.ndarray | None, combine_in_batch: np.ndarray, thresholds: FindingThresholds = FINDING_THRESHOLDS
):
    """``None`` or ("warning", reason) when some combine weight changes by more than
    ``batch_change_warning`` between the same example alone and in a batch (``None`` also when
    ``combine_alone`` is unknown)."""
    if combine_alone is None:
        return None
    t = thresholds
    c = batch_change(combine_alone, combine_in_batch, t.batch_change_warning)
    if c["max_abs_change"] <= t.batch_change_warning:
        return None
    return "warning", (
        f"batch-dependent gate: the combine weights of the same example change when "
        f"it runs in a batch (mean |change| {c['mean_abs_change']:.3f}, max "
        f"{c['max_abs_change']:.2f}; {_pct(c['changed_fraction'])} of positions change "
        f"by more than {t.batch_change_warning:g})"
    )

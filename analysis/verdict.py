"""The per-layer verdict: healthy / warning / collapsed, with a reason that quotes the numbers.

``verdict(summary)`` reads one :func:`analysis.routing.layer_summary` dict and applies the thresholds
of :data:`THRESHOLDS` (one frozen :class:`Thresholds`, the only place they live). Every rule that fires
adds a clause; the worst clause sets the verdict. Tested on constructed routing patterns
(tests/test_routing_metrics.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from analysis.routing_findings import FINDING_THRESHOLDS, FindingThresholds, weight_collapse_from_summary

__all__ = ["THRESHOLDS", "Thresholds", "verdict"]


@dataclass(frozen=True)
class Thresholds:
    """Every threshold the verdict uses, in one place.

    The verdict is k-aware: under top-k routing each position picks k *distinct* experts, so an
    expert can hold at most 1/k of the routing slots, the max-load ratio is at most E/k and the
    load CV at most sqrt(E/k - 1).  Absolute limits that make sense for top-1 would never fire
    for top-3 of 4 (max-load ratio can never exceed 1.33 there), so the load limits are
    "the absolute limit, or a fraction of the way to what top-k allows, whichever is stricter".

    Numbers below are quoted for the families the dashboard serves (E = 4, k = 1..3).
    """

    nearly_dead_share: float = 0.1
    """An expert is *nearly dead* when 0 < f_i < nearly_dead_share / E, i.e. it receives less
    than a tenth of its fair share of routing slots: it barely trains and barely contributes."""

    unused_experts_collapse: float = 0.5
    """Collapsed when at least this fraction of the E experts does no work (dead, nearly dead
    or never weighted): half the layer's capacity is wasted and routing degenerates to a choice
    among the few survivors.  This is why "two experts of four take everything" is *collapsed*.
    With top-3 of 4 at most one expert can be dead, so there a dead expert stays a warning."""

    dominant_share_collapse: float = 0.9
    """Collapsed when one expert takes at least this share of the routing slots (only possible
    for top-1: with k >= 2 no expert can hold more than 1/k of the slots) or of the total combine
    weight (possible for any k: the renormalised weights concentrate on one expert even when
    top-k must name k of them).  At 90% the other experts only see a sliver of the data."""

    effective_spread_collapse: float = 0.2
    """Collapsed when the effective number of experts exp(H(P)) sits in the bottom 20% of its
    range [1, E], i.e. (eff - 1) / (E - 1) <= 0.2.  For E = 4 this is eff <= 1.6, the
    effective_experts_ratio <= 0.4 of the design notes: the mean router distribution is closer
    to one expert than to two.  Measured on the span [1, E] rather than the ratio eff/E so that
    it can fire for E = 2 too (eff/E can never be below 1/2 there)."""

    effective_spread_warning: float = 2.0 / 3.0
    """Warning when (eff - 1) / (E - 1) < 2/3; for E = 4 that is fewer than 3 effective experts
    (effective_experts_ratio < 0.75): one or more experts get clearly less router mass."""

    load_cv_warning: float = 0.5
    """Warning when the load CV (std / mean of f) exceeds 0.5 ..."""

    load_cv_warning_of_max: float = 0.5
    """... or half of the largest CV top-k allows, sqrt(E/k - 1), whichever is smaller.
    For top-1 of 4 the limit is 0.5 (about one expert with twice its share); for top-3 of 4 it
    is 0.29, since there the CV cannot exceed 0.58 at all."""

    max_load_ratio_warning: float = 2.0
    """Warning when the busiest expert gets more than twice its fair share of slots ..."""

    max_load_excess_warning: float = 0.5
    """... or is more than half-way from balanced (ratio 1) to what top-k allows (ratio E/k),
    whichever is smaller.  Top-1 of 4: ratio > 2; top-2 of 4: > 1.5 (chosen by 75% of positions
    instead of 50%); top-3 of 4: > 1.17 (chosen by 88% instead of 75%)."""

    unrouted_collapse: float = 0.5
    """Collapsed when at least half of the positions get no expert output at all (all-zero
    combine row): the layer is mostly a pass-through, whatever the router says."""

    unrouted_warning: float = 0.0
    """Warning when any position is unrouted: the standard gate never does this, so any
    occurrence means the gate differs from what top-k reports."""

    outside_topk_warning: float = 0.0
    """Warning when any position puts combine weight on an expert outside its top-k: the
    routing shown by top-k ids is then not the routing that was applied."""

    min_slots_per_expert: float = 5.0
    """Below this many routing slots per expert (T * k / E), a note says the numbers rest on too
    few positions (dead experts are expected by chance).  The note does not change the verdict."""

    weight_collapse: FindingThresholds = FINDING_THRESHOLDS
    """Weight collapse under top-k (slots evenly spread, combine weight / importance on one or two
    experts): the limits of ``analysis.routing_findings.weight_collapse_clause``, kept there beside
    the rule and reached from here so every verdict threshold hangs off one object."""


THRESHOLDS = Thresholds()


_SEVERITY = {"note": 0, "warning": 1, "collapsed": 2}


def _pct(share: float) -> str:
    """Percent with one decimal below 10%, so that small shares do not print as 0%."""
    return f"{100 * share:.1f}%" if 0 < share < 0.1 else f"{100 * share:.0f}%"


def _ids(experts: list[int]) -> str:
    return ", ".join(str(i) for i in experts)


def _experts_phrase(experts: list[int], what: str) -> str:
    """'1 dead expert (3)' / '3 dead experts (0, 1, 3)'."""
    noun = "expert" if len(experts) == 1 else "experts"
    return f"{len(experts)} {what} {noun} ({_ids(experts)})"


def _load_clauses(s: dict, t: Thresholds) -> list[tuple[str, str]]:
    """Dominance / overload of the busiest expert, by slots and by combine weight."""
    E, k = s["num_experts"], s["top_k"]
    load, ratio = np.asarray(s["load"]), s["max_load_ratio"]
    busiest, ratio_max = int(np.argmax(load)), E / k
    clauses = []
    weights = s["weight_share"]
    heavy = int(np.argmax(weights)) if weights else None
    heavy_share = float(np.max(weights)) if weights else 0.0
    weight_dominant = heavy_share >= t.dominant_share_collapse

    slots = f"expert {busiest} takes {_pct(load[busiest])} of routing slots"
    if k > 1:
        slots += f", chosen by {_pct(load[busiest] * k)} of positions"
    if load[busiest] >= t.dominant_share_collapse:
        slots += f" (max-load ratio {ratio:.2f} of {ratio_max:.3g})"
        if weight_dominant and heavy == busiest:
            slots += f" and {_pct(heavy_share)} of the combine weight"
            weight_dominant = False  # said once
        clauses.append(("collapsed", slots))
    else:
        limit = min(t.max_load_ratio_warning, 1 + t.max_load_excess_warning * (ratio_max - 1))
        if k < E and ratio > limit:
            clauses.append(("warning", f"{slots} (max-load ratio {ratio:.2f} > {limit:.3g}; at most {ratio_max:.3g})"))
    if weight_dominant:
        text = f"expert {heavy} carries {_pct(heavy_share)} of the combine weight"
        clauses.append(("collapsed", text))

    cv_limit = min(t.load_cv_warning, t.load_cv_warning_of_max * math.sqrt(max(E / k - 1, 0)))
    if k < E and s["load_cv"] > cv_limit:
        clauses.append(("warning", f"load CV {s['load_cv']:.2f} > {cv_limit:.2f}"))
    return clauses


def _effective_clause(s: dict, t: Thresholds) -> list[tuple[str, str]]:
    E, eff = s["num_experts"], s["effective_experts"]
    if E < 2:
        return []
    spread = (eff - 1) / (E - 1)
    text = f"effective experts {eff:.2f} of {E}"
    if spread <= t.effective_spread_collapse:
        return [("collapsed", text + " (router mass on about one expert)")]
    if spread < t.effective_spread_warning:
        return [("warning", text)]
    return []


def _unused_clauses(s: dict, t: Thresholds) -> list[tuple[str, str]]:
    """Dead, nearly dead and never-weighted experts, named; collapsed when they are many."""
    E, k, load = s["num_experts"], s["top_k"], s["load"]
    dead, nearly = s["dead_experts"], s["nearly_dead_experts"]
    # A dead expert is trivially never weighted; name only those that top-k does pick.
    unweighted = [i for i in (s["experts_never_weighted"] or []) if i not in dead]
    unused = sorted(set(dead) | set(nearly) | set(unweighted))
    if not unused:
        return []
    severity = "collapsed" if len(unused) >= t.unused_experts_collapse * E else "warning"
    clauses = []
    if dead:
        clauses.append((severity, _experts_phrase(dead, "dead")))
    if nearly:
        shares = ", ".join(f"{i}: {_pct(load[i])}" for i in nearly)
        noun = "expert" if len(nearly) == 1 else "experts"
        clauses.append((severity, f"{len(nearly)} nearly dead {noun} ({shares} of slots)"))
    if unweighted:
        one = len(unweighted) == 1
        subject = f"expert {unweighted[0]}" if one else f"experts {_ids(unweighted)}"
        picked = ", ".join(_pct(load[i] * k) for i in unweighted)
        clauses.append(
            (
                severity,
                f"{subject} never {'gets' if one else 'get'} combine weight "
                f"although top-k picks {'it' if one else 'them'} for "
                f"{picked} of positions",
            )
        )
    if severity == "collapsed" and len(clauses) > 1:
        # The collapse comes from the clauses together: say so before listing them.
        clauses.insert(0, (severity, f"{len(unused)} of {E} experts do no work ({_ids(unused)})"))
    used = [i for i in range(E) if load[i] > 0]
    if 1 < k == len(used) < E:
        # The only way k experts can hold every slot: each position picks the same set.
        clauses.append(
            ("warning", f"every position picks the same {k} experts ({_ids(used)}): the top-k choice ignores the input")
        )
    return clauses


def _gate_clauses(s: dict, t: Thresholds) -> list[tuple[str, str]]:
    """Where the combine weights disagree with what top-k reports."""
    clauses = []
    T, unrouted = s["num_positions"], s["unrouted_fraction"]
    if unrouted is not None and unrouted > t.unrouted_warning:
        severity = "collapsed" if unrouted >= t.unrouted_collapse else "warning"
        count = round(unrouted * T)
        clauses.append((severity, f"{_pct(unrouted)} of positions ({count} of {T}) get no expert weight (unrouted)"))
    outside = s["weighted_outside_topk_fraction"]
    if outside is not None and outside > t.outside_topk_warning:
        clauses.append(("warning", f"{_pct(outside)} of positions put combine weight on experts outside their top-k"))
    return clauses


def _sample_note(s: dict, t: Thresholds) -> list[tuple[str, str]]:
    slots_per_expert = s["num_positions"] * s["top_k"] / s["num_experts"]
    if slots_per_expert >= t.min_slots_per_expert:
        return []
    return [
        (
            "note",
            f"only {s['num_positions'] * s['top_k']} routing slots for "
            f"{s['num_experts']} experts: too few to judge reliably",
        )
    ]


def _weight_collapse_clauses(s: dict, t: Thresholds) -> list[tuple[str, str]]:
    found = weight_collapse_from_summary(s, t.weight_collapse)
    return [found] if found else []


def verdict(summary: dict, thresholds: Thresholds = THRESHOLDS) -> tuple[str, str]:
    """("healthy" | "warning" | "collapsed", reason) for one ``layer_summary``.

    Every rule that fires adds a clause quoting its numbers; the worst clause sets the verdict,
    and clauses are listed worst first.  A healthy layer's reason quotes effective experts, load
    CV and max-load ratio.  A note about too few positions never changes the verdict.
    """
    s, t = summary, thresholds
    clauses = (
        _load_clauses(s, t)
        + _effective_clause(s, t)
        + _unused_clauses(s, t)
        + _weight_collapse_clauses(s, t)
        + _gate_clauses(s, t)
        + _sample_note(s, t)
    )
    worst = max((_SEVERITY[severity] for severity, _ in clauses), default=0)
    if worst == 0:
        E, k = s["num_experts"], s["top_k"]
        healthy = (
            f"effective experts {s['effective_experts']:.2f} of {E}, "
            f"load CV {s['load_cv']:.2f}, "
            f"max-load ratio {s['max_load_ratio']:.2f} of {E / k:.3g}, no dead experts"
        )
        clauses = [("healthy", healthy)] + clauses
        label = "healthy"
    else:
        label = "collapsed" if worst == 2 else "warning"
    ordered = sorted(clauses, key=lambda c: -_SEVERITY.get(c[0], 0))
    return label, f"{label}: " + "; ".join(text for _, text in ordered)

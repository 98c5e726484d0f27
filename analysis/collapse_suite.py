"""The collapse detector, validated: inject known pathologies into a healthy layer's routing and
report the verdicts.

``inject(kind, healthy)`` returns the healthy routing with one pathology written into it;
``validate(healthy)`` injects each one in turn (plus the untouched routing) and returns a table of
(layer, pathology, expected, verdict, reason, detected, passed, caught_by, routing_verdict).

Verdicts come from the project's real rule (``analysis.verdict.verdict``, re-exported by
``analysis.routing``), ``analysis.routing.verdict(analysis.routing.layer_summary(
probs, topk_ids, combine, logits=logits))``, merged with the rules of ``analysis.routing_measures``
that it does not (yet) apply: ``weight_collapse_from_summary`` (skipped when routing's reason
already contains its clause, i.e. once it is wired in), ``position_dependence_finding`` (within
the position kinds when the routing carries ``position_kind``) and
``batch_dependence_finding``.  ``routing_verdict`` keeps routing's own label so the two can be told
apart.

The pathologies (``PATHOLOGIES``: expected = the least verdict that counts as caught):

* ``dead_expert`` (warning): the least loaded expert is never chosen; where top-k picked it, it swaps
  places (scores, logits, combine weights) with the best expert the position did not choose.
  Needs k < E.
* ``all_to_one`` (collapsed): every position's routing distribution is 98% on the busiest expert.
* ``two_expert`` (collapsed from 4 experts on, a warning for 3): 98% of every distribution on the
  two busiest experts (each keeps at least 30%; between them the healthy router's preference
  decides), the rest as before.
* ``position_dependent`` (warning): the top-1 expert becomes ``position mod E`` (the old top-1 and
  that expert swap places per row, so the loads stay about even).  Needs recurring positions.
* ``batch_dependent`` (warning): the combine weights are normalised over the batch, like the
  published MMoE ``SwitchGate``: c = g / sum over the batch of g at the same position, g the routing
  distribution on the chosen experts; alone (a batch of one) the same example gets c = g / g.
* ``weight_collapse`` (warning): the chosen sets stay as they were (so the slot loads are unchanged),
  but wherever the busiest expert is chosen it takes 98% of the position's weight.  Needs k >= 2
  and enough slots on the heavy expert for the rule to judge it (``min_expert_slots``).
* ``weight_collapse_two`` (warning): the same with the two busiest experts.

Rows that the injections rewrite get the standard gate's combine weights (routing distribution on
the chosen experts, renormalised over them), except ``dead_expert`` and ``position_dependent``,
which only swap expert columns and so keep each row's own gate behaviour.

A healthy routing is given as a ``Routing`` (arrays) or as a routing table (``pandas.DataFrame`` with
the columns of ``analysis.routing_table``: probs, topk_ids, combine, logits, example_index,
position, ...); ``inject`` returns the same kind it was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.stats import entropy as _entropy

from analysis import routing as _routing
from analysis.routing_findings import (
    FINDING_THRESHOLDS,
    FindingThresholds,
    batch_dependence_finding,
    position_dependence_finding,
    weight_collapse_from_summary,
)
from analysis.routing_measures import slot_load

__all__ = [
    "PATHOLOGIES",
    "NotApplicable",
    "Routing",
    "confusion_table",
    "expected_level",
    "inject",
    "layer_verdict",
    "validate",
]

PATHOLOGIES: dict[str, str] = {
    "dead_expert": "warning",
    "all_to_one": "collapsed",
    "two_expert": "collapsed",
    "position_dependent": "warning",
    "batch_dependent": "warning",
    "weight_collapse": "warning",
    "weight_collapse_two": "warning",
}
"""Injected pathology -> the least verdict that counts as detecting it (see ``expected_level``)."""


def expected_level(kind: str, num_experts: int) -> str:
    """The least verdict that detects ``kind`` in a layer of ``num_experts`` experts.

    Two experts taking everything is a collapse when the idle rest is at least
    ``THRESHOLDS.unused_experts_collapse`` of the experts (2 of 4 and more), else a warning (1 of 3)."""
    if kind == "two_expert":
        idle = num_experts - 2
        return "collapsed" if idle >= _routing.THRESHOLDS.unused_experts_collapse * num_experts else "warning"
    return PATHOLOGIES[kind]


EPSILON = 0.02
"""Share of each routing distribution that the collapse injections leave to the healthy router (and
of the weight the heavy experts leave to the others in ``weight_collapse``)."""

BATCH_SIZE = 8
"""Examples per batch in ``batch_dependent`` (the MMoE demo trains with 16-32)."""

_SEVERITY = {"healthy": 0, "warning": 1, "collapsed": 2}


class NotApplicable(ValueError):
    """The pathology cannot be written into this routing (e.g. a dead expert under top-E)."""


@dataclass
class Routing:
    """One layer's routing: probs [T, E], topk_ids [T, k], combine [T, E], optional logits [T, E],
    example [T] and position [T] ids, labels {name: [T]} and combine_alone [T, E] (the combine
    weights of each example run alone; None = unknown, e.g. a per-position gate never checked)."""

    probs: np.ndarray
    topk_ids: np.ndarray
    combine: np.ndarray
    logits: np.ndarray | None = None
    example: np.ndarray | None = None
    position: np.ndarray | None = None
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)
    combine_alone: np.ndarray | None = None
    layer: str = "layer"

    def __post_init__(self):
        self.probs = np.asarray(self.probs, dtype=np.float64)
        self.topk_ids = np.asarray(self.topk_ids, dtype=np.int64)
        if self.topk_ids.ndim == 1:
            self.topk_ids = self.topk_ids[:, None]
        self.combine = np.asarray(self.combine, dtype=np.float64)
        T, E = self.probs.shape
        if self.topk_ids.shape[0] != T or self.combine.shape != (T, E):
            raise ValueError(
                f"shapes disagree: probs {self.probs.shape}, topk_ids "
                f"{self.topk_ids.shape}, combine {self.combine.shape}"
            )
        for name in ("logits", "combine_alone"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float64))
        for name in ("example", "position"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value).ravel())

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    def copy(self) -> Routing:
        arrays = {
            n: None if getattr(self, n) is None else getattr(self, n).copy()
            for n in ("probs", "topk_ids", "combine", "logits", "example", "position", "combine_alone")
        }
        return replace(self, labels=dict(self.labels), **arrays)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, layer: str | None = None) -> Routing:
        """One layer's rows of a routing table (all rows when ``layer`` is None; they must then be
        one layer).  Labels: routed_modality, gate_modality, position_kind when present."""
        rows = frame if layer is None else frame[frame["layer"] == layer]
        if "layer" in rows and rows["layer"].nunique() > 1:
            raise ValueError(f"rows of {rows['layer'].nunique()} layers: name one")
        if len(rows) == 0:
            raise ValueError("no routing rows")

        def stack(col):
            return np.stack([np.asarray(v, dtype=np.float64) for v in rows[col].to_numpy()])

        example_col = next((c for c in ("example_index", "index") if c in rows), None)
        return cls(
            probs=stack("probs"),
            topk_ids=stack("topk_ids").astype(np.int64),
            combine=stack("combine"),
            logits=stack("logits") if "logits" in rows else None,
            example=None if example_col is None else rows[example_col].to_numpy(),
            position=rows["position"].to_numpy() if "position" in rows else None,
            labels={c: rows[c].to_numpy() for c in ("routed_modality", "gate_modality", "position_kind") if c in rows},
            combine_alone=stack("combine_alone") if "combine_alone" in rows else None,
            layer=str(rows["layer"].iloc[0]) if "layer" in rows else "layer",
        )

    def write_into(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` (this layer's rows, in order) with its routing columns replaced by this routing's."""
        out = frame.copy()
        dist = _routing.routing_distribution(self.probs)
        out["probs"] = list(self.probs.astype(np.float32))
        out["combine"] = list(self.combine.astype(np.float32))
        out["topk_ids"] = list(self.topk_ids.astype(np.int16))
        out["top1"] = self.topk_ids[:, 0].astype(np.int16)
        out["topk_weights"] = list(np.take_along_axis(self.combine, self.topk_ids, axis=1).astype(np.float32))
        if self.logits is not None:
            out["logits"] = list(self.logits.astype(np.float32))
        out["entropy"] = _entropy(dist, axis=-1).astype(np.float32)
        out["top1_prob"] = dist.max(axis=1).astype(np.float32)
        out["routed"] = self.combine.sum(axis=1) > 0
        if self.combine_alone is not None:
            out["combine_alone"] = list(self.combine_alone.astype(np.float32))
        return out


# --------------------------------------------------------------------------- gates and helpers


def _standard_combine(dist: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The standard gate's weights: the distribution on the chosen experts, renormalised over them."""
    rows = np.arange(len(ids))[:, None]
    combine = np.zeros_like(dist)
    combine[rows, ids] = dist[rows, ids]
    total = combine.sum(axis=1, keepdims=True)
    return np.divide(combine, total, out=np.zeros_like(combine), where=total > 0)


def _order(dist: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-dist, axis=1, kind="stable")[:, :k]


def _from_dist(r: Routing, dist: np.ndarray, ids: np.ndarray, rows: np.ndarray | None = None) -> Routing:
    """``r`` with ``rows`` (all when None) rewritten to the standard gate on ``dist``."""
    out = r.copy()
    rows = np.arange(len(dist)) if rows is None else rows
    out.probs[rows] = dist[rows]
    out.topk_ids[rows] = ids[rows]
    out.combine[rows] = _standard_combine(dist[rows], ids[rows])
    if out.logits is not None:
        with np.errstate(divide="ignore"):
            out.logits[rows] = np.log(np.maximum(dist[rows], 1e-30))
    if out.combine_alone is not None:
        out.combine_alone[rows] = out.combine[rows]  # the standard gate is per position
    return out


def _swap_columns(r: Routing, rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> Routing:
    """Per row in ``rows``: experts a[row] and b[row] trade places in every per-expert array."""
    out = r.copy()
    for name in ("probs", "combine", "logits", "combine_alone"):
        arr = getattr(out, name)
        if arr is None:
            continue
        va, vb = arr[rows, a].copy(), arr[rows, b].copy()
        arr[rows, a], arr[rows, b] = vb, va
    ids = out.topk_ids[rows]
    is_a, is_b = ids == a[:, None], ids == b[:, None]
    ids[is_a], ids[is_b] = np.broadcast_to(b[:, None], ids.shape)[is_a], np.broadcast_to(a[:, None], ids.shape)[is_b]
    out.topk_ids[rows] = ids
    return out


def _busiest(r: Routing, n: int) -> list[int]:
    f = slot_load(r.topk_ids, r.num_experts)
    return [int(i) for i in np.argsort(-f, kind="stable")[:n]]


def _codes(values: np.ndarray) -> np.ndarray:
    return np.unique(values, return_inverse=True)[1].ravel()


# --------------------------------------------------------------------------- injections


def _dead_expert(r: Routing, experts: Sequence[int] | None) -> Routing:
    E, k = r.num_experts, r.top_k
    if k >= E:
        raise NotApplicable(f"top-{k} of {E} chooses every expert: none can be dead")
    f = slot_load(r.topk_ids, E)
    d = int(experts[0]) if experts else int(np.argmin(f))
    rows = np.flatnonzero((r.topk_ids == d).any(axis=1))
    if len(rows) == 0:
        return r.copy()
    dist = _routing.routing_distribution(r.probs[rows])
    chosen = np.zeros_like(dist, dtype=bool)
    chosen[np.arange(len(rows))[:, None], r.topk_ids[rows]] = True
    best_unchosen = np.where(chosen, -np.inf, dist).argmax(axis=1)
    return _swap_columns(r, rows, np.full(len(rows), d), best_unchosen)


def _collapse_onto(r: Routing, experts: Sequence[int]) -> Routing:
    dist = _routing.routing_distribution(r.probs)
    target = np.zeros_like(dist)
    cols = list(experts)
    mass = dist[:, cols]
    total = mass.sum(axis=1, keepdims=True)
    split = np.divide(mass, total, out=np.full_like(mass, 1 / len(cols)), where=total > 0)
    # the content still decides between the survivors, but each keeps at least 30% (two experts):
    # so they always outrank the rest and take the first slots
    target[:, cols] = 0.2 * split + 0.8 / len(cols)
    new = (1 - EPSILON) * target + EPSILON * dist
    return _from_dist(r, new, _order(new, r.top_k))


def _position_dependent(r: Routing) -> Routing:
    if r.position is None:
        raise NotApplicable("no positions")
    positions = _codes(r.position) if not np.issubdtype(r.position.dtype, np.integer) else r.position
    if len(np.unique(positions)) < 2:
        raise NotApplicable("every row has the same position")
    target = np.asarray(positions, dtype=np.int64) % r.num_experts
    top1 = r.topk_ids[:, 0]
    rows = np.flatnonzero(top1 != target)
    return _swap_columns(r, rows, top1[rows], target[rows])


def _batch_dependent(r: Routing, batch_size: int) -> Routing:
    T = len(r.probs)
    example = _codes(r.example) if r.example is not None else np.arange(T)
    position = _codes(r.position) if r.position is not None else np.zeros(T, dtype=np.int64)
    group = _codes((example // batch_size) * (int(position.max()) + 1) + position)
    dist = _routing.routing_distribution(r.probs)
    chosen = np.zeros_like(dist, dtype=bool)
    chosen[np.arange(T)[:, None], r.topk_ids] = True
    g = np.where(chosen, dist, 0.0)
    denom = np.zeros((int(group.max()) + 1, r.num_experts))
    np.add.at(denom, group, g)
    eps = 1e-6  # as the published SwitchGate
    out = r.copy()
    out.combine = g / (denom[group] + eps)
    out.combine_alone = g / (g + eps)
    return out


def _weight_collapse(r: Routing, heavy: Sequence[int], thresholds: FindingThresholds) -> Routing:
    if r.top_k < 2:
        raise NotApplicable("under top-1 the combine weight of each position is 1: slots = weight")
    heavy = [int(h) for h in heavy]
    slots = slot_load(r.topk_ids, r.num_experts)[heavy] * r.topk_ids.size
    if slots.min() < thresholds.min_expert_slots:
        raise NotApplicable(
            f"expert {heavy[int(np.argmin(slots))]} holds {slots.min():.0f} routing "
            f"slots, fewer than the {thresholds.min_expert_slots:g} the weight rule "
            "needs to judge an expert"
        )
    dist = _routing.routing_distribution(r.probs)
    T, E = dist.shape
    chosen = np.zeros((T, E), dtype=bool)
    chosen[np.arange(T)[:, None], r.topk_ids] = True
    is_heavy = np.zeros(E, dtype=bool)
    is_heavy[heavy] = True
    heavy_in = chosen & is_heavy
    rows = np.flatnonzero(heavy_in.any(axis=1))
    new = dist.copy()
    for t in rows:
        h, o = heavy_in[t], chosen[t] & ~is_heavy
        p = np.maximum(dist[t], 1e-12)
        row = np.zeros(E)
        row[h] = (1 - EPSILON) * p[h] / p[h].sum() if o.any() else p[h] / p[h].sum()
        if o.any():
            row[o] = EPSILON * p[o] / p[o].sum()
        rest = ~chosen[t]
        if rest.any():  # keep the unchosen below every chosen expert, in their old order
            row[rest] = 0.5 * row[chosen[t]].min() * p[rest] / p[rest].max()
        new[t] = row / row.sum()
    ids = r.topk_ids.copy()
    ids[rows] = np.take_along_axis(
        r.topk_ids[rows],
        np.argsort(-np.take_along_axis(new[rows], r.topk_ids[rows], axis=1), axis=1, kind="stable"),
        axis=1,
    )
    return _from_dist(r, new, ids, rows)


def _inject_routing(
    kind: str,
    r: Routing,
    experts: Sequence[int] | None,
    batch_size: int,
    thresholds: FindingThresholds = FINDING_THRESHOLDS,
) -> Routing:
    if kind == "dead_expert":
        return _dead_expert(r, experts)
    if kind == "all_to_one":
        return _collapse_onto(r, list(experts or _busiest(r, 1))[:1])
    if kind == "two_expert":
        if r.num_experts < 3:
            raise NotApplicable("two experts of two is no collapse")
        return _collapse_onto(r, list(experts or _busiest(r, 2))[:2])
    if kind == "position_dependent":
        return _position_dependent(r)
    if kind == "batch_dependent":
        return _batch_dependent(r, batch_size)
    if kind == "weight_collapse":
        return _weight_collapse(r, list(experts or _busiest(r, 1))[:1], thresholds)
    if kind == "weight_collapse_two":
        if r.num_experts < 3:
            raise NotApplicable("two heavy experts of two is no collapse")
        return _weight_collapse(r, list(experts or _busiest(r, 2))[:2], thresholds)
    raise ValueError(f"unknown pathology {kind!r}; known: {', '.join(PATHOLOGIES)}")


def inject(
    kind: str,
    healthy: Routing | pd.DataFrame,
    experts: Sequence[int] | None = None,
    batch_size: int = BATCH_SIZE,
    layer: str | None = None,
) -> Routing | pd.DataFrame:
    """``healthy`` with the pathology ``kind`` (a key of ``PATHOLOGIES``) written into its routing.

    ``experts`` overrides which experts the pathology uses (default: the least loaded for
    ``dead_expert``, the busiest one or two otherwise).  A routing table gets the pathology in every
    layer (or only in ``layer``) and comes back as a table; raises ``NotApplicable`` where the
    pathology cannot exist (a dead expert under top-E, weight collapse under top-1, ...).
    """
    if isinstance(healthy, Routing):
        return _inject_routing(kind, healthy, experts, batch_size)
    frame = healthy
    layers = [layer] if layer is not None else list(pd.unique(frame["layer"]))
    parts = []
    for name in pd.unique(frame["layer"]):
        rows = frame[frame["layer"] == name]
        if name in layers:
            rows = _inject_routing(kind, Routing.from_frame(rows), experts, batch_size).write_into(rows)
        parts.append(rows)
    return pd.concat(parts).loc[frame.index]


# --------------------------------------------------------------------------- verdicts


def layer_verdict(r: Routing, thresholds: FindingThresholds = FINDING_THRESHOLDS) -> dict:
    """Routing's verdict of one layer merged with this project's newer rules.

    Returns ``{"verdict", "reason", "routing_verdict", "routing_reason", "caught_by"}``; the merged
    reason lists the new rules' clauses first, then routing's own reason (without its label)."""
    summary = _routing.layer_summary(r.probs, r.topk_ids, r.combine, logits=r.logits)
    label, reason = _routing.verdict(summary)
    routing_reason = reason
    body = reason.split(": ", 1)[1] if ": " in reason else reason
    extra = []
    weight = weight_collapse_from_summary(summary, thresholds)
    if weight and weight[1] not in reason:  # once wired into routing.verdict, not twice
        extra.append(("weight_collapse", weight))
    if r.position is not None:
        pos = position_dependence_finding(r.topk_ids, r.position, thresholds, kinds=r.labels.get("position_kind"))
        if pos and pos[1] not in reason:
            extra.append(("position_dependence", pos))
    batch = batch_dependence_finding(r.combine_alone, r.combine, thresholds)
    if batch and batch[1] not in reason:
        extra.append(("batch_dependence", batch))
    caught = (["routing.verdict"] if label != "healthy" else []) + [name for name, _ in extra]
    worst = max([_SEVERITY[label]] + [_SEVERITY[level] for _, (level, _) in extra])
    merged = {0: "healthy", 1: "warning", 2: "collapsed"}[worst]
    if extra:
        clauses = [text for _, (_, text) in sorted(extra, key=lambda e: -_SEVERITY[e[1][0]])]
        reason = f"{merged}: " + "; ".join(clauses + [body])
    return {
        "verdict": merged,
        "reason": reason,
        "routing_verdict": label,
        "routing_reason": routing_reason,
        "caught_by": caught,
    }


def _validate_routing(r: Routing, kinds: Sequence[str], batch_size: int, thresholds: FindingThresholds) -> list[dict]:
    records = []
    base = layer_verdict(r, thresholds)
    # A layer the detector already flags is no healthy host: its untouched row states that verdict and is
    # not scored (it is the run's finding, not a false alarm); the injected rows are still scored.
    healthy_host = base["verdict"] == "healthy"
    untouched = _row(base)
    if not healthy_host:
        untouched["reason"] = f"not a healthy host (the run's own verdict): {untouched['reason']}"
    records.append(
        {
            "layer": r.layer,
            "pathology": "none",
            "expected": "healthy" if healthy_host else base["verdict"],
            **untouched,
            "detected": not healthy_host,
            "passed": True if healthy_host else None,
        }
    )
    for kind in kinds:
        expected = expected_level(kind, r.num_experts)
        try:
            got = layer_verdict(_inject_routing(kind, r, None, batch_size, thresholds), thresholds)
        except NotApplicable as why:
            records.append(
                {
                    "layer": r.layer,
                    "pathology": kind,
                    "expected": expected,
                    "verdict": "n/a",
                    "reason": f"not applicable: {why}",
                    "caught_by": "",
                    "routing_verdict": "n/a",
                    "detected": None,
                    "passed": None,
                }
            )
            continue
        records.append(
            {
                "layer": r.layer,
                "pathology": kind,
                "expected": expected,
                **_row(got),
                "detected": got["verdict"] != "healthy",
                "passed": _SEVERITY[got["verdict"]] >= _SEVERITY[expected],
            }
        )
    return records


def _row(v: dict) -> dict:
    return {
        "verdict": v["verdict"],
        "reason": v["reason"],
        "caught_by": ", ".join(v["caught_by"]),
        "routing_verdict": v["routing_verdict"],
    }


def validate(
    healthy: Routing | pd.DataFrame,
    kinds: Sequence[str] | None = None,
    batch_size: int = BATCH_SIZE,
    layer: str | None = None,
    thresholds: FindingThresholds = FINDING_THRESHOLDS,
) -> pd.DataFrame:
    """Inject each pathology into ``healthy`` and judge it; one row per (layer, pathology).

    Columns: layer, pathology ("none" = untouched), expected (the least verdict that catches it;
    "healthy" for "none" on a healthy layer, else that layer's own verdict), verdict, reason, detected
    (verdict is not healthy; None when not applicable), passed (detected at the expected level, or
    healthy left healthy; None for a layer that is no healthy host, untouched), caught_by (which
    rules fired: routing.verdict, weight_collapse, position_dependence, batch_dependence),
    routing_verdict (routing's own label, before the newer rules).
    """
    kinds = list(PATHOLOGIES) if kinds is None else list(kinds)
    unknown = [k for k in kinds if k not in PATHOLOGIES]
    if unknown:
        raise ValueError(f"unknown pathologies {unknown}; known: {', '.join(PATHOLOGIES)}")
    if isinstance(healthy, Routing):
        records = _validate_routing(healthy, kinds, batch_size, thresholds)
    else:
        layers = [layer] if layer is not None else list(pd.unique(healthy["layer"]))
        records = [
            rec
            for name in layers
            for rec in _validate_routing(Routing.from_frame(healthy, name), kinds, batch_size, thresholds)
        ]
    columns = [
        "layer",
        "pathology",
        "expected",
        "verdict",
        "reason",
        "detected",
        "passed",
        "caught_by",
        "routing_verdict",
    ]
    return pd.DataFrame.from_records(records, columns=columns)


def confusion_table(table: pd.DataFrame) -> pd.DataFrame:
    """Expected level (rows) against the verdict given (columns), counts over ``validate``'s rows."""
    return pd.crosstab(table["expected"], table["verdict"])

"""Causal expert knockout run-wide (every expert, and the whole routed layer), and the collapse detector suite on
the run's own routing.

Part of :mod:`analysis.explanation_checks` (see its docstring for the whole).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from analysis.explanation_checks.common import ALL, KEY, KNOCKOUT_COLUMNS, _frame
from analysis.routing_measures import slot_load, weight_load
from analysis.routing_table import layer_arrays
from mmoe_core.adapter import ModelAdapter
from mmoe_core.spec import ModelSpec


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _resolve_metrics(overall: Mapping, headline: Sequence[str]) -> list[str]:
    """The summary keys of the headline metrics (matched case-insensitively: a spec may say "hits@1" where
    the summary says "Hits@1"); every numeric key but counts when none matches."""
    lower = {str(k).lower(): k for k in overall}
    keys = [lower[h.lower()] for h in headline if h.lower() in lower and _is_number(overall[lower[h.lower()]])]
    if keys:
        return keys
    return [
        k for k, v in overall.items() if _is_number(v) and str(k).lower() not in ("n", "examples", "count", "tokens")
    ]


def metric_rows(summary: Mapping, metrics: Sequence[str]) -> list[tuple[str, str, str, float, int]]:
    """(metric, label, slice, value, n) of ``adapter.summarize`` output: "overall" and every "by_<label>"."""
    out = []
    overall = summary.get("overall", {})
    n = overall.get("n", overall.get("examples", 0))
    out += [(m, "", ALL, float(overall[m]), int(n or 0)) for m in metrics if m in overall]
    for key, groups in summary.items():
        if not str(key).startswith("by_") or not isinstance(groups, Mapping):
            continue
        for value, ms in groups.items():
            if not isinstance(ms, Mapping):
                continue
            n = ms.get("n", ms.get("examples", 0))
            out += [
                (m, str(key)[3:], str(value), float(ms[m]), int(n or 0))
                for m in metrics
                if m in ms and _is_number(ms[m])
            ]
    return out


def _loads(routing: pd.DataFrame | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if routing is None or not len(routing):
        return {}
    out = {}
    for layer, part in routing.groupby("layer", sort=True):
        a = layer_arrays(part)
        out[str(layer)] = (slot_load(a["topk_ids"], a["probs"].shape[1]), weight_load(a["combine"]))
    return out


def knockout_effects(
    adapter: ModelAdapter,
    spec: ModelSpec,
    examples: Sequence[dict],
    batch_size: int = 32,
    routing: pd.DataFrame | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """The ``knockout_effects`` table and notes {layer: why its whole-layer row is missing}.

    Per routed layer and expert e: the metrics of ``adapter.summarize`` over ``examples`` with e knocked out
    (value), without (base) and delta = value - base, overall and per slice; expert = -1: the whole layer
    removed. ``load`` / ``weight_share``: the expert's share of routing slots and of combine weight over
    ``routing`` (the run's routing table). Whether higher is better depends on the metric (a loss: lower)."""
    examples = list(examples)
    base_summary = adapter.summarize(adapter.run(examples, record=False, batch_size=batch_size).predictions, examples)
    metrics = _resolve_metrics(base_summary.get("overall", {}), spec.prediction.headline)
    base = {(m, lab, s): (v, n) for m, lab, s, v, n in metric_rows(base_summary, metrics)}
    loads = _loads(routing)
    rows, notes = [], {}

    def add(layer: str, expert: int, summary: Mapping) -> None:
        load, weight = loads.get(layer, (None, None))
        for m, lab, s, v, n in metric_rows(summary, metrics):
            b = base.get((m, lab, s), (math.nan, 0))[0]
            rows.append(
                {
                    "layer": layer,
                    "expert": expert,
                    "metric": m,
                    "label": lab,
                    "slice": s,
                    "value": v,
                    "base": b,
                    "delta": v - b,
                    "n": n,
                    "load": float(load[expert]) if load is not None and 0 <= expert < len(load) else math.nan,
                    "weight_share": float(weight[expert])
                    if weight is not None and 0 <= expert < len(weight)
                    else math.nan,
                }
            )

    jobs = [(layer.name, e) for layer in spec.routed_layers for e in [*range(layer.num_experts), -1]]
    for layer, e in tqdm(jobs, desc="knockout", disable=not progress, file=sys.stderr):
        name = "knockout" if e >= 0 else "ablate_layer"
        method = getattr(adapter, name, None)
        if method is None:
            notes.setdefault(layer, f"the adapter offers no {name}")
            continue
        context = method(layer, e) if e >= 0 else method(layer)
        try:
            context.__enter__()
        except (NotImplementedError, KeyError) as why:  # no such switch, or no such routed module
            notes.setdefault(layer, str(why).strip("'\""))
            continue
        try:
            preds = adapter.run(examples, record=False, batch_size=batch_size).predictions
        finally:
            context.__exit__(None, None, None)
        add(layer, e, adapter.summarize(preds, examples))
    return _frame(rows, KNOCKOUT_COLUMNS), notes


# =============================================================================================
# The collapse detector on the run's own routing
# =============================================================================================


def detector_suite(routing: pd.DataFrame, example_indices: Sequence[int] | None = None) -> pd.DataFrame:
    """:func:`analysis.collapse_suite.validate` on each layer of the run's routing (the positions of
    ``example_indices`` when given, to bound the cost): one row per (layer, injected pathology)."""
    from analysis.collapse_suite import validate

    if routing is None or not len(routing):
        return pd.DataFrame()
    rows = routing if example_indices is None else routing[routing[KEY].isin(list(example_indices))]
    table = validate(rows.reset_index(drop=True))
    table["detected"] = table["detected"].astype("boolean")
    table["passed"] = table["passed"].astype("boolean")
    return table


# =============================================================================================
# The precompute step
# =============================================================================================

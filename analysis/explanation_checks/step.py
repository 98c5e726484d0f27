"""The precompute step that runs every explanation check on a run and its JSON summary.

Part of :mod:`analysis.explanation_checks` (see its docstring for the whole).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd

from analysis.explanation_checks.agreement import (
    deciding_share_rows,
    routing_specialisation_rows,
    source_agreement_rows,
)
from analysis.explanation_checks.common import CHECK_COLUMNS, KEY, KNOCKOUT_COLUMNS, THRESHOLDS, CheckThresholds, _frame
from analysis.explanation_checks.knockout import detector_suite, knockout_effects
from analysis.explanation_checks.sanity import faithfulness_rows, randomisation_rows
from analysis.sampling import stratified_indices
from analysis.stage_timer import StageTimer
from mmoe_core.adapter import ModelAdapter
from mmoe_core.spec import ModelSpec


def check_samples(params: Mapping, n_examples: int) -> dict[str, int]:
    """Sample sizes of the checks from the precompute parameters.

    * knockout (and the detector suite): ``knockout_sample`` (default 200) examples, at most
      ``dynamics_sample``: like the dynamics, the knockout re-forwards one fixed sample many times (once per
      expert and layer), so a recipe that keeps the dynamics small (the tiny demo scale) keeps it small too;
    * sanity checks: ``sanity_sample`` (default 8) examples of the attribution sample, at most half of it
      (each costs about a dozen attribution calls: randomisation stages, curves, captum's metrics)."""
    knock = int(params.get("knockout_sample", 200) or 0)
    if params.get("dynamics_sample"):
        knock = min(knock, int(params["dynamics_sample"]))
    sanity = int(params.get("sanity_sample", 8) or 0)
    attribution = int(params.get("attribution_sample", 0) or 0)
    sanity = min(sanity, max(1, attribution // 2)) if attribution > 0 else 0
    return {"knockout": min(knock, n_examples), "sanity": min(sanity, n_examples)}


def _sample(examples: Sequence[dict], size: int, label: str | None, seed: int) -> list[dict]:
    strata = [str((ex.get("labels") or {}).get(label)) for ex in examples] if label else None
    return [examples[i] for i in stratified_indices(len(examples), size, strata, seed)]


def explanation_checks_step(
    adapter: ModelAdapter,
    spec: ModelSpec,
    examples: Sequence[dict],
    *,
    routing: pd.DataFrame,
    examples_df: pd.DataFrame,
    attributions: pd.DataFrame | None,
    extras: Mapping[str, pd.DataFrame],
    params: Mapping,
    progress: bool = False,
    thresholds: CheckThresholds = THRESHOLDS,
    timer: StageTimer | None = None,
) -> dict:
    """Every check of one run: ``{"tables": {explanation_checks, knockout_effects, detector_suite},
    "json": summary}`` (see :func:`summary_json`). ``extras`` are the stored declared-output tables;
    ``timer`` times the model-heavy checks (sanity, knockout) as stages."""
    timer = timer if timer is not None else StageTimer()
    seed = int(params.get("seed", 0))
    batch_size = int(params.get("batch_size", 32))
    sizes = check_samples(params, len(examples))
    deciding = spec.deciding_label()
    label = deciding.name if deciding is not None else (spec.slice_labels() or [None])[0]
    labels = spec.slice_labels()

    with timer("checks: agreement and specialisation"):
        rows = deciding_share_rows(attributions, examples_df, spec) if attributions is not None else []
        for output in spec.output("source_weights"):
            rows += source_agreement_rows(extras.get(output.name), examples_df, output, labels, thresholds, seed)
        rows += routing_specialisation_rows(routing, examples_df, spec, thresholds, seed)

    if sizes["sanity"] and spec.attribution_targets and any(not t.needs_layer for t in spec.attribution_targets):
        attributed = set(attributions[KEY].unique()) if attributions is not None and len(attributions) else None
        pool = [ex for ex in examples if attributed is None or int(ex["index"]) in attributed] or list(examples)
        sanity = _sample(pool, sizes["sanity"], label, seed)
        n_steps = int(params.get("sanity_ig_steps", 16))
        with timer("checks: randomisation"):
            rows += randomisation_rows(
                adapter,
                spec,
                sanity,
                n_stages=int(params.get("randomisation_stages", 4)),
                n_steps=n_steps,
                thresholds=thresholds,
                seed=seed,
                progress=progress,
            )
        with timer("checks: faithfulness"):
            rows += faithfulness_rows(
                adapter, spec, sanity, n_steps=n_steps, thresholds=thresholds, seed=seed, progress=progress
            )

    knock_sample = _sample(list(examples), sizes["knockout"], label, seed) if sizes["knockout"] else []
    with timer("checks: knockout"):
        knockout, notes = (
            knockout_effects(adapter, spec, knock_sample, batch_size, routing, progress)
            if knock_sample
            else (_frame([], KNOCKOUT_COLUMNS), {})
        )
    with timer("checks: detector suite"):
        suite = detector_suite(routing, [int(ex["index"]) for ex in knock_sample] if knock_sample else None)
    checks = _frame(rows, CHECK_COLUMNS)
    return {
        "tables": {"explanation_checks": checks, "knockout_effects": knockout, "detector_suite": suite},
        "json": summary_json(checks, knockout, suite, notes, sizes, thresholds),
    }


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return _clean(v.item())
    return v


def summary_json(
    checks: pd.DataFrame,
    knockout: pd.DataFrame,
    suite: pd.DataFrame,
    notes: Mapping[str, str],
    sizes: Mapping[str, int],
    thresholds: CheckThresholds = THRESHOLDS,
) -> dict:
    """``explanation_checks.json``: the tables' headline numbers by name (NaN written as null).

    attr_decisive_share {method: {label value: {share, elsewhere, n, p_value, flagged}}}; qga_agreement {output:
    {slice label: {value: {agreement, chance, n, p_value}}}}; routing_specialisation {layer: {label: {mi,
    baseline, p_value}}}; randomisation_spearman {method: {stage: rho}}; deletion_auc / insertion_auc /
    infidelity {method: {value, random}}; sensitivity_max {method: value}; knockout {layer: {expert: {metric:
    delta}}} (overall; "-1" = the whole layer); knockout_notes; detector_suite [rows]; detector_confusion
    {expected: {verdict: count}}; samples; thresholds."""

    def pick(check):
        return checks[checks["check"] == check] if len(checks) else checks

    out: dict = {"samples": dict(sizes), "thresholds": asdict(thresholds)}
    # the key the explanation-checks contract names: the share of attribution on the deciding input
    out["attr_decisive_share"] = {}
    for r in pick("attr_decisive_share").itertuples():
        out["attr_decisive_share"].setdefault(r.method, {})[r.slice] = {
            "share": _clean(r.value),
            "elsewhere": _clean(r.baseline),
            "n": r.n,
            "p_value": _clean(r.p_value),
            "flagged": bool(r.flagged),
            "detail": r.detail,
        }
    out["qga_agreement"] = {}
    for r in pick("source_agreement").itertuples():
        out["qga_agreement"].setdefault(r.method, {}).setdefault(r.label, {})[r.slice] = {
            "agreement": _clean(r.value),
            "chance": _clean(r.baseline),
            "n": r.n,
            "p_value": _clean(r.p_value),
        }
    out["routing_specialisation"] = {}
    for r in pick("routing_specialisation").itertuples():
        out["routing_specialisation"].setdefault(r.layer, {})[r.label] = {
            "mi": _clean(r.value),
            "baseline": _clean(r.baseline),
            "p_value": _clean(r.p_value),
        }
    out["randomisation_spearman"] = {}
    for r in pick("randomisation_spearman").itertuples():
        out["randomisation_spearman"].setdefault(r.method, {})[r.layer] = _clean(r.value)
    for check in ("deletion_auc", "insertion_auc", "infidelity"):
        out[check] = {
            r.method: {"value": _clean(r.value), "random": _clean(r.baseline), "flagged": bool(r.flagged)}
            for r in pick(check).itertuples()
        }
    out["sensitivity_max"] = {r.method: _clean(r.value) for r in pick("sensitivity_max").itertuples()}
    out["knockout"] = {}
    if len(knockout):
        overall = knockout[knockout["label"] == ""]
        for r in overall.itertuples():
            out["knockout"].setdefault(r.layer, {}).setdefault(str(r.expert), {})[r.metric] = _clean(r.delta)
    out["knockout_notes"] = dict(notes)
    out["detector_suite"] = (
        []
        if not len(suite)
        else [
            {
                k: _clean(v) if not isinstance(v, (bool, np.bool_)) else bool(v)
                for k, v in rec.items()
                if k in ("layer", "pathology", "expected", "verdict", "detected", "passed", "caught_by")
            }
            for rec in suite.astype(object).where(suite.notna(), None).to_dict("records")
        ]
    )
    if len(suite):
        confusion = pd.crosstab(suite["expected"], suite["verdict"])
        out["detector_confusion"] = {
            str(e): {str(v): int(c) for v, c in row.items()} for e, row in confusion.iterrows()
        }
    return out

"""Ground-truth agreement: attribution mass on the deciding inputs, dominant source vs truth, routing
specialisation against grouped permutations.

Part of :mod:`analysis.explanation_checks` (see its docstring for the whole).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis import source_weights as SW
from analysis.explanation_checks.common import ALL, KEY, ROUTER_TARGET, THRESHOLDS, CheckThresholds, _above, _row
from analysis.routing import mutual_information_of_codes, specialisation
from mmoe_core.spec import ModelSpec, OutputSpec


def deciding_share(masses: pd.DataFrame, inputs: Sequence[str]) -> pd.Series:
    """Per example (rows of ``masses``: one column of sum|a| per input), the share of mass on ``inputs``:
    share = sum_{i in inputs} m_i / sum_i m_i (NaN when an example has no mass at all)."""
    total = masses.sum(axis=1)
    on = masses[[c for c in inputs if c in masses]].sum(axis=1)
    return (on / total).where(total > 0)


def _attribution_masses(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """Rows: examples; columns: inputs; values: sum over positions of |a| of the prediction target."""
    rows = table[(table["method"] == method) & (table["target"] != ROUTER_TARGET)]
    return rows.pivot_table(index=KEY, columns="input", values="abs_value", aggfunc="sum").fillna(0.0)


def _mann_whitney_greater(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if not len(a) or not len(b):
        return math.nan
    return float(stats.mannwhitneyu(a, b, alternative="greater").pvalue)


def deciding_share_rows(attributions: pd.DataFrame, examples: pd.DataFrame, spec: ModelSpec) -> list[dict]:
    """``attr_decisive_share`` rows: per method and value v of the deciding label, the mean share of |a| on
    the inputs v decides (value), over the n examples labelled v; baseline: the mean share on the same inputs
    over the other examples; p: one-sided Mann-Whitney U (share higher where those inputs decide). A method
    that attributes only the decided inputs (share 1 by construction) is reported, not scored."""
    label = spec.deciding_label()
    if label is None or attributions is None or not len(attributions) or label.name not in examples:
        return []
    label_of = examples.set_index(KEY)[label.name].astype(str)
    rows = []
    for method in sorted(attributions["method"].unique()):
        masses = _attribution_masses(attributions, method)
        if masses.empty:
            continue
        values = label_of.reindex(masses.index)
        for value, decided in label.decides.items():
            inputs = [name for name in decided if name in masses.columns]
            if not inputs:
                continue
            own = values == value
            n = int(own.sum())
            if set(inputs) == set(masses.columns):
                rows.append(
                    _row(
                        "attr_decisive_share",
                        method,
                        label=label.name,
                        slice=value,
                        value=1.0,
                        n=n,
                        detail=f"{method} attributes only {', '.join(inputs)}: the share is 1 by "
                        "construction, not scored",
                    )
                )
                continue
            share = deciding_share(masses, inputs)
            mine, others = share[own].to_numpy(float), share[~own].to_numpy(float)
            value_mean = float(np.nanmean(mine)) if n else math.nan
            base = float(np.nanmean(others)) if len(others) else math.nan
            flagged = bool(n and len(others) and not _above(value_mean, base))
            rows.append(
                _row(
                    "attr_decisive_share",
                    method,
                    label=label.name,
                    slice=value,
                    value=value_mean,
                    n=n,
                    baseline=base,
                    p_value=_mann_whitney_greater(mine, others),
                    flagged=flagged,
                    detail=f"share of sum|a| on {', '.join(inputs)}; baseline: the same share over the "
                    f"{len(others)} other examples",
                )
            )
    return rows


# =============================================================================================
# Ground-truth agreement: source weights
# =============================================================================================


def _codes(values) -> np.ndarray:
    return np.unique(np.asarray(values).astype(str), return_inverse=True)[1].ravel()


def _agreement_permutation(
    truth: np.ndarray, dominant: np.ndarray, n_resamples: int, seed: int
) -> tuple[float, float, float]:
    """(agreement, mean agreement under permuted pairings, one-sided p) with scipy's permutation_test:
    agreement = mean(truth == dominant); the null pairs each truth with another example's dominant source."""
    truth, dominant = np.asarray(truth).astype(str), np.asarray(dominant).astype(str)
    observed = float(np.mean(truth == dominant)) if len(truth) else math.nan
    if len(truth) < 2:
        return observed, math.nan, math.nan
    names = {s: i for i, s in enumerate(sorted(set(truth) | set(dominant)))}
    t = np.array([names[s] for s in truth])
    d = np.array([names[s] for s in dominant])
    res = stats.permutation_test(
        (t, d),
        lambda x, y: np.mean(x == y),
        permutation_type="pairings",
        n_resamples=n_resamples,
        alternative="greater",
        random_state=seed,
    )
    return observed, float(np.mean(res.null_distribution)), float(res.pvalue)


def source_agreement_rows(
    weights: pd.DataFrame,
    examples: pd.DataFrame,
    output: OutputSpec,
    labels: Sequence[str],
    thresholds: CheckThresholds = THRESHOLDS,
    seed: int = 0,
) -> list[dict]:
    """``source_agreement`` rows of one ``source_weights`` output (method = the output's name): agreement of
    the dominant source with ``output.truth_label`` overall, per source and per value of every other label
    (see the module docstring for the baselines)."""
    if not output.truth_label or weights is None or not len(weights):
        return []
    others = [lab for lab in labels if lab != output.truth_label]
    summary = SW.summarise(weights, examples, output, others)
    per = summary.per_example
    truth = output.truth_label
    if truth not in per:
        return []
    names = [s.name for s in output.sources]
    single = per[per[truth].isin(names)]
    rows = []
    what = f"dominant source = {truth.replace('_', ' ')}"

    def scored(part: pd.DataFrame, label: str, value: str) -> dict:
        agreement, null_mean, p = _agreement_permutation(
            part[truth].to_numpy(), part["dominant"].to_numpy(), thresholds.n_permutations, seed
        )
        flagged = bool(len(part) >= 2 and not _above(agreement, null_mean))
        return _row(
            "source_agreement",
            output.name,
            label=label,
            slice=value,
            value=agreement,
            n=len(part),
            baseline=null_mean,
            p_value=p,
            flagged=flagged,
            detail=f"{what}; baseline: the same with truth and dominant source paired at random",
        )

    rows.append(scored(single, truth, ALL))
    for source in names:
        part = single[single[truth] == source]
        if not len(part):
            continue
        hits = int((part["dominant"] == source).sum())
        chance = float((single["dominant"] == source).mean())
        p = (
            float(stats.binomtest(hits, len(part), chance, alternative="greater").pvalue)
            if 0 < chance < 1
            else math.nan
        )
        rows.append(
            _row(
                "source_agreement",
                output.name,
                label=truth,
                slice=source,
                value=hits / len(part),
                n=len(part),
                baseline=chance,
                p_value=p,
                flagged=not _above(hits / len(part), chance),
                detail=f"examples whose {truth.replace('_', ' ')} is {source}: share weighted mostly to "
                f"{source}; baseline: share of all examples weighted mostly to {source}",
            )
        )
    for label in others:
        if label not in single:
            continue
        for value, part in single.groupby(single[label].astype(str), sort=True):
            rows.append(scored(part, label, value))
    return rows


# =============================================================================================
# Ground-truth agreement: routing specialisation
# =============================================================================================


def grouped_permutation_mi(
    chosen: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    within: bool = False,
    n_permutations: int = 200,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """MI(chosen expert; label) in nats with a permutation baseline: (mi, null mean, null max, p).

    ``within`` False (labels of whole examples): the null gives each *example* (``groups``) the label of
    another example, so that one example's positions move together; ``within`` True (labels of positions):
    the null shuffles labels among the positions of each example. Without ``groups`` every position is its
    own group. p = (1 + #{null >= mi}) / (1 + R), R = ``n_permutations`` (Phipson and Smyth 2010).
    Hand-written: scipy.stats.permutation_test has no grouped permutations.
    """
    e = _codes(chosen)
    y = _codes(labels)
    g = np.arange(len(y)) if groups is None else _codes(groups)
    observed = mutual_information_of_codes(y, e)
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    if within:
        order = np.argsort(g, kind="stable")
        # group code + a uniform draw in [0, 1): one float argsort keeps each group together, in a random
        # order inside it (the same draws as lexsort on the two keys, 7x faster); MI only pairs positions,
        # so the experts are sorted the same way and nothing is put back
        g_sorted, y_sorted, e_sorted = g[order].astype(np.float64), y[order], e[order]
        for r in range(n_permutations):
            shuffled = y_sorted[np.argsort(g_sorted + rng.random(len(y)))]
            null[r] = mutual_information_of_codes(shuffled, e_sorted)
    else:
        n_groups = int(g.max()) + 1 if len(g) else 0
        group_label = np.zeros(n_groups, dtype=np.int64)
        group_label[g] = y  # a whole-example label: every position of a group carries the same value
        for r in range(n_permutations):
            null[r] = mutual_information_of_codes(rng.permutation(group_label)[g], e)
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + n_permutations)
    return observed, float(null.mean()), float(null.max()), float(p)


def routing_specialisation_rows(
    routing: pd.DataFrame,
    examples: pd.DataFrame,
    spec: ModelSpec,
    thresholds: CheckThresholds = THRESHOLDS,
    seed: int = 0,
) -> list[dict]:
    """``routing_specialisation`` rows: per layer, MI of the top-1 expert with the position kind and routed
    modality (shuffled within examples) and with every ground-truth label (shuffled between examples)."""
    if routing is None or not len(routing):
        return []
    truth = [lab.name for lab in spec.ground_truth_labels() if lab.name in examples]
    joined = routing.merge(examples[[KEY, *truth]], on=KEY, how="left") if truth else routing
    rows = []
    for layer, part in joined.groupby("layer", sort=True):
        for column, within in [("position_kind", True), ("routed_modality", True), *[(t, False) for t in truth]]:
            if column not in part:
                continue
            values = part[column].astype(str).to_numpy()
            if len(set(values)) < 2:
                continue
            mi, null_mean, null_max, p = grouped_permutation_mi(
                part["top1"].to_numpy(), values, part[KEY].to_numpy(), within, thresholds.n_permutations, seed
            )
            nmi = specialisation(part["top1"].to_numpy(), values)["nmi"]
            how = "within each example" if within else "between examples"
            rows.append(
                _row(
                    "routing_specialisation",
                    "top1_expert",
                    str(layer),
                    column,
                    ALL,
                    mi,
                    len(part),
                    null_mean,
                    p,
                    p >= thresholds.alpha,
                    f"MI(top-1 expert; {column}) in nats, NMI {nmi:.3f}; baseline: mean MI with the label "
                    f"permuted {how} ({thresholds.n_permutations}x, max {null_max:.4f})",
                )
            )
    return rows


# =============================================================================================
# Explanations on fixed inputs (the sanity checks' own calls)
# =============================================================================================

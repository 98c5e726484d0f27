"""Explanations that check themselves: ground-truth agreement, sanity checks and causal expert knockout.

Everything is read from the run's declaration (:class:`mmoe_core.spec.ModelSpec`): which label decides an
example and which inputs each of its values points at (``spec.decisive_label().decides``), the source-weight
outputs and their truth label, the ground-truth labels, the routed layers and the headline metrics. No family
is named here.

Checks (one row each in the ``explanation_checks`` table, columns :data:`CHECK_COLUMNS`)
------------------------------------------------------------------------------------------
``attr_decisive_share``   attributions: share of attribution mass sum|a| on the inputs a label value decides,
                          per method and label value, against the same share over the other examples
                          (one-sided Mann-Whitney U, scipy). Flagged when the share is not higher there.
``source_agreement``      source weights: share of examples whose dominant source is the truth label's source
                          (:mod:`analysis.source_weights`), overall, per source and per value of every other
                          label; baseline = the same agreement under permuted pairings (scipy
                          ``permutation_test``) or, per source, the dominant share of that source (binomial
                          test). Flagged when not above its baseline.
``routing_specialisation`` MI (nats) between the chosen top-1 expert and each ground-truth label (and the
                          position kind and routed modality), per layer, against a permutation baseline with a
                          p-value. Flagged when chance explains it (p >= alpha).
``randomisation_spearman`` Adebayo et al. 2018 (model-parameter randomisation, cascading top-down): Spearman
                          rank correlation of |a| per position between the trained model's and a model whose
                          modules were re-initialised from the output end down to a stage. Flagged when the
                          correlation stays above :attr:`CheckThresholds.randomisation_spearman` (the
                          explanation does not depend on those parameters).
``deletion_auc`` / ``insertion_auc``  remove (or add back) the most-attributed positions first; area under
                          the normalised output curve against random orders. Flagged when not better than
                          random (deletion: not lower; insertion: not higher).
``infidelity``            captum's ``infidelity`` (Yeh et al. 2019) with position-removal perturbations, against
                          the same values shuffled over positions. Flagged when not lower than shuffled.
``sensitivity_max``       captum's ``sensitivity_max``: largest relative change of the explanation under small
                          input noise; reported, not judged (no reference value exists).

Method names: ``ig`` (captum IntegratedGradients), ``occlusion`` (captum Occlusion, one position at a time;
offered, not in the precompute's :data:`SANITY_METHODS`) and ``input_norm``, a control that ignores the model
(the L2 norm of each position's input vector): it is what an explanation that does not depend on the model
looks like, and the randomisation check must flag it. The agreement check scores every method of the stored
``attributions`` table.

Knockout (``knockout_effects``, :data:`KNOCKOUT_COLUMNS`): for every routed layer and expert the run's headline
and per-slice metrics with that expert knocked out (``adapter.knockout``: the gate chooses among the others),
and with the whole layer removed (``adapter.ablate_layer``, expert = -1), beside the expert's slot load and
weight share over the run: "used a lot" next to "matters".

Detector suite (``detector_suite``): :func:`analysis.collapse_suite.validate` on the run's own routing, per layer.

What is maintained code and what is hand-written
------------------------------------------------
captum: IntegratedGradients, Occlusion, ``infidelity``, ``sensitivity_max``; scipy: ``spearmanr``,
``mannwhitneyu``, ``wilcoxon``, ``binomtest``, ``permutation_test``; scikit-learn: ``auc``. Hand-written, and
why: the cascading randomisation (Quantus's ``MPRT`` expects one input array with a class target and a model
called as ``model(x)``; ours explains a scalar of several embedding tensors through the adapter's
``attribution_forward`` closure, and Quantus would bring opencv and scikit-image for nothing we could call);
the layer order (taken from one traced forward, since registration order is not execution order); deletion and
insertion curves (no maintained implementation takes several inputs and position-level removal); the grouped
permutations of the routing MI (positions of one example are not exchangeable with another example's, which
``scipy.stats.permutation_test`` cannot express).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from sklearn.metrics import auc
from torch import Tensor, nn
from tqdm.auto import tqdm

from analysis import source_weights as SW
from analysis.routing import mutual_information_of_codes, specialisation
from analysis.routing_measures import slot_load, weight_load
from analysis.routing_table import layer_arrays
from analysis.sampling import stratified_indices
from mmoe_core.adapter import ModelAdapter
from mmoe_core.spec import ModelSpec, OutputSpec

__all__ = [
    "CHECK_COLUMNS",
    "KNOCKOUT_COLUMNS",
    "CheckThresholds",
    "THRESHOLDS",
    "METHODS",
    "SANITY_METHODS",
    "decisive_share",
    "decisive_share_rows",
    "source_agreement_rows",
    "grouped_permutation_mi",
    "routing_specialisation_rows",
    "execution_order",
    "randomisation_stages",
    "randomised",
    "spearman_abs",
    "explain",
    "randomisation_rows",
    "deletion_insertion",
    "curve_auc",
    "faithfulness_rows",
    "knockout_effects",
    "metric_rows",
    "detector_suite",
    "check_samples",
    "explanation_checks_step",
    "summary_json",
]

KEY = "example_index"
CHECK_COLUMNS = ("check", "method", "layer", "label", "slice", "value", "n", "baseline", "p_value", "flagged", "detail")
KNOCKOUT_COLUMNS = (
    "layer",
    "expert",
    "metric",
    "label",
    "slice",
    "value",
    "base",
    "delta",
    "n",
    "load",
    "weight_share",
)
METHODS = ("ig", "occlusion", "input_norm")
SANITY_METHODS = ("ig", "input_norm")
"""The precompute's sanity-check methods: occlusion of every position costs one forward per position (five
IG calls' worth on the demo models, and a dozen calls per example), so it is offered but not run by default."""
CONTROL = "input_norm"
ROUTER_TARGET = "router_logit"
ALL = "all"


@dataclass(frozen=True)
class CheckThresholds:
    """Every threshold and size of the checks, in one place.

    * ``randomisation_spearman``: an explanation whose mean Spearman correlation (of |a| per position) with the
      trained model's stays above this after re-initialising parameters is flagged as not depending on them.
      0.5: Adebayo et al. read rank correlations near 0 as "changed"; a faithful method on a 4-expert model of
      our size drops below 0.3 once the output end is re-initialised, the input-norm control stays at 1.
    * ``alpha``: p-value under which agreement or specialisation is taken as more than chance.
    * ``n_permutations``: permutations of every permutation baseline.
    * ``curve_steps``: points of the deletion and insertion curves (fractions 0, 1/steps, ..., 1 of positions).
    * ``random_orders``: random orders per example that make the curves' baseline.
    * ``infidelity_drop``: chance of each position being removed in one infidelity perturbation.
    * ``sensitivity_radius``: radius of sensitivity_max's L-infinity noise, as a share of mean |x|.
    """

    randomisation_spearman: float = 0.5
    alpha: float = 0.05
    n_permutations: int = 200
    curve_steps: int = 10
    random_orders: int = 8
    infidelity_samples: int = 10
    infidelity_drop: float = 0.25
    sensitivity_samples: int = 2
    sensitivity_radius: float = 0.02


THRESHOLDS = CheckThresholds()


def _row(
    check: str,
    method: str = "",
    layer: str = "",
    label: str = "",
    slice: str = ALL,
    value: float = math.nan,
    n: int = 0,
    baseline: float = math.nan,
    p_value: float = math.nan,
    flagged: bool = False,
    detail: str = "",
) -> dict:
    return {
        "check": check,
        "method": method,
        "layer": layer,
        "label": label,
        "slice": str(slice),
        "value": float(value),
        "n": int(n),
        "baseline": float(baseline),
        "p_value": float(p_value),
        "flagged": bool(flagged),
        "detail": detail,
    }


def _above(a: float, b: float) -> bool:
    """a > b beyond rounding (a permutation null of identical values averages to b within an ulp of a)."""
    return bool(a > b + 1e-9 * (1.0 + abs(b)))


def _frame(rows: Sequence[dict], columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=list(columns))


# =============================================================================================
# Ground-truth agreement: attributions
# =============================================================================================


def decisive_share(masses: pd.DataFrame, inputs: Sequence[str]) -> pd.Series:
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


def decisive_share_rows(attributions: pd.DataFrame, examples: pd.DataFrame, spec: ModelSpec) -> list[dict]:
    """``attr_decisive_share`` rows: per method and value v of the decisive label, the mean share of |a| on
    the inputs v decides (value), over the n examples labelled v; baseline: the mean share on the same inputs
    over the other examples; p: one-sided Mann-Whitney U (share higher where those inputs decide). A method
    that attributes only the decided inputs (share 1 by construction) is reported, not scored."""
    label = spec.decisive_label()
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
            share = decisive_share(masses, inputs)
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
        g_sorted, y_sorted = g[order], y[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        for r in range(n_permutations):
            shuffled = y_sorted[np.lexsort((rng.random(len(y)), g_sorted))]
            null[r] = mutual_information_of_codes(shuffled[inverse], e)
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


def _prediction_target(spec: ModelSpec) -> str:
    targets = [t.name for t in spec.attribution_targets if not t.needs_layer]
    if not targets:
        raise ValueError("the model declares no prediction attribution target")
    return targets[0]


def _forward(adapter: ModelAdapter, example: dict, target: str, names: Sequence[str]) -> Callable[..., Tensor]:
    """The adapter's ``attribution_forward`` with every input attributed, one scalar per row (the same guard as
    :mod:`analysis.attribution`: an input the target ignores gets zeros, not an autograd error)."""
    from analysis.attribution import _restricted_forward

    return _restricted_forward(adapter.attribution_forward(example, target), names, names, {})


def _per_position(attr: Tensor, reduce: str) -> np.ndarray:
    a = attr.detach().double().reshape(attr.shape[0], attr.shape[1], -1)[0]
    return (a.sum(dim=-1) if reduce == "sum" else a.mean(dim=-1)).cpu().numpy()


def explain(
    method: str,
    forward: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    n_steps: int = 32,
    internal_batch_size: int = 8,
) -> tuple[np.ndarray, ...]:
    """Per-position signed values of ``method`` for one example (``inputs``: each [1, N, W]).

    ig: captum IntegratedGradients from zeros, summed over the embedding dim; occlusion: captum Occlusion of
    one position at a time (set to zero), averaged over the dim; input_norm (control): ||x_p||_2."""
    from captum.attr import IntegratedGradients, Occlusion

    if method == "ig":
        attrs = IntegratedGradients(forward).attribute(
            inputs,
            baselines=tuple(torch.zeros_like(x) for x in inputs),
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
        )
        return tuple(_per_position(a, "sum") for a in attrs)
    if method == "occlusion":
        attrs = Occlusion(forward).attribute(
            inputs,
            sliding_window_shapes=tuple((1, *x.shape[2:]) for x in inputs),
            strides=tuple((1, *x.shape[2:]) for x in inputs),
            baselines=tuple(torch.zeros_like(x) for x in inputs),
            perturbations_per_eval=16,
        )
        return tuple(_per_position(a, "mean") for a in attrs)
    if method == CONTROL:
        return tuple(
            x.detach().double().reshape(x.shape[0], x.shape[1], -1)[0].norm(dim=-1).cpu().numpy() for x in inputs
        )
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def spearman_abs(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Spearman rank correlation of |a| and |b| over every position of every input (scipy's spearmanr);
    NaN when either is constant. Absolute values, as Adebayo et al. report for attribution maps."""
    x = np.abs(np.concatenate([np.ravel(v) for v in a]))
    y = np.abs(np.concatenate([np.ravel(v) for v in b]))
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


# =============================================================================================
# Sanity check 1: cascading model-parameter randomisation (Adebayo et al. 2018)
# =============================================================================================


def execution_order(model: nn.Module, call: Callable[[], object]) -> list[str]:
    """Names of the modules that own parameters directly, in the order one ``call()`` first runs them
    (forward pre-hooks); owners the call never runs as a module (parameters read by a parent) follow their
    parent, and owners never reached are left out. The root module is named "" here."""
    owners = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name) if name not in order else None)
        for name, m in owners.items()
    ]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return order


def randomisation_stages(order: Sequence[str], n_stages: int) -> list[list[str]]:
    """Cumulative stages, top-down: the modules in ``order`` reversed (output end first), cut into
    ``n_stages`` consecutive blocks; stage i re-initialises blocks 1..i (the last stage: every module)."""
    top_down = list(reversed(list(order)))
    if not top_down:
        return []
    blocks = np.array_split(np.arange(len(top_down)), min(max(1, n_stages), len(top_down)))
    return [[top_down[j] for j in range(int(block[-1]) + 1)] for block in blocks]


def _reinitialise(module: nn.Module, generator_seed: int) -> None:
    """PyTorch's own initialiser (``reset_parameters``, as Quantus does) where the module has one; any direct
    parameter it leaves unchanged (or of a module without one: a Hugging Face norm, a learned CLS vector) gets
    its own entries in a random order: the trained values' distribution is kept (as an initialiser keeps its
    scale), what was learned about which entry is which is not."""
    torch.manual_seed(generator_seed)
    before = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
    if hasattr(module, "reset_parameters"):
        with torch.no_grad():
            module.reset_parameters()
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and torch.equal(p, before[name]):
                flat = before[name].reshape(-1)
                p.copy_(flat[torch.randperm(flat.numel(), device=flat.device)].reshape(p.shape))


@contextlib.contextmanager
def randomised(adapter: ModelAdapter, modules: Sequence[str], seed: int = 0) -> Iterator[None]:
    """Within the block the named modules of ``adapter.model`` ("" = the root's own parameters) have freshly
    initialised parameters; after it, the trained weights are back bit for bit.

    In place with a saved state dict rather than on a deep copy: families install forward wrappers and hooks
    that close over the original modules (a router's knockout wrapper, a routing capture), so a deep copy can
    still run the trained weights. What an adapter caches per knockout state is kept on purpose: the
    randomised model explains the trained model's target (the tokens of its predicted answer, say) on the
    trained model's inputs, so positions compare one to one; a model scoring against cached item features
    (a knowledge base encoded once) keeps those trained, and only what the attribution forward runs is
    randomised (the modules :func:`execution_order` finds)."""
    model = adapter.model
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    named = dict(model.named_modules())
    try:
        for i, name in enumerate(modules):
            _reinitialise(named[name], seed * 7919 + i)
        yield
    finally:
        model.load_state_dict(saved)


def _display(name: str) -> str:
    return name or "(model's own parameters)"


def randomisation_rows(
    adapter: ModelAdapter,
    spec: ModelSpec,
    examples: Sequence[dict],
    methods: Sequence[str] = SANITY_METHODS,
    n_stages: int = 4,
    n_steps: int = 32,
    thresholds: CheckThresholds = THRESHOLDS,
    seed: int = 0,
    explain_fn: Callable[..., tuple[np.ndarray, ...]] = explain,
    progress: bool = False,
) -> list[dict]:
    """``randomisation_spearman`` rows: per method and cumulative stage (layer = "i/S: down to <module>"),
    the mean over ``examples`` of :func:`spearman_abs` between the trained model's per-position values and the
    randomised model's, on the trained model's inputs (the check randomises the function of the inputs)."""
    if not examples:
        return []
    target = _prediction_target(spec)
    prepared = []
    for ex in examples:
        inputs = {k: v.detach().to(adapter.device) for k, v in adapter.attribution_inputs(ex).items()}
        prepared.append((ex, list(inputs), tuple(inputs.values())))
    first, names, inputs = prepared[0]
    order = execution_order(adapter.model, lambda: _forward(adapter, first, target, names)(*inputs))
    stages = randomisation_stages(order, n_stages)
    trained = {
        m: [explain_fn(m, _forward(adapter, ex, target, nm), x, n_steps=n_steps) for ex, nm, x in prepared]
        for m in methods
    }
    rows = []
    for i, stage in enumerate(tqdm(stages, desc="randomisation", disable=not progress, file=sys.stderr), 1):
        with randomised(adapter, stage, seed):
            for m in methods:
                rhos = [
                    spearman_abs(trained[m][j], explain_fn(m, _forward(adapter, ex, target, nm), x, n_steps=n_steps))
                    for j, (ex, nm, x) in enumerate(prepared)
                ]
                rho = float(np.nanmean(rhos)) if not all(np.isnan(rhos)) else math.nan
                rows.append(
                    _row(
                        "randomisation_spearman",
                        m,
                        f"{i}/{len(stages)}: down to {_display(stage[-1])}",
                        slice=ALL,
                        value=rho,
                        n=int(np.sum(~np.isnan(rhos))),
                        baseline=thresholds.randomisation_spearman,
                        flagged=bool(rho > thresholds.randomisation_spearman),
                        detail=f"{len(stage)} of {len(order)} parameterised modules re-initialised from the "
                        f"output end ({', '.join(map(_display, stage[:3]))}"
                        f"{', ...' if len(stage) > 3 else ''}); flagged above "
                        f"{thresholds.randomisation_spearman:g} (the explanation did not change)",
                    )
                )
    return rows


# =============================================================================================
# Sanity check 2: deletion / insertion curves; captum's infidelity and sensitivity_max
# =============================================================================================


def _masked_batch(
    inputs: tuple[Tensor, ...], order: np.ndarray, counts: Sequence[int], insert: bool
) -> tuple[Tensor, ...]:
    """One row per count c: deletion zeroes the first c positions of ``order`` (over all inputs, flattened);
    insertion starts from zeros and restores them."""
    sizes = [x.shape[1] for x in inputs]
    offsets = np.cumsum([0, *sizes])
    keep = np.zeros((len(counts), offsets[-1]), dtype=bool)
    for r, c in enumerate(counts):
        keep[r, order[:c]] = True
    if not insert:
        keep = ~keep
    out = []
    for i, x in enumerate(inputs):
        mask = torch.as_tensor(keep[:, offsets[i] : offsets[i + 1]], device=x.device, dtype=x.dtype)
        out.append(x.expand(len(counts), *x.shape[1:]) * mask.reshape(len(counts), -1, *([1] * (x.dim() - 2))))
    return tuple(out)


def _evaluate(forward: Callable[..., Tensor], batch: tuple[Tensor, ...], chunk: int = 64) -> np.ndarray:
    rows = batch[0].shape[0]
    with torch.no_grad():
        return np.concatenate(
            [forward(*[b[s : s + chunk] for b in batch]).detach().double().cpu().numpy() for s in range(0, rows, chunk)]
        )


def curve_auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions 0..1 of positions (sklearn's trapezoidal ``auc``)."""
    return float(auc(np.linspace(0.0, 1.0, len(curve)), curve))


def deletion_insertion(
    forward: Callable[..., Tensor],
    inputs: tuple[Tensor, ...],
    values: Sequence[np.ndarray],
    steps: int = 10,
    random_orders: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Deletion and insertion AUCs of one example's explanation, and of random orders.

    Positions of every input are ranked by value, largest first (the most evidence for the explained output;
    an unsigned explanation ranks by its magnitude). Deletion sets the first c of them to zero,
    insertion restores only them, for c = round(t P), t = 0, 1/steps, ..., 1 (P positions). Every curve of
    the example is normalised by one scale, g(t) = (f_t - f_empty) / s with s = max |f_t - f_empty| over all
    its curves (the explanation's and the random orders'): a logit has no natural range (unlike the class
    probabilities of the original RISE metric) and f_x - f_empty can be tiny next to the swings on the way,
    so curves lie in [-1, 1], their areas in [-1, 1], and the explanation's and random orders' areas share
    a scale. NaN when nothing moves. Returns {deletion, insertion, deletion_random, insertion_random}: a
    faithful explanation deletes faster (lower area) and inserts faster (higher area) than random orders."""
    scores = np.concatenate([np.ravel(v) for v in values]).astype(float)
    total = len(scores)
    counts = sorted({int(round(t * total)) for t in np.linspace(0, 1, min(steps, total) + 1)})
    rng = np.random.default_rng(seed)
    orders = [np.argsort(-scores, kind="stable")] + [rng.permutation(total) for _ in range(random_orders)]
    batches = [_masked_batch(inputs, o, counts, insert) for o in orders for insert in (False, True)]
    batch = tuple(torch.cat([b[i] for b in batches]) for i in range(len(inputs)))
    f = _evaluate(forward, batch).reshape(len(orders), 2, len(counts))
    f_x, f_empty = f[0, 0, 0], f[0, 0, -1]
    scale = float(np.max(np.abs(f - f_empty)))
    if not np.isfinite(scale) or scale < 1e-6 * max(1.0, abs(f_x)):
        return dict.fromkeys(("deletion", "insertion", "deletion_random", "insertion_random"), math.nan)
    g = (f - f_empty) / scale
    areas = np.array([[auc(np.asarray(counts) / total, g[o, k]) for k in range(2)] for o in range(len(orders))])
    return {
        "deletion": float(areas[0, 0]),
        "insertion": float(areas[0, 1]),
        "deletion_random": float(areas[1:, 0].mean()),
        "insertion_random": float(areas[1:, 1].mean()),
    }


def _position_dropper(drop: float, seed: int):
    """captum perturbation: each position of each input is removed (set to zero) with chance ``drop``;
    returns (perturbation, perturbed) with perturbation = 1 on removed positions, so sum(a * I) is the summed
    per-position value of the removed positions (with a spread evenly over the embedding dim)."""
    generator = torch.Generator().manual_seed(seed)

    def perturb(inputs: Tensor | tuple[Tensor, ...]):  # captum passes one tensor, or a tuple of them
        single = isinstance(inputs, Tensor)
        perturbations, perturbed = [], []
        for x in (inputs,) if single else inputs:
            removed = (torch.rand(x.shape[:2], generator=generator) < drop).to(x.device, x.dtype)
            removed = removed.reshape(*x.shape[:2], *([1] * (x.dim() - 2))).expand_as(x)
            perturbations.append(removed)
            perturbed.append(x * (1 - removed))
        if single:
            return perturbations[0], perturbed[0]
        return tuple(perturbations), tuple(perturbed)

    return perturb


def _spread(values: Sequence[np.ndarray], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per-position values as full-shape attributions: a_p / W in each of a position's W elements."""
    out = []
    for v, x in zip(values, inputs):
        width = int(np.prod(x.shape[2:])) if x.dim() > 2 else 1
        t = torch.as_tensor(np.asarray(v), dtype=x.dtype, device=x.device) / width
        out.append(t.reshape(1, -1, *([1] * (x.dim() - 2))).expand_as(x).contiguous())
    return tuple(out)


def _infidelity(forward, inputs, values, thresholds: CheckThresholds, seed: int) -> float:
    from captum.metrics import infidelity

    return float(
        infidelity(
            forward,
            _position_dropper(thresholds.infidelity_drop, seed),
            inputs,
            _spread(values, inputs),
            n_perturb_samples=thresholds.infidelity_samples,
            normalize=True,
        ).reshape(-1)[0]
    )


def _sensitivity(method: str, forward, inputs, thresholds: CheckThresholds, n_steps: int) -> float:
    from captum.attr import IntegratedGradients, Occlusion
    from captum.metrics import sensitivity_max

    radius = thresholds.sensitivity_radius * float(torch.cat([x.detach().abs().reshape(-1) for x in inputs]).mean())

    def tupled(xs) -> tuple[Tensor, ...]:  # captum passes one tensor, or a tuple of them
        return (xs,) if isinstance(xs, Tensor) else tuple(xs)

    if method == "ig":
        ig = IntegratedGradients(forward)

        def explanation(xs):
            xs = tupled(xs)
            return ig.attribute(xs, baselines=tuple(torch.zeros_like(x) for x in xs), n_steps=n_steps)
    elif method == "occlusion":
        occ = Occlusion(forward)

        def explanation(xs):
            xs = tupled(xs)
            return occ.attribute(
                xs,
                sliding_window_shapes=tuple((1, *x.shape[2:]) for x in xs),
                strides=tuple((1, *x.shape[2:]) for x in xs),
                baselines=tuple(torch.zeros_like(x) for x in xs),
                perturbations_per_eval=16,
            )
    else:

        def explanation(xs):
            return tuple(x.norm(dim=-1, keepdim=True).expand_as(x).contiguous() for x in tupled(xs))

    return float(
        sensitivity_max(
            explanation,
            inputs if len(inputs) > 1 else inputs[0],
            perturb_radius=radius,
            n_perturb_samples=thresholds.sensitivity_samples,
        ).reshape(-1)[0]
    )


def _wilcoxon(diff: np.ndarray, alternative: str) -> float:
    diff = diff[~np.isnan(diff)]
    if len(diff) < 2 or np.all(diff == 0):
        return math.nan
    return float(stats.wilcoxon(diff, alternative=alternative).pvalue)


def faithfulness_rows(
    adapter: ModelAdapter,
    spec: ModelSpec,
    examples: Sequence[dict],
    methods: Sequence[str] = SANITY_METHODS,
    n_steps: int = 32,
    sensitivity: bool = True,
    thresholds: CheckThresholds = THRESHOLDS,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """``deletion_auc``, ``insertion_auc``, ``infidelity`` and ``sensitivity_max`` rows per method, means over
    ``examples``; baselines: random orders (curves) and the values shuffled over positions (infidelity); p: a
    one-sided Wilcoxon signed-rank test over examples of explanation minus baseline."""
    target = _prediction_target(spec)
    rng = np.random.default_rng(seed)
    per: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    for j, ex in enumerate(tqdm(examples, desc="faithfulness", disable=not progress, file=sys.stderr)):
        named = {k: v.detach().to(adapter.device) for k, v in adapter.attribution_inputs(ex).items()}
        names, inputs = list(named), tuple(named.values())
        forward = _forward(adapter, ex, target, names)
        for m in methods:
            values = explain(m, forward, inputs, n_steps=n_steps)
            got = deletion_insertion(
                forward, inputs, values, thresholds.curve_steps, thresholds.random_orders, seed + j
            )
            flat = np.concatenate([np.ravel(v) for v in values])
            shuffled = np.split(rng.permutation(flat), np.cumsum([len(np.ravel(v)) for v in values])[:-1])
            got["infidelity"] = _infidelity(forward, inputs, values, thresholds, seed + j)
            got["infidelity_random"] = _infidelity(forward, inputs, shuffled, thresholds, seed + j)
            if sensitivity and m == "ig":  # occlusion's and the control's cost more and say little
                got["sensitivity_max"] = _sensitivity(m, forward, inputs, thresholds, n_steps)
            for k, v in got.items():
                per[m].setdefault(k, []).append(v)
    rows = []
    for m, got in per.items():
        for check, lower_better, what in (
            (
                "deletion_auc",
                True,
                "area under the normalised output as the most-attributed positions are removed first",
            ),
            (
                "insertion_auc",
                False,
                "area under the normalised output as the most-attributed positions are added back first",
            ),
            (
                "infidelity",
                True,
                f"captum infidelity (normalised) under random removal of {thresholds.infidelity_drop:.0%} of positions",
            ),
        ):
            key = check.replace("_auc", "")
            own, base = np.asarray(got.get(key, []), float), np.asarray(got.get(f"{key}_random", []), float)
            if not len(own):
                continue
            value = float(np.nanmean(own)) if np.isfinite(own).any() else math.nan
            baseline = float(np.nanmean(base)) if np.isfinite(base).any() else math.nan
            better = _above(baseline, value) if lower_better else _above(value, baseline)
            reference = "random orders" if check != "infidelity" else "the same values shuffled over positions"
            rows.append(
                _row(
                    check,
                    m,
                    slice=ALL,
                    value=value,
                    n=int(np.isfinite(own).sum()),
                    baseline=baseline,
                    p_value=_wilcoxon(own - base, "less" if lower_better else "greater"),
                    flagged=bool(np.isfinite(value) and np.isfinite(baseline) and not better),
                    detail=f"{what}; {'lower' if lower_better else 'higher'} is better; baseline: {reference}",
                )
            )
        if "sensitivity_max" in got:
            vals = np.asarray(got["sensitivity_max"], float)
            rows.append(
                _row(
                    "sensitivity_max",
                    m,
                    slice=ALL,
                    value=float(np.nanmean(vals)),
                    n=int(np.isfinite(vals).sum()),
                    detail=f"captum sensitivity_max: largest relative change of the explanation under "
                    f"L-inf noise of {thresholds.sensitivity_radius:g} x mean|x| "
                    f"({thresholds.sensitivity_samples} samples); lower is steadier; not judged",
                )
            )
    return rows


# =============================================================================================
# Causal expert knockout, run-wide
# =============================================================================================


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
) -> dict:
    """Every check of one run: ``{"tables": {explanation_checks, knockout_effects, detector_suite},
    "json": summary}`` (see :func:`summary_json`). ``extras`` are the stored declared-output tables."""
    seed = int(params.get("seed", 0))
    batch_size = int(params.get("batch_size", 32))
    sizes = check_samples(params, len(examples))
    decisive = spec.decisive_label()
    label = decisive.name if decisive is not None else (spec.slice_labels() or [None])[0]
    labels = spec.slice_labels()

    rows = decisive_share_rows(attributions, examples_df, spec) if attributions is not None else []
    for output in spec.output("source_weights"):
        rows += source_agreement_rows(extras.get(output.name), examples_df, output, labels, thresholds, seed)
    rows += routing_specialisation_rows(routing, examples_df, spec, thresholds, seed)

    if sizes["sanity"] and spec.attribution_targets and any(not t.needs_layer for t in spec.attribution_targets):
        attributed = set(attributions[KEY].unique()) if attributions is not None and len(attributions) else None
        pool = [ex for ex in examples if attributed is None or int(ex["index"]) in attributed] or list(examples)
        sanity = _sample(pool, sizes["sanity"], label, seed)
        n_steps = int(params.get("sanity_ig_steps", 16))
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
        rows += faithfulness_rows(
            adapter, spec, sanity, n_steps=n_steps, thresholds=thresholds, seed=seed, progress=progress
        )

    knock_sample = _sample(list(examples), sizes["knockout"], label, seed) if sizes["knockout"] else []
    knockout, notes = (
        knockout_effects(adapter, spec, knock_sample, batch_size, routing, progress)
        if knock_sample
        else (_frame([], KNOCKOUT_COLUMNS), {})
    )
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

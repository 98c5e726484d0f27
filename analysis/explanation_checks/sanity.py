"""Sanity checks of attributions: cascading parameter randomisation (Adebayo et al.), deletion / insertion
curves, captum infidelity and sensitivity.

Part of :mod:`analysis.explanation_checks` (see its docstring for the whole).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import auc
from torch import Tensor, nn
from tqdm.auto import tqdm

from analysis.explanation_checks.common import (
    ALL,
    CONTROL,
    METHODS,
    SANITY_METHODS,
    THRESHOLDS,
    CheckThresholds,
    _above,
    _row,
)
from mmoe_core.adapter import ModelAdapter
from mmoe_core.spec import ModelSpec


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

"""Input attributions through the model adapter, with captum.

Every method explains one scalar of one example (:class:`ExplainedOutput`): the prediction score /
answer logit, or one router logit (layer, expert, position). The function to explain comes from
``adapter.attribution_forward`` and the inputs from ``adapter.attribution_inputs`` (each [1, N, W]:
text-token embeddings, image-patch embeddings, ...), so nothing here knows a model family.

Per-position values
-------------------
* Integrated gradients: the attribution summed over the embedding dim (signed); ``abs_values`` is its
  absolute value. Completeness: the sum over all inputs and positions equals f(x) - f(baseline) up to
  ``delta`` (captum's convergence delta).
* Occlusion: the drop f(x) - f(x with a window of positions set to the baseline), averaged over the
  windows that cover a position (captum's rule); the embedding dim is averaged, not summed, since
  every element of an occluded position gets the same value.

``share`` is each input's part of the total absolute mass (sums to 1 over the attributed inputs).

Batch independence
------------------
IG evaluates many scaled copies of the inputs in one batch. If a model's output for one row depends
on the other rows of the batch (as with the published MMoE gate, which normalises over the batch
axis), IG through it is wrong. Each call checks this once (x and the baseline together vs alone)
and warns: the adapter's ``attribution_forward`` must evaluate rows independently.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients, Occlusion
from torch import Tensor
from tqdm.auto import tqdm

from analysis.sampling import stratified_indices
from mmoe_core.adapter import ModelAdapter
from mmoe_core.routing_record import flatten_call

__all__ = [
    "AttributionResult",
    "ExplainedOutput",
    "attribute",
    "integrated_gradients",
    "occlusion",
    "occlusion_image",
    "image_input_names",
    "router_attribution",
    "default_router_target",
    "attribution_table",
    "modality_share_by_label",
    "TABLE_COLUMNS",
    "METHODS",
]

METHODS = ("ig", "occlusion")
ROUTER_TARGET = "router_logit"
TABLE_COLUMNS = (
    "example_index",
    "method",
    "target",
    "layer",
    "expert",
    "call",
    "target_position",
    "input",
    "position",
    "label",
    "value",
    "abs_value",
    "share",
    "delta",
)

Baseline = str | Mapping[str, Tensor]  # "zeros", or a tensor per input name (broadcast to the input)


@dataclass(frozen=True)
class ExplainedOutput:
    """The scalar being explained: ``name`` is an adapter attribution target ("score",
    "answer_logit", "router_logit"); router logits also name layer, expert, position and call."""

    name: str
    layer: str | None = None
    expert: int | None = None
    position: int | None = None
    call: str | None = None

    @property
    def is_router(self) -> bool:
        return self.name == ROUTER_TARGET

    def describe(self) -> str:
        if not self.is_router:
            return self.name
        where = f" ({self.call})" if self.call else ""
        return f"router logit of expert {self.expert} at position {self.position}{where} of {self.layer}"


@dataclass
class AttributionResult:
    """Attributions of one example for one explained output, per input name."""

    method: str  # "ig" | "occlusion"
    target: ExplainedOutput
    values: dict[str, np.ndarray]  # per position, signed
    abs_values: dict[str, np.ndarray]
    labels: dict[str, list[str]]  # per position, from adapter.input_labels
    share: dict[str, float]  # share of the total absolute mass
    delta: float = math.nan  # IG convergence delta (nan for occlusion)
    n_steps: int | None = None
    output: float = math.nan  # f(x)
    baseline_output: float = math.nan  # f(baseline)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.target.describe()

    def total(self) -> float:
        """Sum of the signed attributions over every input and position."""
        return float(sum(v.sum() for v in self.values.values()))

    def to_rows(self, example_index: int) -> list[dict]:
        """One dict per (input, position), with the columns of :data:`TABLE_COLUMNS`."""
        t = self.target
        common = {
            "example_index": int(example_index),
            "method": self.method,
            "target": t.name,
            "layer": t.layer,
            "expert": t.expert,
            "call": t.call,
            "target_position": t.position,
            "delta": self.delta,
        }
        return [
            {
                **common,
                "input": name,
                "position": i,
                "label": self.labels[name][i],
                "value": float(v),
                "abs_value": float(self.abs_values[name][i]),
                "share": self.share[name],
            }
            for name, values in self.values.items()
            for i, v in enumerate(values)
        ]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _declared_target(adapter: ModelAdapter, name: str) -> str:
    declared = [t.name for t in adapter.attribution_targets()]
    if name not in declared:
        raise ValueError(f"target {name!r} not declared by {type(adapter).__name__}; declared: {declared}")
    return name


def _prediction_target(adapter: ModelAdapter, name: str | None) -> str:
    """The prediction target to explain: ``name``, or the adapter's first declared one when None."""
    prediction_targets = [t.name for t in adapter.attribution_targets() if not t.needs_layer]
    if name is None:
        if not prediction_targets:
            raise ValueError(f"{type(adapter).__name__} declares no prediction attribution target")
        return prediction_targets[0]
    if name == ROUTER_TARGET:
        raise ValueError("a router logit needs (layer, expert, position): use router_attribution")
    return _declared_target(adapter, name)


def _baselines_for(inputs: Mapping[str, Tensor], baseline: Baseline) -> dict[str, Tensor]:
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise ValueError(f"unknown baseline {baseline!r}; use 'zeros' or a tensor per input name")
        return {name: torch.zeros_like(x) for name, x in inputs.items()}
    return {name: baseline[name].to(x).expand_as(x).clone() for name, x in inputs.items()}


def _restricted_forward(
    forward: Callable[..., Tensor], names: Sequence[str], attributed: Sequence[str], fixed: Mapping[str, Tensor]
) -> Callable[..., Tensor]:
    """``forward`` as a function of the ``attributed`` inputs only; the others stay at ``fixed``
    (expanded to the batch size captum uses)."""

    def restricted(*tensors: Tensor) -> Tensor:
        given = dict(zip(attributed, tensors))
        batch = tensors[0].shape[0]
        args = [given[n] if n in given else fixed[n].expand(batch, *fixed[n].shape[1:]) for n in names]
        # Adding 0 * each input keeps every attributed input in the graph: a target that ignores one
        # (a text-side router logit vs image patches) then gets exact zeros instead of an autograd error.
        unused_guard = sum((t * 0).reshape(batch, -1).sum(dim=1) for t in tensors)
        return forward(*args).reshape(batch) + unused_guard

    return restricted


def _outputs_and_batch_check(
    forward: Callable[..., Tensor], inputs: Sequence[Tensor], baselines: Sequence[Tensor], what: str
) -> tuple[float, float]:
    """f(x), f(baseline); warns when evaluating them in one batch changes the answer."""
    with torch.no_grad():
        alone = torch.cat([forward(*inputs), forward(*baselines)])
        together = forward(*[torch.cat([x, b]) for x, b in zip(inputs, baselines)])
    if not torch.allclose(alone, together, rtol=1e-4, atol=1e-5):
        warnings.warn(
            f"attribution forward for {what} is batch dependent (x alone {alone.tolist()} vs in a "
            f"batch {together.tolist()}): attributions are unreliable; the adapter's "
            "attribution_forward should evaluate rows independently",
            RuntimeWarning,
            stacklevel=3,
        )
    return float(alone[0]), float(alone[1])


def _per_position(attr: Tensor, reduce: str) -> np.ndarray:
    """[1, N, ...] attribution -> [N] by summing (IG) or averaging (occlusion) the trailing dims."""
    a = attr.detach().double().reshape(attr.shape[0], attr.shape[1], -1)[0]
    return (a.sum(dim=-1) if reduce == "sum" else a.mean(dim=-1)).cpu().numpy()


def _shares(abs_values: Mapping[str, np.ndarray]) -> dict[str, float]:
    mass = {name: float(v.sum()) for name, v in abs_values.items()}
    total = sum(mass.values())
    return {name: (m / total if total > 0 else math.nan) for name, m in mass.items()}


def _labels_for(adapter: ModelAdapter, example: dict, inputs: Mapping[str, Tensor]) -> dict[str, list[str]]:
    given = adapter.input_labels(example) or {}
    labels = {}
    for name, x in inputs.items():
        own = list(given.get(name, []))[: x.shape[1]]
        labels[name] = own + [f"{name}[{i}]" for i in range(len(own), x.shape[1])]
    return labels


# ---------------------------------------------------------------------------------------------
# Captum methods: (forward, inputs, baselines, options) -> per-input attribution tensors, delta
# ---------------------------------------------------------------------------------------------


def _run_ig(forward, inputs, baselines, *, n_steps: int, internal_batch_size: int, **_) -> tuple[tuple, float]:
    attrs, delta = IntegratedGradients(forward).attribute(
        inputs,
        baselines=baselines,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    return attrs, float(delta.reshape(-1)[0])


def _run_occlusion(
    forward, inputs, baselines, *, window: int, stride: int, perturbations_per_eval: int, **_
) -> tuple[tuple, float]:
    # Slide along the position axis only: each window covers whole positions (every embedding dim).
    windows = tuple((window, *x.shape[2:]) for x in inputs)
    strides = tuple((stride, *x.shape[2:]) for x in inputs)
    attrs = Occlusion(forward).attribute(
        inputs,
        sliding_window_shapes=windows,
        strides=strides,
        baselines=baselines,
        perturbations_per_eval=perturbations_per_eval,
    )
    return attrs, math.nan


_METHOD_RUNNERS = {"ig": (_run_ig, "sum"), "occlusion": (_run_occlusion, "mean")}


def attribute(
    adapter: ModelAdapter,
    example: dict,
    target: ExplainedOutput,
    method: str = "ig",
    *,
    input_names: Sequence[str] | None = None,
    baseline: Baseline = "zeros",
    n_steps: int = 32,
    internal_batch_size: int = 8,
    window: int = 1,
    stride: int = 1,
    perturbations_per_eval: int = 8,
) -> AttributionResult:
    """Attribute ``target`` of ``example`` to the adapter's attribution inputs with ``method``.

    ``input_names`` restricts which inputs are attributed (the others stay as they are);
    IG uses ``n_steps`` and ``internal_batch_size``; occlusion uses ``window``/``stride`` (in positions).
    """
    if method not in _METHOD_RUNNERS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {METHODS}")
    all_inputs = {name: x.detach().to(adapter.device) for name, x in adapter.attribution_inputs(example).items()}
    names = list(all_inputs)
    attributed = list(input_names) if input_names is not None else names
    unknown = set(attributed) - set(names)
    if unknown:
        raise ValueError(f"unknown inputs {sorted(unknown)}; attribution inputs: {names}")
    forward = _restricted_forward(
        adapter.attribution_forward(
            example, target.name, layer=target.layer, expert=target.expert, position=target.position, call=target.call
        ),
        names,
        attributed,
        all_inputs,
    )
    inputs = tuple(all_inputs[n] for n in attributed)
    baselines_by_name = _baselines_for({n: all_inputs[n] for n in attributed}, baseline)
    baselines = tuple(baselines_by_name[n] for n in attributed)
    output, baseline_output = _outputs_and_batch_check(forward, inputs, baselines, target.describe())

    run, reduce = _METHOD_RUNNERS[method]
    attrs, delta = run(
        forward,
        inputs,
        baselines,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        window=window,
        stride=stride,
        perturbations_per_eval=perturbations_per_eval,
    )
    values = {name: _per_position(a, reduce) for name, a in zip(attributed, attrs)}
    abs_values = {name: np.abs(v) for name, v in values.items()}
    labels = _labels_for(adapter, example, {n: all_inputs[n] for n in attributed})
    params = (
        {"n_steps": n_steps, "internal_batch_size": internal_batch_size}
        if method == "ig"
        else {"window": window, "stride": stride}
    )
    return AttributionResult(
        method,
        target,
        values,
        abs_values,
        labels,
        _shares(abs_values),
        delta,
        n_steps if method == "ig" else None,
        output,
        baseline_output,
        {**params, "baseline": baseline if isinstance(baseline, str) else "given"},
    )


# ---------------------------------------------------------------------------------------------
# The named entry points (one call shape: adapter, example, what to explain, method options)
# ---------------------------------------------------------------------------------------------


def integrated_gradients(
    adapter: ModelAdapter,
    example: dict,
    target: str | None = None,
    n_steps: int = 32,
    baseline: Baseline = "zeros",
    internal_batch_size: int = 8,
) -> AttributionResult:
    """IG of the prediction (``target`` "score" | "answer_logit"; default: the adapter's first
    declared prediction target) w.r.t. every attribution input, with its convergence delta."""
    explained = ExplainedOutput(_prediction_target(adapter, target))
    return attribute(
        adapter, example, explained, "ig", baseline=baseline, n_steps=n_steps, internal_batch_size=internal_batch_size
    )


def occlusion(
    adapter: ModelAdapter,
    example: dict,
    target: str | None = None,
    window: int = 1,
    stride: int = 1,
    input_names: Sequence[str] | None = None,
    baseline: Baseline = "zeros",
    perturbations_per_eval: int = 8,
) -> AttributionResult:
    """Occlusion of ``window`` positions at a time (set to the baseline) over ``input_names``
    (default: every attribution input, each occluded on its own)."""
    explained = ExplainedOutput(_prediction_target(adapter, target))
    return attribute(
        adapter,
        example,
        explained,
        "occlusion",
        input_names=input_names,
        baseline=baseline,
        window=window,
        stride=stride,
        perturbations_per_eval=perturbations_per_eval,
    )


def image_input_names(adapter: ModelAdapter, example: dict) -> list[str]:
    """Attribution inputs the adapter declares as image patches."""
    image_kinds = {spec.name for spec in adapter.input_spec() if spec.kind == "image_patches"}
    return [name for name in adapter.attribution_inputs(example) if name in image_kinds]


def occlusion_image(
    adapter: ModelAdapter,
    example: dict,
    target: str | None = None,
    window: int = 1,
    stride: int = 1,
    baseline: Baseline = "zeros",
    perturbations_per_eval: int = 8,
) -> AttributionResult:
    """Occlusion over image patches only: each window of ``window`` patches is zeroed in turn; the
    value of a patch is the drop of the prediction when it is hidden."""
    names = image_input_names(adapter, example)
    if not names:
        raise ValueError(f"{type(adapter).__name__} has no image_patches attribution input")
    return occlusion(adapter, example, target, window, stride, names, baseline, perturbations_per_eval)


def router_attribution(
    adapter: ModelAdapter,
    example: dict,
    layer: str,
    expert: int,
    position: int,
    call: str | None = None,
    method: str = "ig",
    n_steps: int = 32,
    baseline: Baseline = "zeros",
    internal_batch_size: int = 8,
    window: int = 1,
) -> AttributionResult:
    """Why did ``position`` (of ``call`` of ``layer``) go to ``expert``: attributions of that router
    logit w.r.t. the same inputs as the prediction."""
    explained = ExplainedOutput(_declared_target(adapter, ROUTER_TARGET), layer, int(expert), int(position), call)
    return attribute(
        adapter,
        example,
        explained,
        method,
        baseline=baseline,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        window=window,
    )


# ---------------------------------------------------------------------------------------------
# Tables over a sample of examples
# ---------------------------------------------------------------------------------------------

RouterTargetChooser = Callable[[ModelAdapter, dict], "ExplainedOutput | None"]


def default_router_target(adapter: ModelAdapter, example: dict) -> ExplainedOutput | None:
    """The top-1 expert of the first routed position of the example's own first call of the first
    routed layer (e.g. the mention-side CLS of the first MoE; knowledge-base calls, subject "kb", are
    skipped). "Routed": a non-zero combine weight, which the published MMoE gate denies to most
    positions. None when the example routes nothing there."""
    layers = adapter.routed_layers()
    if not layers:
        return None
    layer = layers[0]
    recorder = adapter.run([example], record=True, batch_size=1).recorder
    for recorded in recorder.calls if recorder is not None else []:
        if recorded.layer != layer.name or (recorded.meta is not None and recorded.meta.subject != "example"):
            continue
        rows = flatten_call(recorded)
        for i, position in enumerate(rows["position"]):
            if rows["example_index"][i] == example["index"] and rows["combine"][i].sum() > 0:
                return ExplainedOutput(
                    ROUTER_TARGET, layer.name, int(rows["topk_ids"][i][0]), int(position), rows["call"][i] or None
                )
    return None


def _label_columns(example: dict) -> dict[str, Any]:
    """The example's labels as extra table columns (prefixed where a name is already a column)."""
    return {
        (f"example_{k}" if k in TABLE_COLUMNS or k == "example_id" else k): v
        for k, v in (example.get("labels") or {}).items()
    }


def _example_rows(
    adapter: ModelAdapter,
    example: dict,
    target: str | None,
    n_steps: int,
    internal_batch_size: int,
    occlusion_window: int,
    router_target: RouterTargetChooser | None,
) -> list[dict]:
    results = [integrated_gradients(adapter, example, target, n_steps, internal_batch_size=internal_batch_size)]
    if image_input_names(adapter, example):
        results.append(occlusion_image(adapter, example, target, window=occlusion_window))
    chosen = router_target(adapter, example) if router_target is not None else None
    if chosen is not None:
        results.append(
            attribute(adapter, example, chosen, "ig", n_steps=n_steps, internal_batch_size=internal_batch_size)
        )
    extra = {"example_id": example.get("id"), **_label_columns(example)}
    return [{**row, **extra} for result in results for row in result.to_rows(example["index"])]


def attribution_table(
    adapter: ModelAdapter,
    examples: Sequence[dict],
    sample_size: int = 200,
    stratify_by: str | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    target: str | None = None,
    n_steps: int = 32,
    internal_batch_size: int = 8,
    occlusion_window: int = 1,
    router_target: RouterTargetChooser | None = default_router_target,
    shard: tuple[int, int] = (0, 1),
) -> pd.DataFrame:
    """Attributions of a stratified random sample of ``examples`` in one long table.

    Per sampled example: IG of the prediction target, occlusion of the image inputs (when the adapter
    has any), and IG of one router logit chosen by ``router_target`` (default
    :func:`default_router_target`; None to skip). Columns: :data:`TABLE_COLUMNS`, ``example_id`` and
    one column per example label. The sample is stratified by ``example["labels"][stratify_by]`` (the
    precompute passes the spec's deciding label, ``spec.deciding_label()``; None: uniform) and is never
    simply the head of ``examples``.
    ``shard`` = (rank, world) keeps that rank's contiguous block of the sample (precompute under torchrun).
    """
    strata = [str((ex.get("labels") or {}).get(stratify_by)) for ex in examples] if stratify_by is not None else None
    chosen = stratified_indices(len(examples), sample_size, strata, seed)
    rank, world = shard
    chosen = chosen[rank * len(chosen) // world : (rank + 1) * len(chosen) // world]
    rows: list[dict] = []
    for i in tqdm(chosen, desc="attributions", unit="example", disable=not progress):
        rows.extend(
            _example_rows(adapter, examples[i], target, n_steps, internal_batch_size, occlusion_window, router_target)
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    return table.astype({"expert": "Int64", "target_position": "Int64", "layer": "string", "call": "string"})


def modality_share_by_label(
    table: pd.DataFrame, label_column: str, method: str = "ig", target: str | None = None
) -> pd.DataFrame:
    """Mean share of attribution mass per input, by the value of ``label_column``.

    Uses the rows of ``method`` for ``target`` (default: every non-router target, i.e. the prediction).
    Each example counts once; an input an example lacks counts as share 0 for it. Returns one row per
    label value, one column per input, plus ``n_examples``.
    """
    rows = table[table["method"] == method]
    rows = rows[rows["target"] == target] if target is not None else rows[rows["target"] != ROUTER_TARGET]
    per_example = rows.pivot_table(index="example_index", columns="input", values="share", aggfunc="first")
    per_example = per_example.dropna(how="all").fillna(0.0)
    label_of = rows.groupby("example_index")[label_column].first()
    shares = per_example.groupby(label_of.reindex(per_example.index)).mean()
    shares["n_examples"] = per_example.groupby(label_of.reindex(per_example.index)).size()
    shares.index.name = label_column
    shares.columns.name = None
    return shares

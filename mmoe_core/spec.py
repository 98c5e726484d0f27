"""What a model family declares about itself: the one vocabulary pages and analysis build from.

Like LIT's ``input_spec`` / ``output_spec``, an adapter describes its model in plain, JSON-able data
(:class:`ModelSpec`); precompute writes it into the run's manifest, so a page that only reads stored
artifacts knows the same things a live adapter knows, and nothing in ``analysis/`` or ``pages/`` ever
names a family or one family's field names.

Pieces
------
* :class:`ExampleField`: a field of an example as a person sees it (its key in the example dict and in
  the ``examples`` table, a label in words, its kind, whether the playground may edit it and how long it
  may be). The first field with ``role="title"`` is the example's one-line headline.
* :class:`InputSpec`: a differentiable input of the model (token embeddings, image patches), the thing
  attributions are computed on; image inputs carry their :class:`ImageGrid`.
* :class:`GateSpec` / :class:`RoutedLayerSpec`: every routed layer and what its gate really does (score
  function, normalisation, batch dependence, shared experts, capacity, bias correction, group limits).
* :class:`PredictionSpec`: ranking, answer or language-model loss, and the headline metric keys.
* :class:`OutputSpec`: typed extra outputs that a generic renderer shows (``source_weights``:
  per-position weights over named sources, QGA's kind; ``named_scores``: a few named scores per example).
* :class:`LabelSpec`: the labels to slice by; which are ground truth, and for a ground-truth label
  which inputs / sources each value points at (``decides``), so explanation checks can be scored.
* :class:`TrainingPhase`: steps where the training schedule changes, for the dynamics figures.

Prediction rows (what ``adapter.run`` returns per example) use these keys, whatever the kind:
``index``, ``id``, ``prediction`` (display text: an entity's name, an answer, a next token),
``prediction_id`` (machine id, e.g. a KB row; optional), ``gold`` (display text or None), ``gold_id``,
``correct`` (bool or None), ``score``. A ranking adds ``rank`` and ``top_ids`` / ``top_names`` /
``top_scores`` (best first); an answer adds nothing; ``lm_loss`` adds ``loss`` (mean per-token loss),
``token_losses`` and ``next_tokens`` (top-5 strings at the last position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FIELD_KINDS = ("text", "long_text", "image", "category", "number", "id")
INPUT_KINDS = ("text_tokens", "image_patches")
PREDICTION_KINDS = ("ranking", "answer", "lm_loss")
OUTPUT_KINDS = ("source_weights", "named_scores")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
# How the combine weights of the chosen experts are formed from the gate's scores.
NORMALISATIONS = (
    "topk_renormalised",  # chosen scores divided by their sum (Mixtral, OLMoE with norm_topk_prob ...)
    "topk_raw",  # chosen scores as they are (Qwen-MoE with norm_topk_prob=False ...)
    "topk_scaled",  # chosen scores (renormalised or not) times a routed scaling factor (DeepSeek-V3)
    "batch_column",  # published MEL-MMoE SwitchGate: columns over the batch axis, times a capacity
)


@dataclass(frozen=True)
class ExampleField:
    name: str  # key in the example dict and column of the examples table
    label: str  # in words, for a person: "Mention sentence", "Question"
    kind: str = "text"  # one of FIELD_KINDS
    editable: bool = False  # the playground offers a widget for it
    role: str = ""  # "title": the example's headline; "gold": the gold answer / entity
    max_chars: int = 2000  # editable text is cut here (and the page says so)


@dataclass(frozen=True)
class ImageGrid:
    rows: int
    cols: int
    first_position: int = 0  # index, among the input's positions, of patch (0, 0); row-major after it


@dataclass(frozen=True)
class InputSpec:
    name: str  # e.g. "mention_text", "image": a key of attribution_inputs()
    kind: str  # one of INPUT_KINDS
    description: str
    field: str = ""  # the example field this input reads (for the playground), if any
    grid: ImageGrid | None = None  # image inputs: the patch grid (may vary per example: see input_labels)


@dataclass(frozen=True)
class GateSpec:
    """What the gate does, as declared by the family (and shown on the pages)."""

    kind: str = "topk_softmax"  # a name: "topk_softmax", "mmoe_reference", "hf:<RouterClass>"
    score: str = "softmax"  # one of SCORE_FUNCTIONS
    normalisation: str = "topk_renormalised"  # one of NORMALISATIONS
    batch_dependent: bool = False  # one example's weights depend on the other rows of its batch
    shared_experts: int = 0  # always-on experts beside the routed ones (not in the E columns)
    capacity: float | None = None  # capacity factor, when the gate applies one
    score_correction_bias: bool = False  # a learned bias changes the choice but not the weights (DeepSeek-V3)
    group_limited: str = ""  # e.g. "8 groups, top-4 groups" (DeepSeek-V3), "" when none
    note: str = ""  # anything else a user must know, in words


@dataclass(frozen=True)
class RoutedLayerSpec:
    name: str  # the layer's name, as it appears in routing records
    num_experts: int
    top_k: int
    gate: GateSpec = field(default_factory=GateSpec)
    routed: str = ""  # what is routed, in words
    gate_sees: str = ""  # what the gate input is, in words
    calls: tuple[str, ...] = ()  # the PositionMeta.call values this layer is called with

    @property
    def gate_kind(self) -> str:
        return self.gate.kind


@dataclass(frozen=True)
class PredictionSpec:
    kind: str  # one of PREDICTION_KINDS
    description: str
    headline: tuple[str, ...] = ()  # keys of summary["overall"] to show first, e.g. ("hits@1", "mrr")
    item: str = "item"  # what is predicted, in words: "entity", "answer", "next token"


@dataclass(frozen=True)
class SourceSpec:
    name: str  # e.g. "image": also a value of the ground-truth label it is checked against
    column: str  # the list column holding its per-position weights, e.g. "alpha"
    label: str  # in words: "alpha (image)"
    colour: str = ""


@dataclass(frozen=True)
class OutputSpec:
    name: str  # key in RunOutput.extras and the stored table name
    kind: str  # one of OUTPUT_KINDS
    description: str
    sources: tuple[SourceSpec, ...] = ()  # source_weights: the named sources (weights sum to 1 per position)
    truth_label: str = ""  # source_weights: the ground-truth label naming each example's source
    positions: str = "tokens"  # source_weights: the list column naming the positions


@dataclass(frozen=True)
class LabelSpec:
    name: str  # key of example["labels"]
    description: str
    ground_truth: bool = False  # generated with the data (checkable), not predicted
    # For a label that says which input decides an example: label value -> the names of the inputs
    # (InputSpec.name) or sources (SourceSpec.name) that value points at, e.g. {"image": ("mention_image",)}.
    decides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class AttributionTarget:
    name: str  # "score" | "answer_logit" | "next_token_logit" | "router_logit"
    description: str
    needs_layer: bool = False  # router_logit: needs (layer, expert, position)


@dataclass(frozen=True)
class TrainingPhase:
    option: str  # the training option that sets it, e.g. "image_warmup_steps"
    step: int  # first step of the new phase
    label: str  # in words, for the figure: "image tower frozen"


@dataclass(frozen=True)
class ModelSpec:
    family: str
    title: str  # the family in words: "MMoE: multimodal entity linking"
    fields: tuple[ExampleField, ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    routed_layers: tuple[RoutedLayerSpec, ...] = ()
    prediction: PredictionSpec = PredictionSpec("answer", "")
    outputs: tuple[OutputSpec, ...] = ()
    labels: tuple[LabelSpec, ...] = ()
    attribution_targets: tuple[AttributionTarget, ...] = ()
    training_phases: tuple[TrainingPhase, ...] = ()
    model_card: Mapping[str, str] = field(default_factory=dict)  # facts to show: "encoder": "tiny-64", ...
    notes: tuple[str, ...] = ()  # warnings a page must show with this model (e.g. a batch-dependent gate)

    # ---- lookups the pages need ---------------------------------------------------------------
    def title_field(self) -> ExampleField | None:
        return next(
            (f for f in self.fields if f.role == "title"),
            next((f for f in self.fields if f.kind in ("text", "long_text")), None),
        )

    def text_fields(self) -> list[ExampleField]:
        return [f for f in self.fields if f.kind in ("text", "long_text")]

    def editable_fields(self) -> list[ExampleField]:
        return [f for f in self.fields if f.editable]

    def layer(self, name: str) -> RoutedLayerSpec:
        for spec in self.routed_layers:
            if spec.name == name:
                return spec
        raise KeyError(f"unknown routed layer {name!r}; layers: {[s.name for s in self.routed_layers]}")

    def output(self, kind: str) -> list[OutputSpec]:
        return [o for o in self.outputs if o.kind == kind]

    def ground_truth_labels(self) -> list[LabelSpec]:
        return [lab for lab in self.labels if lab.ground_truth]

    def deciding_label(self) -> LabelSpec | None:
        """The ground-truth label that names which input decides each example, if the family has one."""
        return next((lab for lab in self.labels if lab.ground_truth and lab.decides), None)

    def slice_labels(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def image_inputs(self) -> list[InputSpec]:
        return [i for i in self.inputs if i.kind == "image_patches"]

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> ModelSpec:
        return _build(ModelSpec, d)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# The nested dataclass of each field that holds one (or a tuple of them); the rest stay as read.
_NESTED: dict[tuple[type, str], type] = {
    (ModelSpec, "fields"): ExampleField,
    (ModelSpec, "inputs"): InputSpec,
    (ModelSpec, "routed_layers"): RoutedLayerSpec,
    (ModelSpec, "prediction"): PredictionSpec,
    (ModelSpec, "outputs"): OutputSpec,
    (ModelSpec, "labels"): LabelSpec,
    (ModelSpec, "attribution_targets"): AttributionTarget,
    (ModelSpec, "training_phases"): TrainingPhase,
    (InputSpec, "grid"): ImageGrid,
    (RoutedLayerSpec, "gate"): GateSpec,
    (OutputSpec, "sources"): SourceSpec,
}


def _build(cls: type, d: Mapping[str, Any]):
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in known:
            continue  # written by a newer version: ignored, not fatal
        nested = _NESTED.get((cls, key))
        if nested is not None and value is not None:
            value = (
                tuple(_build(nested, v) for v in value) if isinstance(value, (list, tuple)) else _build(nested, value)
            )
        elif key == "decides":
            value = {str(k): tuple(v) for k, v in dict(value).items()}
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)

"""Model adapters: the one place that tells analysis and pages what a model family looks like.

Like LIT's ``input_spec``/``output_spec``, each family declares its inputs, its routed layers, its
prediction and its attribution targets, and offers a forward that records routing plus a knockout of
(layer, expert). ``analysis/`` and ``pages/`` only ever talk to a :class:`ModelAdapter`; adding a
family means writing one adapter package and registering it (see :mod:`mmoe_core.registry`).

Vocabulary
----------
*example*: a plain dict with at least ``index`` (int, row in its split), ``id`` (str) and
``labels`` (dict of categorical labels for slicing: e.g. decisive / entity_type for MMoE,
question_type / answer_source for MoEMoE), plus whatever display fields the family wants
(``text``, ``image_path``, ``question``, ``answer`` ...). A page may also build one by hand (live
playground), with ``image`` holding a PIL image instead of a path.

*batch*: what :meth:`ModelAdapter.prepare` makes of a list of examples (family-specific tensors).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mmoe_core.routing_record import RoutingRecorder
from mmoe_core.spec import (  # noqa: F401
    AttributionTarget,
    ExampleField,
    ImageGrid,
    InputSpec,
    LabelSpec,
    ModelSpec,
    OutputSpec,
    PredictionSpec,
    RoutedLayerSpec,
    TrainingPhase,
)


@dataclass
class RunOutput:
    """Result of :meth:`ModelAdapter.run` for a list of examples."""

    predictions: list[dict]  # one per example: index, prediction, gold, correct, rank/answer, score ...
    recorder: RoutingRecorder | None  # routing of every MoE call (None when record=False)
    extras: dict[str, Any] = field(default_factory=dict)  # declared outputs, e.g. "qga": per-token weights
    representations: Tensor | None = None  # [n_examples, D] routed representation for the embedding map


class ModelAdapter(ABC):
    """Wraps one loaded model of a family. Construct through :func:`load_adapter`."""

    family: str = ""

    def __init__(self, model: nn.Module, config: dict, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)

    # ---- declarations (see mmoe_core.spec) -----------------------------------------------------
    title: str = ""  # the family in words, e.g. "MMoE: multimodal entity linking"

    @abstractmethod
    def fields(self) -> list[ExampleField]:
        """Display fields of an example (and which the playground may edit)."""

    @abstractmethod
    def input_spec(self) -> list[InputSpec]: ...

    @abstractmethod
    def routed_layers(self) -> list[RoutedLayerSpec]: ...

    @abstractmethod
    def prediction_spec(self) -> PredictionSpec: ...

    @abstractmethod
    def attribution_targets(self) -> list[AttributionTarget]: ...

    def output_spec(self) -> list[OutputSpec]:
        """Typed extra outputs (keys of RunOutput.extras); none by default."""
        return []

    def label_spec(self) -> list[LabelSpec]:
        """The example labels worth slicing by (keys of example['labels']), ground truth marked."""
        return []

    def training_phases(self) -> list[TrainingPhase]:
        """Steps where this checkpoint's training schedule changed phase; none by default."""
        return []

    def model_card(self) -> dict[str, str]:
        """A few facts about this checkpoint to show a person (encoder, sizes, options)."""
        return {}

    def notes(self) -> list[str]:
        """Warnings every page showing this model must carry (e.g. a batch-dependent gate)."""
        return []

    def spec(self) -> ModelSpec:
        """Everything declared above, as one JSON-able object (precompute stores it in the manifest)."""
        return ModelSpec(
            family=self.family,
            title=self.title or self.family,
            fields=tuple(self.fields()),
            inputs=tuple(self.input_spec()),
            routed_layers=tuple(self.routed_layers()),
            prediction=self.prediction_spec(),
            outputs=tuple(self.output_spec()),
            labels=tuple(self.label_spec()),
            attribution_targets=tuple(self.attribution_targets()),
            training_phases=tuple(self.training_phases()),
            model_card=dict(self.model_card()),
            notes=tuple(self.notes()),
        )

    def slice_labels(self) -> list[str]:
        return [label.name for label in self.label_spec()]

    # ---- data ----------------------------------------------------------------------------------
    @abstractmethod
    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        """Read a dataset folder (demo world or a real one in its published layout) into examples."""

    # ---- running -------------------------------------------------------------------------------
    @abstractmethod
    def run(
        self, examples: Sequence[dict], record: bool = True, batch_size: int = 32, progress: bool = False
    ) -> RunOutput:
        """Forward the examples (in batches), returning predictions and, if asked, routing records.
        PositionMeta.example_ids must be the examples' ``index`` values."""

    def route(self, examples: Sequence[dict], batch_size: int = 32) -> RoutingRecorder:
        """The routing of the examples' own positions (subject "example") when only the routing is wanted
        (training dynamics, batch dependence): by default :meth:`run`'s recorder. A family whose
        predictions cost far more than its routing (MMoE scores every mention against the whole knowledge
        base) overrides it to skip them; it must record the same example calls ``run`` records."""
        return self.run(examples, record=True, batch_size=batch_size).recorder

    @abstractmethod
    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        """Headline metrics of a run: {"overall": {...}, "by_<label>": {value: {...}}} (MMoE: MRR, MR,
        Hits@k over the whole KB; MoEMoE: exact match). Used by the evaluate CLI and the pages."""

    def routed_modules(self) -> dict[str, RoutedModule]:
        """Every routed layer of the model by its record name: any module that follows the
        :class:`RoutedModule` protocol (``SwitchMoE`` does; a family may wrap foreign gates)."""
        return {m.name: m for m in self.model.modules() if isinstance(m, RoutedModule)}

    @contextlib.contextmanager
    def knockout(self, layer: str, expert: int) -> Iterator[None]:
        """Within the block, ``expert`` of ``layer`` can never be chosen: the gate re-makes its choice
        over the other experts (renormalised as the gate normally does)."""
        layers = self.routed_modules()
        if layer not in layers:
            raise KeyError(f"unknown routed layer {layer!r}; layers: {sorted(layers)}")
        moe = layers[layer]
        if not 0 <= expert < moe.num_experts:
            raise ValueError(f"expert must be in 0..{moe.num_experts - 1}, got {expert}")
        before = moe.knocked_out
        moe.knocked_out = frozenset(before) | {expert}
        try:
            yield
        finally:
            moe.knocked_out = before

    @contextlib.contextmanager
    def ablate_layer(self, layer: str) -> Iterator[None]:
        """Within the block, the whole routed ``layer`` is removed: its MoE output is zero (every expert's
        contribution gone), the rest of the model unchanged; how much of the model's accuracy comes from
        that MoE at all. Needs a routed module that declares ``ablated`` (:class:`~mmoe_core.moe.SwitchMoE`
        does); for one that does not, raises NotImplementedError (a family may override this method)."""
        layers = self.routed_modules()
        if layer not in layers:
            raise KeyError(f"unknown routed layer {layer!r}; layers: {sorted(layers)}")
        moe = layers[layer]
        if not hasattr(moe, "ablated"):
            raise NotImplementedError(
                f"routed layer {layer!r} ({type(moe).__name__}) has no `ablated` switch: its output cannot be removed"
            )
        before = moe.ablated
        moe.ablated = True
        try:
            yield
        finally:
            moe.ablated = before

    def knockout_state(self) -> tuple:
        """A hashable description of every knocked-out expert and ablated layer (cache key for derived
        features)."""

        def layer_state(name: str, m: RoutedModule) -> tuple:
            ablated = ("ablated",) if getattr(m, "ablated", False) else ()
            return (name, tuple(sorted(m.knocked_out)), *ablated)

        return tuple(sorted(layer_state(name, m) for name, m in self.routed_modules().items()))

    # ---- attribution ---------------------------------------------------------------------------
    @abstractmethod
    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        """The differentiable input embeddings of one example by input name, each [1, N, W]
        (e.g. text-token embeddings and image-patch embeddings); also used as IG's inputs."""

    @abstractmethod
    def attribution_forward(
        self,
        example: dict,
        target: str,
        layer: str | None = None,
        expert: int | None = None,
        position: int | None = None,
        call: str | None = None,
    ) -> Callable[..., Tensor]:
        """A function of the tensors of :meth:`attribution_inputs` (same order, batch dim first,
        any batch size) returning one scalar per batch row: the prediction score/answer logit
        (``target`` = "score" / "answer_logit") or a router logit (``target`` = "router_logit":
        ``layer``, ``expert``, ``position`` in that layer's ``call``)."""

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        """Human-readable label of each position of each attribution input (token strings; patches)."""
        return {}

    def input_grids(self, example: dict) -> dict[str, ImageGrid]:
        """The patch grid of each image input for this example (default: the declared one)."""
        return {spec.name: spec.grid for spec in self.input_spec() if spec.grid is not None}


@runtime_checkable
class RoutedModule(Protocol):
    """What recording and knockout need of a routed layer, whatever its class: a record ``name``, its
    expert count, and a set of knocked-out experts that its gate honours on the next forward.

    Optional: ``ablated: bool``; a layer that has it returns zeros instead of its MoE output while it is
    True (:meth:`ModelAdapter.ablate_layer`). It is not required, so routed modules without it still
    follow the protocol."""

    name: str
    num_experts: int
    knocked_out: frozenset[int]


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_adapter(ckpt_dir: Path, device: torch.device | str | None = None, snapshot: int | None = None) -> ModelAdapter:
    """Open a checkpoint directory with the family that recognises it (see mmoe_core.registry)."""
    from mmoe_core.registry import family_for_checkpoint, load_own_checkpoint

    family = family_for_checkpoint(Path(ckpt_dir))
    device = device or default_device()
    if family.load is not None:
        return family.load(Path(ckpt_dir), device, snapshot)
    return load_own_checkpoint(family, Path(ckpt_dir), device, snapshot)

"""Model adapters: the one place that tells analysis and pages what a model family looks like.

Like LIT's ``input_spec``/``output_spec``, each family declares its inputs, its routed layers, its
prediction and its attribution targets, and offers a forward that records routing plus a knockout of
(layer, expert). ``analysis/`` and ``pages/`` only ever talk to a :class:`ModelAdapter`; adding a
family means writing one adapter and registering it with :func:`register_family`.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from mmoe_core.routing_record import RoutingRecorder


@dataclass(frozen=True)
class InputSpec:
    name: str            # e.g. "mention_text", "mention_image", "question", "context", "image"
    kind: str            # "text_tokens" | "image_patches"
    description: str


@dataclass(frozen=True)
class RoutedLayerSpec:
    name: str            # the SwitchMoE.name, as it appears in routing records
    num_experts: int
    top_k: int
    gate_kind: str       # "topk_softmax" | "mmoe_reference"
    routed: str          # what is routed, in words
    gate_sees: str       # what the gate input is, in words
    calls: tuple[str, ...] = ()  # the PositionMeta.call values this layer is called with


@dataclass(frozen=True)
class PredictionSpec:
    kind: str            # "ranking" (MMoE: rank of the gold entity over the KB) | "answer" (QA)
    description: str


@dataclass(frozen=True)
class AttributionTarget:
    name: str            # "score" | "answer_logit" | "router_logit"
    description: str
    needs_layer: bool = False  # router_logit: needs (layer, expert, position)


@dataclass
class RunOutput:
    """Result of :meth:`ModelAdapter.run` for a list of examples."""
    predictions: list[dict]              # one per example: index, prediction, gold, correct, rank/answer, score ...
    recorder: RoutingRecorder | None     # routing of every MoE call (None when record=False)
    extras: dict[str, Any] = field(default_factory=dict)  # declared outputs, e.g. "qga": per-token weights
    representations: Tensor | None = None  # [n_examples, D] routed representation for the embedding map


class ModelAdapter(ABC):
    """Wraps one loaded model of a family. Construct through :func:`load_adapter`."""

    family: str = ""

    def __init__(self, model: nn.Module, config: dict, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)

    # ---- declarations --------------------------------------------------------------------------
    @abstractmethod
    def input_spec(self) -> list[InputSpec]: ...

    @abstractmethod
    def routed_layers(self) -> list[RoutedLayerSpec]: ...

    @abstractmethod
    def prediction_spec(self) -> PredictionSpec: ...

    @abstractmethod
    def attribution_targets(self) -> list[AttributionTarget]: ...

    def output_spec(self) -> dict[str, str]:
        """Declared extra outputs (name -> description), e.g. {"qga": "..."}; none by default."""
        return {}

    def slice_labels(self) -> list[str]:
        """Names of the example labels worth slicing routing by (keys of example['labels'])."""
        return []

    # ---- data ----------------------------------------------------------------------------------
    @abstractmethod
    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        """Read a dataset folder (demo world or a real one in its published layout) into examples."""

    # ---- running -------------------------------------------------------------------------------
    @abstractmethod
    def run(self, examples: Sequence[dict], record: bool = True, batch_size: int = 32,
            progress: bool = False) -> RunOutput:
        """Forward the examples (in batches), returning predictions and, if asked, routing records.
        PositionMeta.example_ids must be the examples' ``index`` values."""

    @abstractmethod
    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        """Headline metrics of a run: {"overall": {...}, "by_<label>": {value: {...}}} (MMoE: MRR, MR,
        Hits@k over the whole KB; MoEMoE: exact match). Used by the evaluate CLI and the pages."""

    def moe_layers(self) -> dict[str, nn.Module]:
        """Every SwitchMoE of the model by its record name."""
        from mmoe_core.moe import SwitchMoE
        return {m.name: m for m in self.model.modules() if isinstance(m, SwitchMoE)}

    @contextlib.contextmanager
    def knockout(self, layer: str, expert: int) -> Iterator[None]:
        """Within the block, ``expert`` of ``layer`` can never be chosen (its router probability is 0)."""
        layers = self.moe_layers()
        if layer not in layers:
            raise KeyError(f"unknown routed layer {layer!r}; layers: {sorted(layers)}")
        moe = layers[layer]
        if not 0 <= expert < moe.num_experts:
            raise ValueError(f"expert must be in 0..{moe.num_experts - 1}, got {expert}")
        before = moe.knocked_out
        moe.knocked_out = before | {expert}
        try:
            yield
        finally:
            moe.knocked_out = before

    # ---- attribution ---------------------------------------------------------------------------
    @abstractmethod
    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        """The differentiable input embeddings of one example by input name, each [1, N, W]
        (e.g. text-token embeddings and image-patch embeddings); also used as IG's inputs."""

    @abstractmethod
    def attribution_forward(self, example: dict, target: str, layer: str | None = None,
                            expert: int | None = None, position: int | None = None,
                            call: str | None = None) -> Callable[..., Tensor]:
        """A function of the tensors of :meth:`attribution_inputs` (same order, batch dim first,
        any batch size) returning one scalar per batch row: the prediction score/answer logit
        (``target`` = "score" / "answer_logit") or a router logit (``target`` = "router_logit":
        ``layer``, ``expert``, ``position`` in that layer's ``call``)."""

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        """Human-readable label of each position of each attribution input (tokens, 'patch r,c')."""
        return {}


_FAMILIES: dict[str, tuple[Callable[[dict], nn.Module], type[ModelAdapter]]] = {}


def register_family(name: str, build_model: Callable[[dict], nn.Module], adapter: type[ModelAdapter]) -> None:
    """Register a model family: how to build its model from config.json and its adapter class."""
    _FAMILIES[name] = (build_model, adapter)


def _ensure_builtin_families() -> None:
    # Importing the family modules registers them (kept lazy so mmoe_core imports stay cheap).
    import importlib
    for module in ("mmoe_core.mmoe", "mmoe_core.moemoe"):
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(module)


def families() -> list[str]:
    _ensure_builtin_families()
    return sorted(_FAMILIES)


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(config: dict) -> nn.Module:
    _ensure_builtin_families()
    family = config.get("family")
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; registered: {sorted(_FAMILIES)}")
    return _FAMILIES[family][0](config)


def load_adapter(ckpt_dir: Path, device: torch.device | str | None = None,
                 snapshot: int | None = None) -> ModelAdapter:
    """Open a checkpoint directory (safetensors only) and wrap it in its family's adapter."""
    from mmoe_core.checkpoint import load_config, load_into, load_state
    config = load_config(ckpt_dir)
    model = build_model(config)
    load_into(model, load_state(ckpt_dir, snapshot), source=str(ckpt_dir))
    adapter_cls = _FAMILIES[config["family"]][1]
    return adapter_cls(model, config, device or default_device())

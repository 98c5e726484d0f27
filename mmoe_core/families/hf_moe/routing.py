"""The routers of a Hugging Face MoE model: found, described, recorded and knocked out.

In ``transformers`` 5.x every MoE architecture's gate is a module of its own (``MixtralTopKRouter``,
``OlmoeTopKRouter``, ``Qwen3MoeTopKRouter``, ``Qwen3VLMoeTextTopKRouter``, ``DeepseekV3TopkRouter`` ...)
whose forward takes the flattened hidden states [N, D] and returns ``(router_logits [N, E],
top_k_weights [N, k], top_k_index [N, k])``: the experts the gate chose and the weights the experts'
outputs are really multiplied by. The model class names its router class in
``_can_record_outputs["router_logits"]`` (what ``output_router_logits=True`` reads).

* **Recording** is a forward hook on each router that keeps that returned triple as it is: the
  choice is never re-derived, so DeepSeek-V3's score-correction bias, its group-limited top-k and
  its routed scaling factor are in the record exactly as the gate applied them. The gate's scores
  over all experts (``probs``) are its own score function of its logits: softmax, or sigmoid for the
  DeepSeek-V3 / GLM-4.5 family (declared per router class in :data:`GATES`).
* **Knockout** of expert e re-runs the gate's own forward with logit e set to -inf (the first
  ``F.linear`` the router makes whose output has E columns: its logits) and any score-correction
  bias of e set to -inf, so softmax gives e no probability, sigmoid-plus-bias never ranks it, and
  the gate's own top-k / renormalisation / scaling re-make the choice over the other experts.
* **Ablation** of a whole routed layer: a forward hook on the MoE block that owns the router returns
  zeros (routed and shared experts alike), so the decoder layer's residual carries its input on.

Off by default: with no recording and no knockout, each hook returns at once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mmoe_core.spec import GateSpec


class UnsupportedRouter(ValueError):
    """A router whose output is not the (logits, weights, indices) triple this family records."""


# ------------------------------------------------------------------------------------------------
# What each router class does (read from transformers 5.x modeling_<arch>.py)
# ------------------------------------------------------------------------------------------------


def _cfg(router: nn.Module, name: str, default=None):
    return getattr(router, name, default)


def _softmax_topk(renorm_attr: str | None, always: bool = False, note: str = "") -> Callable[[nn.Module], GateSpec]:
    def spec(router: nn.Module) -> GateSpec:
        renorm = always or (bool(_cfg(router, renorm_attr, False)) if renorm_attr else False)
        return GateSpec(
            f"hf:{type(router).__name__}", "softmax", "topk_renormalised" if renorm else "topk_raw", note=note
        )

    return spec


def _topk_logits_softmax(router: nn.Module) -> GateSpec:
    return GateSpec(
        f"hf:{type(router).__name__}",
        "softmax",
        "topk_renormalised",
        note="top-k of the logits, then a softmax over the k chosen logits (the same weights as "
        "the softmax over all experts renormalised over the chosen k)",
    )


def _sigmoid_grouped(router: nn.Module) -> GateSpec:
    groups, top_groups = int(_cfg(router, "num_group", 1) or 1), int(_cfg(router, "topk_group", 1) or 1)
    norm = bool(_cfg(router, "norm_topk_prob", False))
    scale = float(_cfg(router, "routed_scaling_factor", 1.0) or 1.0)
    return GateSpec(
        f"hf:{type(router).__name__}",
        "sigmoid",
        "topk_scaled",
        score_correction_bias=True,
        group_limited=f"{groups} groups, top-{top_groups} groups" if groups > 1 else "",
        note=(
            f"sigmoid scores; the choice ranks scores + e_score_correction_bias, within the top-{top_groups} "
            f"of {groups} expert groups (a group scores the sum of its best two); the weights are the "
            f"chosen sigmoid scores{' renormalised' if norm else ''} times routed_scaling_factor={scale:g}. "
            "Knockout: the expert's logit and bias are set to -inf (a group of two experts then scores -inf)."
        ),
    )


def _softmax_grouped_v2(router: nn.Module) -> GateSpec:
    method = _cfg(router, "topk_method", "greedy")
    groups, top_groups = int(_cfg(router, "num_group", 1) or 1), int(_cfg(router, "topk_group", 1) or 1)
    scale = float(_cfg(router, "routed_scaling_factor", 1.0) or 1.0)
    limited = method == "group_limited_greedy" and groups > 1
    return GateSpec(
        f"hf:{type(router).__name__}",
        "softmax",
        "topk_scaled",
        group_limited=f"{groups} groups, top-{top_groups} groups (best expert per group)" if limited else "",
        note=f"softmax top-k ({method}), not renormalised, times routed_scaling_factor={scale:g}",
    )


def _ernie(router: nn.Module) -> GateSpec:
    return GateSpec(
        f"hf:{type(router).__name__}",
        "softmax",
        "topk_renormalised",
        score_correction_bias=True,
        note="softmax scores; the choice ranks them plus a learned correction bias (moe_statics); the "
        "chosen softmax scores are renormalised (the sum clamped at moe_norm_min)",
    )


# Router class name -> its gate's description. Every router listed returns (logits, weights, indices).
GATES: dict[str, Callable[[nn.Module], GateSpec]] = {
    "MixtralTopKRouter": _softmax_topk(None, always=True),
    "MiniMaxTopKRouter": _softmax_topk(None, always=True),
    "OlmoeTopKRouter": _softmax_topk("norm_topk_prob"),
    "Qwen2MoeTopKRouter": _softmax_topk(
        "norm_topk_prob", note="a shared expert with its own sigmoid gate runs beside the routed ones"
    ),
    "Qwen3MoeTopKRouter": _softmax_topk("norm_topk_prob"),
    "Qwen3VLMoeTextTopKRouter": _softmax_topk(None, always=True),
    "GraniteMoeTopKRouter": _topk_logits_softmax,
    "DeepseekV3TopkRouter": _sigmoid_grouped,
    "Glm4MoeTopkRouter": _sigmoid_grouped,
    "Glm4vMoeTextTopkRouter": _sigmoid_grouped,
    "DeepseekV2TopkRouter": _softmax_grouped_v2,
    "Ernie4_5_MoeTopKRouter": _ernie,
    "Ernie4_5_VLMoeMoeTopKRouter": _ernie,
}
# The architectures the tests build and check (others listed above are read from the source, not tested).
TESTED = (
    "MixtralTopKRouter",
    "OlmoeTopKRouter",
    "Qwen3MoeTopKRouter",
    "Qwen2MoeTopKRouter",
    "DeepseekV3TopkRouter",
    "Qwen3VLMoeTextTopKRouter",
)


def _shared_experts(block: nn.Module | None, config: Any) -> int:
    """Always-on experts beside the routed ones in the MoE block that owns a router."""
    if block is None:
        return 0
    if hasattr(block, "shared_experts"):
        return int(getattr(config, "n_shared_experts", None) or 1)
    if hasattr(block, "shared_expert"):
        return 1
    return 0


# ------------------------------------------------------------------------------------------------
# Finding the routers
# ------------------------------------------------------------------------------------------------


def router_classes(model: nn.Module) -> set[type]:
    """The router classes the model's own ``output_router_logits`` records (from _can_record_outputs)."""
    classes: set[type] = set()
    for module in model.modules():
        recordable = getattr(type(module), "_can_record_outputs", None) or {}
        target = recordable.get("router_logits")
        for entry in target if isinstance(target, (list, tuple)) else [target]:
            cls = getattr(entry, "target_class", entry)
            if isinstance(cls, type) and _looks_like_router(cls):
                classes.add(cls)
        if type(module).__name__ in GATES:
            classes.add(type(module))
    return classes


def _looks_like_router(cls: type) -> bool:
    """A gate module (not an MoE block some model records instead, as ERNIE-VL does)."""
    name = cls.__name__
    return name in GATES or "Router" in name or "Gating" in name


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_name(path: str) -> str:
    """A short record name for a router's module path: 'model.language_model.layers.3.mlp.gate' ->
    'layers.3' (the decoder layer); other paths keep their own name without the '.gate'."""
    m = _LAYER_INDEX.search(path + ".")
    if m and path.count("layers.") == 1:
        return f"layers.{int(m.group(1))}"
    return re.sub(r"\.gate$", "", path)


@dataclass(eq=False)
class RouterHandle:
    """One router of the model, following :class:`mmoe_core.adapter.RoutedModule` (name, num_experts,
    knocked_out, ablated): the adapter's default knockout sets ``knocked_out``, the wrapped forward
    honours it; ``ablated`` zeroes the output of ``block``, the MoE block that owns the router."""

    name: str
    path: str
    module: nn.Module
    num_experts: int
    top_k: int
    gate: GateSpec
    knocked_out: frozenset = field(default_factory=frozenset)
    block: nn.Module | None = None  # the MoE block whose output is the layer's MoE output
    ablated: bool = False


def find_routers(model: nn.Module) -> list[RouterHandle]:
    """Every router of ``model``, in module order, with its gate description."""
    classes = router_classes(model)
    if not classes:
        raise UnsupportedRouter(
            f"{type(model).__name__} does not name a router class in _can_record_outputs "
            "(it does not return router logits)"
        )
    modules = dict(model.named_modules())
    handles = []
    for path, module in model.named_modules():
        if not isinstance(module, tuple(classes)):
            continue
        cls = type(module).__name__
        num_experts = _cfg(module, "num_experts") or _cfg(module, "num_local_experts") or _cfg(module, "out_features")
        top_k = _cfg(module, "top_k")
        if num_experts is None or top_k is None:
            raise UnsupportedRouter(f"{cls} at {path}: no num_experts / top_k attributes")
        describe = GATES.get(cls)
        if describe is None:
            gate = GateSpec(
                f"hf:{cls}",
                "softmax",
                "topk_renormalised",
                note=f"{cls} is not one of the routers MoEscope has read; its returned top-k ids and "
                "weights are recorded as they are, its scores shown as softmax(logits)",
            )
        else:
            gate = describe(module)
        block = modules.get(path.rsplit(".", 1)[0]) if "." in path else None
        config = getattr(model, "config", None)
        text_config = getattr(config, "text_config", None) or config
        shared = _shared_experts(block, text_config)
        if shared:
            gate = GateSpec(**{**gate.__dict__, "shared_experts": shared})
        handles.append(RouterHandle(layer_name(path), path, module, int(num_experts), int(top_k), gate, block=block))
    names = [h.name for h in handles]
    if len(set(names)) != len(names):  # two stacks with the same layer numbers: keep the full paths
        for h in handles:
            h.name = re.sub(r"\.gate$", "", h.path)
    return handles


# ------------------------------------------------------------------------------------------------
# Recording
# ------------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """What one router returned in one forward (flattened positions N = batch x length)."""

    handle: RouterHandle
    logits: Tensor  # [N, E]
    probs: Tensor  # [N, E]: the gate's own score function of its logits
    topk_ids: Tensor  # [N, k] as the gate chose them
    topk_weights: Tensor  # [N, k] the weights the experts' outputs are multiplied by
    hidden: Tensor | None = None  # [N, D] the router's input (when asked for)

    def combine(self) -> Tensor:
        dense = torch.zeros(self.logits.shape, dtype=torch.float32, device=self.topk_weights.device)
        return dense.scatter(1, self.topk_ids.long(), self.topk_weights.float())


def _scores(gate: GateSpec, logits: Tensor) -> Tensor:
    return torch.sigmoid(logits.float()) if gate.score == "sigmoid" else torch.softmax(logits.float(), dim=-1)


class RoutingCapture:
    """Forward hooks on every router; inactive (one attribute test per router call) unless inside
    :meth:`recording`. ``keep_graph`` keeps tensors attached (router-logit attributions); otherwise
    detached CPU copies. ``hidden_of`` names routers whose input hidden states are kept too."""

    def __init__(self, handles: list[RouterHandle]):
        self.handles = handles
        self._active: list[Captured] | None = None
        self._keep_graph = False
        self._hidden_of: frozenset[str] = frozenset()
        self._hooks = [h.module.register_forward_hook(self._hook(h)) for h in handles]

    def _hook(self, handle: RouterHandle):
        def hook(module, args, output):
            if self._active is None:
                return None
            if not (isinstance(output, tuple) and len(output) >= 3):
                raise UnsupportedRouter(
                    f"{type(module).__name__} returned {type(output).__name__}, not the "
                    "(logits, weights, indices) triple"
                )
            logits, weights, ids = output[0], output[1], output[2]
            if logits.shape[-1] != handle.num_experts or ids.shape != weights.shape:
                raise UnsupportedRouter(
                    f"{type(module).__name__}: unexpected shapes logits {tuple(logits.shape)}, "
                    f"weights {tuple(weights.shape)}, indices {tuple(ids.shape)}"
                )
            logits = logits.reshape(-1, handle.num_experts)
            ids, weights = ids.reshape(logits.shape[0], -1), weights.reshape(logits.shape[0], -1)
            hidden = args[0].reshape(logits.shape[0], -1) if handle.name in self._hidden_of else None
            if not self._keep_graph:
                logits, weights, ids = logits.detach(), weights.detach(), ids.detach()
                hidden = hidden.detach().float().cpu() if hidden is not None else None
            probs = _scores(handle.gate, logits)
            if not self._keep_graph:
                logits, probs, weights, ids = (
                    t.float().cpu() if t.is_floating_point() else t.cpu() for t in (logits, probs, weights, ids)
                )
            self._active.append(Captured(handle, logits, probs, ids, weights, hidden))
            return None

        return hook

    @contextlib.contextmanager
    def recording(self, keep_graph: bool = False, hidden_of: tuple[str, ...] = ()) -> Iterator[list[Captured]]:
        captured: list[Captured] = []
        previous = (self._active, self._keep_graph, self._hidden_of)
        self._active, self._keep_graph, self._hidden_of = captured, keep_graph, frozenset(hidden_of)
        try:
            yield captured
        finally:
            self._active, self._keep_graph, self._hidden_of = previous

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


# ------------------------------------------------------------------------------------------------
# Knockout
# ------------------------------------------------------------------------------------------------


class _MaskRouterLogits(TorchFunctionMode):
    """Inside one router forward: the first F.linear with E output columns (the logits) gets -inf in
    the knocked-out columns."""

    def __init__(self, num_experts: int, experts: list[int]):
        super().__init__()
        self.num_experts, self.experts, self.done = num_experts, experts, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.done and func is F.linear and isinstance(out, Tensor) and out.shape[-1] == self.num_experts:
            self.done = True
            index = torch.as_tensor(self.experts, device=out.device)
            out = out.index_fill(-1, index, float("-inf"))
        return out


def _bias_tensors(router: nn.Module, num_experts: int) -> list[Tensor]:
    """Score-correction biases of a router (they rank experts for the choice)."""
    found = []
    for name, tensor in list(router.named_buffers()) + list(router.named_parameters()):
        if "bias" in name.rsplit(".", 1)[-1] and tensor.is_floating_point() and tensor.shape[-1] == num_experts:
            found.append(tensor)
    return found


def install_knockout(handle: RouterHandle) -> None:
    """Wrap the router's forward once: with ``handle.knocked_out`` empty it is the router's own
    forward; otherwise the same forward with those experts' logits (and biases) at -inf."""
    module = handle.module
    if getattr(module, "_moescope_knockout", False):
        return
    original = module.forward

    def forward(*args, **kwargs):
        if not handle.knocked_out:
            return original(*args, **kwargs)
        experts = sorted(int(e) for e in handle.knocked_out)
        saved = []
        for bias in _bias_tensors(module, handle.num_experts):
            saved.append((bias, bias.data[..., experts].clone()))
            bias.data[..., experts] = float("-inf")
        mode = _MaskRouterLogits(handle.num_experts, experts)
        try:
            with mode:
                out = original(*args, **kwargs)
        finally:
            for bias, values in saved:
                bias.data[..., experts] = values
        if not mode.done:
            raise UnsupportedRouter(
                f"{type(module).__name__}: no router logits found to knock expert(s) {experts} "
                "out of (the router makes no F.linear with E outputs)"
            )
        return out

    module.forward = forward
    module._moescope_knockout = True
    if handle.block is not None:
        handle.block.register_forward_hook(_ablation_hook(handle))


def _ablation_hook(handle: RouterHandle):
    """While ``handle.ablated``: the MoE block returns zeros (routed and any shared experts: the whole
    MoE output, so the decoder layer's residual passes its input on unchanged). The router inside
    still runs, so the routing is recorded as usual."""

    def hook(module, args, output):
        if not handle.ablated:
            return None
        if isinstance(output, tuple):  # (hidden, router logits ...) in some architectures
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    return hook

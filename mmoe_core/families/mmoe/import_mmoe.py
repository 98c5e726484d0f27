"""Import a checkpoint trained with the published MEL-MMoE code into a MoEscope checkpoint directory.

    python -m mmoe_core.families.mmoe.import_mmoe runs/WikiMEL/version_0/checkpoints/epoch=9.ckpt \\
        --out artifacts/checkpoints/wikimel-published [--top-k 3] [--data DIR]

Input: a PyTorch Lightning ``.ckpt`` of ``LightningForMMoE`` (``state_dict`` keys ``encoder.clip.*`` for the
Hugging Face ``CLIPModel``, ``encoder.image_cls_fc.*``, ``encoder.image_tokens_fc.*``, ``matcher.*``), or a
plain state dict of the same keys (``.pt`` / ``.bin`` / ``.safetensors``; the ``encoder.`` / ``matcher.``
prefixes may be left out, and a ``model.`` / ``module.`` wrapper prefix is removed).

Reading is weights-only: ``torch.load(..., weights_only=True)``, never a general unpickling. A Lightning
checkpoint also stores its hyper-parameters (an OmegaConf ``DictConfig`` in the published code), which
the weights-only loader refuses. Those, and only those, are read with inert placeholders: every
``omegaconf.*`` / ``typing.*`` / ``argparse.Namespace`` / ``pathlib`` global the file names is replaced by a
class of this module that only stores what it is given (no code of the original class runs, nothing
is imported), ``AttributeDict`` is read as a ``dict``, and builtin containers (``dict``, ``list``,
``defaultdict``, ``int`` ...) are allowed as themselves. Any other global refuses the file with the
list and the recipe to export a plain state dict where the file is trusted.

Sizes come from the weights (widths, layers, patch size, experts, expert width); what the weights
cannot tell comes from the checkpoint's hyper-parameters when readable (``model.top_experts``,
``data.text_max_length``, ``data.eval_chunk_size``), else from the options (``--top-k`` is required then).
Every key must find its place and every MoEscope parameter must be filled: otherwise the import is
refused with the lists of unmapped, missing and wrongly shaped keys.

Output: a normal MoEscope checkpoint (``config.json`` with family ``mmoe``, gate ``mmoe_reference``, an
``hf_clip`` encoder spec and the sizes; ``model.safetensors``), written with ``mmoe_core.checkpoint``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmoe_core.checkpoint import check_finite, check_replaceable, load_state_file
from mmoe_core.errors import UserError, cli_entry
from mmoe_core.families.mmoe.config import FAMILY
from mmoe_core.families.mmoe.hf_clip_map import (
    HFClipMapError,
    hf_clip_encoder_spec,
    hf_clip_to_open_clip,
    open_clip_to_hf_clip,
)
from mmoe_core.families.mmoe.model import build_model

SOURCE = "MEL-MMoE (github.com/zhiweihu1103/MEL-MMoE)"
ENCODER_OWN = ("image_cls_fc.", "image_tokens_fc.")
MATCHER_TOP = (
    "text_module.",
    "vision_module.",
    "cross_module.",
    "text_cls_layernorm.",
    "text_tokens_layernorm.",
    "image_cls_layernorm.",
    "image_tokens_layernorm.",
)
TOWERS_PREFIX = "encoder.towers.clip."  # where MoEscope's MMoEModel keeps its open_clip model
HF_PREFIX = "encoder.clip."  # where the published LightningForMMoE keeps its CLIPModel
MOE_UNITS = ("text_module", "vision_module", "cross_module")

# Globals a Lightning checkpoint's hyper-parameters may name (see the module docstring).
PLAIN_CONTAINERS: dict[str, Any] = {
    "builtins.dict": dict,
    "builtins.list": list,
    "builtins.tuple": tuple,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.int": int,
    "builtins.float": float,
    "builtins.str": str,
    "builtins.bool": bool,
    "builtins.bytes": bytes,
    "builtins.complex": complex,
    "collections.defaultdict": collections.defaultdict,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.Counter": collections.Counter,
    # Lightning's hparams container is a dict subclass: read it as a dict
    "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    "lightning_fabric.utilities.data.AttributeDict": dict,
    "lightning.fabric.utilities.data.AttributeDict": dict,
}
OPAQUE_PREFIXES = ("omegaconf.", "typing.")
OPAQUE_NAMES = (
    "argparse.Namespace",
    "pathlib.Path",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib.PurePath",
    "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath",
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
    "pathlib._local.Path",
)

EXPORT_RECIPE = (
    "Export a plain state dict where the file is trusted (e.g. on the machine that trained it): open the "
    ".ckpt there with torch's full unpickler (only for a file you trust: unpickling runs code), take its "
    "'state_dict' entry and torch.save it as OUT.pt (or safetensors.torch.save_file it as OUT.safetensors); "
    "then import that file."
)


class ImportRefused(UserError, ValueError):
    """The file cannot be imported; the message says why (and lists the offending keys or globals)."""


# ---------------------------------------------------------------------------------------------
# Reading the file (weights only)
# ---------------------------------------------------------------------------------------------


class OpaqueObject:
    """Inert stand-in for a class a checkpoint names (hyper-parameter containers): it stores the
    arguments and the state it is given and does nothing else. ``qualified_name`` names the original."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_state"] = None
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args): nothing to do beyond __new__
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


def _opaque_class(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (OpaqueObject,), {"qualified_name": name, "__module__": __name__})


def _stub_allowed(name: str) -> bool:
    return name.startswith(OPAQUE_PREFIXES) or name in OPAQUE_NAMES


@dataclass
class LoadedFile:
    state: dict[str, Tensor]
    format: str  # "lightning" | "state_dict" | "safetensors"
    hyper_parameters: Any = None  # plain (JSON-able) view, when the file had readable ones
    extras: dict[str, Any] = field(default_factory=dict)  # epoch, global_step, versions (plain)
    placeholders: list[str] = field(default_factory=list)  # globals read through inert placeholders


def _torch_load(path: Path) -> tuple[Any, list[str]]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as exc:
        first_error = exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # a truncated zip, not a torch file at all
        raise ImportRefused(
            f"{path}: cannot be read as a torch checkpoint ({exc}); the file is truncated or of "
            "another format: copy it again, or export a state dict"
        ) from exc
    if not zipfile.is_zipfile(path):
        raise ImportRefused(
            f"{path}: the weights-only loader refused it ({first_error}); it is not a torch zip "
            f"checkpoint whose globals can be listed.\n{EXPORT_RECIPE}"
        )
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to list the globals is a refusal
        raise ImportRefused(f"{path}: cannot list the globals it names ({exc}).\n{EXPORT_RECIPE}") from exc
    refused = sorted(n for n in names if n not in PLAIN_CONTAINERS and not _stub_allowed(n))
    if refused:
        raise ImportRefused(
            f"{path}: refused: it names globals that a weights-only load does not construct: {refused} "
            f"(only tensors, builtin containers and hyper-parameter containers such as OmegaConf's are read; "
            f"nothing is unpickled as arbitrary objects).\n{EXPORT_RECIPE}"
        )
    allow = [(PLAIN_CONTAINERS[n], n) if n in PLAIN_CONTAINERS else (_opaque_class(n), n) for n in names]
    try:
        with torch.serialization.safe_globals(allow):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ImportRefused(
            f"{path}: the weights-only loader refused it even with inert placeholders for "
            f"{sorted(names)}: {exc}\n{EXPORT_RECIPE}"
        ) from exc
    return obj, sorted(n for n in names if n not in PLAIN_CONTAINERS)


def plain(obj: Any, depth: int = 0) -> Any:
    """A JSON-able view of hyper-parameters: OmegaConf containers become dicts / lists of their values."""
    if depth > 50:
        return "..."
    if isinstance(obj, OpaqueObject):
        state = obj._state
        if isinstance(state, dict):
            if "_content" in state:
                return plain(state["_content"], depth + 1)
            if "_val" in state:
                return plain(state["_val"], depth + 1)
            return {str(k): plain(v, depth + 1) for k, v in state.items() if not str(k).startswith("_")}
        if obj._args and all(isinstance(a, str) for a in obj._args):
            return os.path.join(*obj._args)  # a pathlib path
        return repr(obj)
    if isinstance(obj, type):
        return getattr(obj, "qualified_name", f"{obj.__module__}.{obj.__qualname__}")
    if isinstance(obj, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else f"tensor{tuple(obj.shape)}"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def read_checkpoint(path: str | os.PathLike) -> LoadedFile:
    """Read the tensors of a published checkpoint or state-dict file, weights only."""
    path = Path(path)
    if not path.is_file():
        raise ImportRefused(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return LoadedFile(dict(load_state_file(path)), "safetensors")
    obj, placeholders = _torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        extras = {k: plain(obj[k]) for k in ("epoch", "global_step", "pytorch-lightning_version") if k in obj}
        hp = obj.get("hyper_parameters")
        loaded = LoadedFile({}, "lightning", plain(hp) if hp is not None else None, extras, placeholders)
    elif isinstance(obj, Mapping):
        state, loaded = obj, LoadedFile({}, "state_dict", placeholders=placeholders)
    else:
        raise ImportRefused(f"{path}: holds a {type(obj).__name__}, not a state dict or a Lightning checkpoint")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise ImportRefused(f"{path}: the state dict has entries that are not tensors: {not_tensors[:20]}")
    loaded.state = {str(k): v for k, v in state.items()}
    check_finite(loaded.state, str(path))
    return loaded


# ---------------------------------------------------------------------------------------------
# Keys: published names -> MoEscope names
# ---------------------------------------------------------------------------------------------


def _strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = dict(state)
    while state:
        for wrapper in ("model.", "module.", "_orig_mod."):
            if all(k.startswith(wrapper) for k in state):
                state = {k[len(wrapper) :]: v for k, v in state.items()}
                break
        else:
            return state
    return state


@dataclass
class KeyMapping:
    hf: dict[str, Tensor]  # HF CLIPModel weights (keys relative to the CLIPModel)
    target: dict[str, Tensor]  # MoEscope key -> tensor (matcher, image fcs, towers)
    source_of: dict[str, str]  # MoEscope key -> published key it came from
    unmapped: list[str]  # published keys that found no place
    layout: str  # "lightning" (encoder./matcher.) or "bare"


def map_published_keys(state: Mapping[str, Tensor]) -> KeyMapping:
    """Place every published key: ``encoder.clip.*`` through :func:`hf_clip_to_open_clip`, the rest 1:1
    (MoEscope's MMoE mirrors the published module names)."""
    state = _strip_wrappers(state)
    lightning = any(k.startswith(("encoder.", "matcher.")) for k in state)
    hf: dict[str, Tensor] = {}
    target: dict[str, Tensor] = {}
    source_of: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if lightning:
            if key.startswith(HF_PREFIX):
                hf[key[len(HF_PREFIX) :]] = value
            elif key.startswith("encoder.") and key[len("encoder.") :].startswith(ENCODER_OWN):
                target[key], source_of[key] = value, key
            elif key.startswith("matcher."):
                target[key], source_of[key] = value, key
            else:
                unmapped.append(key)
        else:
            if key.startswith("clip."):
                hf[key[len("clip.") :]] = value
            elif key.startswith(ENCODER_OWN):
                target["encoder." + key], source_of["encoder." + key] = value, key
            elif key.startswith(MATCHER_TOP):
                target["matcher." + key], source_of["matcher." + key] = value, key
            else:
                unmapped.append(key)
    hf_prefix = HF_PREFIX if lightning else "clip."
    towers, hf_unmapped = hf_clip_to_open_clip(hf)
    for key, value in towers.items():
        target[TOWERS_PREFIX + key] = value
        source_of[TOWERS_PREFIX + key] = hf_prefix + _hf_source(key)
    unmapped += [hf_prefix + k for k in hf_unmapped]
    return KeyMapping(hf, target, source_of, sorted(unmapped), "lightning" if lightning else "bare")


def _hf_source(open_clip_key: str) -> str:
    """Readable published origin of an open_clip key (for messages)."""
    m = re.match(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", open_clip_key)
    if m:
        model = "vision_model" if m.group(1).startswith("visual") else "text_model"
        return f"{model}.encoder.layers.{m.group(2)}.self_attn.{{q,k,v}}_proj.{m.group(3)}"
    names = list(open_clip_to_hf_clip({open_clip_key: torch.zeros(3)}))
    return names[0] if names else open_clip_key


# ---------------------------------------------------------------------------------------------
# Config from shapes and hyper-parameters
# ---------------------------------------------------------------------------------------------


def _hp(hp: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(hp, Mapping) or part not in hp:
            return None
        hp = hp[part]
    return hp


def _count_experts(target: Mapping[str, Tensor], unit: str) -> int:
    pat = re.compile(rf"^matcher\.{unit}\.moe_layer\.experts\.(\d+)\.")
    ids = {int(m.group(1)) for k in target if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def infer_model_config(
    mapping: KeyMapping,
    hyper_parameters: Any = None,
    *,
    top_k: int | None = None,
    num_experts: int | None = None,
    text_length: int | None = None,
    entity_chunk_size: int | None = None,
    text_heads: int | None = None,
    vision_heads: int | None = None,
    pad_token_id: int | None = None,
    gate: str = "mmoe_reference",
    mention_desc: str = "dataset",
) -> tuple[dict, dict]:
    """(MMoEConfig dict, notes on where each value came from)."""
    t = mapping.target
    need = [
        "encoder.image_cls_fc.weight",
        "matcher.text_module.fc_query.weight",
        "matcher.vision_module.fc_query.weight",
        "matcher.cross_module.text_fc.weight",
        "matcher.text_module.moe_layer.experts.0.ff.0.0.weight",
    ]
    missing = [mapping.source_of.get(k, k) for k in need if k not in t]
    if missing:
        raise ImportRefused(
            f"not a MEL-MMoE state dict: missing {missing}"
            + (f"; keys that found no place: {mapping.unmapped[:40]}" if mapping.unmapped else "")
        )
    notes: dict[str, str] = {}
    experts = {u: _count_experts(t, u) for u in MOE_UNITS}
    if len(set(experts.values())) != 1:
        raise ImportRefused(f"the three MoE layers have different expert counts: {experts}")
    e = experts["text_module"]
    if num_experts is not None and int(num_experts) != e:
        raise ImportRefused(f"--num-experts {num_experts} does not fit the weights, which hold {e} experts per layer")
    hp_e = _hp(hyper_parameters, "model", "num_experts")
    if hp_e is not None and int(hp_e) != e:
        raise ImportRefused(f"hyper-parameters say model.num_experts={hp_e} but the weights hold {e} experts")
    notes["num_experts"] = "weights"
    if top_k is not None:
        k, notes["top_k"] = int(top_k), "option --top-k"
    elif _hp(hyper_parameters, "model", "top_experts") is not None:
        k, notes["top_k"] = int(_hp(hyper_parameters, "model", "top_experts")), "hyper-parameters model.top_experts"
    else:
        raise ImportRefused(
            "top-k is not in the weights and the file has no readable hyper-parameters: pass "
            "--top-k (published configs: wikimel 3, richpediamel 4, wikidiverse 2)"
        )
    if not 1 <= k <= e:
        raise ImportRefused(f"top-k {k} must be in 1..{e}")
    if text_length is not None:
        length, notes["text_length"] = int(text_length), "option --text-length"
    elif _hp(hyper_parameters, "data", "text_max_length") is not None:
        length = int(_hp(hyper_parameters, "data", "text_max_length"))
        notes["text_length"] = "hyper-parameters data.text_max_length"
    else:
        length, notes["text_length"] = None, "1 + patches (what the InterMoE needs)"
    if entity_chunk_size is not None:
        chunk, notes["entity_chunk_size"] = int(entity_chunk_size), "option --entity-chunk-size"
    elif _hp(hyper_parameters, "data", "eval_chunk_size") is not None:
        chunk = int(_hp(hyper_parameters, "data", "eval_chunk_size"))
        notes["entity_chunk_size"] = "hyper-parameters data.eval_chunk_size"
    else:
        chunk, notes["entity_chunk_size"] = 6000, "published default eval_chunk_size"
    spec_kw = dict(context_length=length, text_heads=text_heads, vision_heads=vision_heads)
    if pad_token_id is not None:
        spec_kw["pad_token_id"] = int(pad_token_id)
    try:
        encoder = hf_clip_encoder_spec(mapping.hf, **spec_kw)
    except HFClipMapError as exc:
        raise ImportRefused(f"the CLIP encoder weights do not fit: {exc}") from exc
    grid_tokens = (encoder["extra"]["image_size"] // encoder["extra"]["patch_size"]) ** 2 + 1
    if encoder["extra"]["context_length"] != grid_tokens:
        raise ImportRefused(
            f"text length {encoder['extra']['context_length']} != 1 + patches = {grid_tokens}: the "
            f"published InterMoE concatenates text tokens with image tokens position by position, "
            f"so the checkpoint cannot have run with this text length"
        )
    ffn = t["matcher.text_module.moe_layer.experts.0.ff.0.0.weight"]
    cfg = dict(
        encoder=encoder,
        image_dim=int(t["encoder.image_cls_fc.weight"].shape[0]),
        text_hidden=int(t["matcher.text_module.fc_query.weight"].shape[0]),
        image_hidden=int(t["matcher.vision_module.fc_query.weight"].shape[0]),
        cross_hidden=int(t["matcher.cross_module.text_fc.weight"].shape[0]),
        num_experts=e,
        top_k=k,
        gate=gate,
        capacity_factor=1.0,
        expert_mult=float(ffn.shape[0]) / float(ffn.shape[1]),
        dispatch="dense",
        entity_chunk_size=chunk,
        mention_desc=mention_desc,
    )
    if float(cfg["expert_mult"]).is_integer():
        cfg["expert_mult"] = int(cfg["expert_mult"])
    return cfg, notes


# ---------------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------------


def _check_fit(model_state: Mapping[str, Tensor], mapping: KeyMapping) -> None:
    own, given = set(model_state), set(mapping.target)
    missing = sorted(own - given)
    missing = [
        f"{k} (published {HF_PREFIX + _hf_source(k[len(TOWERS_PREFIX) :])})" if k.startswith(TOWERS_PREFIX) else k
        for k in missing
    ]
    unexpected = sorted(mapping.source_of.get(k, k) for k in given - own)
    wrong = sorted(
        (mapping.source_of.get(k, k), tuple(mapping.target[k].shape), tuple(model_state[k].shape))
        for k in own & given
        if tuple(mapping.target[k].shape) != tuple(model_state[k].shape)
    )
    unmapped = sorted(set(mapping.unmapped) | set(unexpected))
    if unmapped or missing or wrong:
        lines = ["the checkpoint does not fit MoEscope's MMoE; nothing was written."]
        if unmapped:
            lines.append(f"unmapped published keys ({len(unmapped)}): {unmapped}")
        if missing:
            lines.append(f"missing MoEscope keys ({len(missing)}): {missing}")
        if wrong:
            lines.append(f"wrong shapes (published key, given, expected) ({len(wrong)}): {wrong}")
        raise ImportRefused("\n".join(lines))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def build_imported(path: str | os.PathLike, **options) -> tuple[torch.nn.Module, dict]:
    """(MoEscope MMoEModel holding the published weights, its config.json dict). Raises ImportRefused.

    The config has the style of every checkpoint ({"family", "model", "data", "training"}); what a
    trained checkpoint keeps of its training here says where the weights came from (``training.imported``)."""
    path = Path(path)
    loaded = read_checkpoint(path)
    mapping = map_published_keys(loaded.state)
    data_dir = options.pop("data_dir", None)
    model_cfg, notes = infer_model_config(mapping, loaded.hyper_parameters, **options)
    config: dict[str, Any] = {"family": FAMILY, "model": model_cfg, "data": {}, "training": {}}
    from mmoe_core.registry import check_config

    check_config(config, f"{path} (the sizes read off its weights)")  # limits and memory, before building
    try:
        model = build_model(config)
    except ValueError as exc:
        raise ImportRefused(f"the sizes read off the weights do not make a MoEscope MMoE: {exc}") from exc
    _check_fit(model.state_dict(), mapping)
    model.load_state_dict(mapping.target, strict=True)
    config["training"]["imported"] = _json_safe(
        {
            "source": SOURCE,
            "file": str(path.resolve()),
            "sha256": _sha256(path),
            "format": loaded.format,
            "layout": mapping.layout,
            "keys": len(loaded.state),
            "values_from": notes,
            "hyper_parameters": loaded.hyper_parameters,
            "lightning": loaded.extras,
            "placeholders": loaded.placeholders,
            "published_eval_batch_size": _hp(loaded.hyper_parameters, "data", "eval_batch_size"),
        }
    )
    if data_dir is not None:
        config["training"]["data_dir"] = str(data_dir)  # precompute's default dataset, as for a trained run
        config["data"] = {"root": str(Path(data_dir).resolve())}
    return model, config


def import_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, **options) -> Path:
    """Import ``path`` and write a MoEscope checkpoint directory at ``out_dir``, replacing a checkpoint that
    was there as a whole (its snapshots and training log go with it)."""
    from mmoe_core.checkpoint import save_checkpoint

    model, config = build_imported(path, **options)
    return save_checkpoint(model, config, Path(out_dir))


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mmoe_core.families.mmoe.import_mmoe",
        description="Import a MEL-MMoE (published code) checkpoint into MoEscope.",
    )
    p.add_argument("checkpoint", help="Lightning .ckpt, or a state dict (.pt/.bin/.safetensors) of the same keys")
    p.add_argument("--out", help="output checkpoint dir (default artifacts/checkpoints/<file stem>)")
    p.add_argument("--top-k", type=int, help="top_experts (needed when the file has no readable hyper-parameters)")
    p.add_argument("--num-experts", type=int, help="checked against the weights")
    p.add_argument("--text-length", type=int, help="text_max_length (default: hyper-parameters, else 1 + patches)")
    p.add_argument("--entity-chunk-size", type=int, help="entities per MoE call (published eval_chunk_size, 6000)")
    p.add_argument("--text-heads", type=int, help="CLIP text attention heads (default width / 64)")
    p.add_argument("--vision-heads", type=int, help="CLIP vision attention heads (default width / 64)")
    p.add_argument("--pad-token-id", type=int, help="the HF tokenizer's pad id (default 49407, OpenAI CLIP)")
    p.add_argument(
        "--mention-desc",
        choices=["dataset", "none", "dme"],
        default="dataset",
        help="what follows the sentence in a mention's text (published: the dataset's desc)",
    )
    p.add_argument(
        "--gate",
        choices=["mmoe_reference", "topk_softmax"],
        default="mmoe_reference",
        help="mmoe_reference is how the published model ran; topk_softmax is a what-if",
    )
    p.add_argument("--data", help="dataset dir to record as the checkpoint's data (precompute's default)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path("artifacts") / "checkpoints" / Path(args.checkpoint).stem
    check_replaceable(out)  # before reading: a folder that is not a checkpoint is never replaced
    ckpt = import_checkpoint(
        args.checkpoint,
        out,
        top_k=args.top_k,
        num_experts=args.num_experts,
        text_length=args.text_length,
        entity_chunk_size=args.entity_chunk_size,
        text_heads=args.text_heads,
        vision_heads=args.vision_heads,
        pad_token_id=args.pad_token_id,
        gate=args.gate,
        mention_desc=args.mention_desc,
        data_dir=args.data,
    )
    cfg = json.loads((ckpt / "config.json").read_text())
    m = cfg["model"]
    print(
        f"imported {args.checkpoint} -> {ckpt}: encoder {m['encoder']['name']} (hf_clip, text length "
        f"{m['encoder']['extra']['context_length']}), {m['num_experts']} experts, top-{m['top_k']}, gate {m['gate']}",
        file=sys.stderr,
    )
    bs = cfg["training"]["imported"].get("published_eval_batch_size")
    print(
        f"next: python -m analysis.precompute --run {ckpt.name} --checkpoint {ckpt} --data DIR"
        + (
            f" --batch-size {bs}  (the published eval batch size: the reference gate depends on the batch)"
            if bs
            else ""
        ),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Opening a local Hugging Face model folder: never a download, never remote code, safetensors only.

A folder this family opens holds ``config.json`` with a ``model_type`` (and no MoEscope ``family``
key), the weights as ``model.safetensors`` or shards named by ``model.safetensors.index.json``, and
when present the tokenizer / processor files. It is opened with ``transformers``' Auto classes,
``local_files_only=True``, ``trust_remote_code=False`` and ``use_safetensors=True``.

Large checkpoints: with ``device="auto"`` (or several GPUs present and no device named) the model is
loaded with ``device_map="auto"`` (``accelerate``), its layers spread over the GPUs present (and the
CPU for what does not fit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mmoe_core.checkpoint import check_finite
from mmoe_core.errors import UserError
from mmoe_core.limits import Footprint, Limit, check_footprint, check_limits

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SIDECAR = "moescope.json"  # optional: what MoEscope's own demo trainer adds (task, data, training log)


class HFCheckpointError(UserError, ValueError):
    """The folder is not a loadable Hugging Face MoE model (the message says what is missing)."""


def read_config(path: Path) -> dict | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def recognises(path: Path) -> bool:
    """A folder whose config.json has a ``model_type`` and no MoEscope ``family`` key."""
    path = Path(path)
    if not path.is_dir():
        return False
    config = read_config(path)
    return bool(config) and "model_type" in config and "family" not in config


def read_sidecar(path: Path) -> dict:
    try:
        data = json.loads((Path(path) / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_vision_language(config: dict) -> bool:
    return "vision_config" in config or "image_token_id" in config or "image_token_index" in config


def check_folder(path: Path) -> dict:
    """config.json + safetensors weights present; returns the config. Clear errors otherwise."""
    path = Path(path)
    config = read_config(path)
    if config is None or "model_type" not in config:
        raise HFCheckpointError(f"{path}: no config.json with a 'model_type'")
    if not (path / WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickles[:3])}: pickled weights are never loaded; convert them to safetensors)"
            if pickles
            else ""
        )
        raise HFCheckpointError(f"{path}: no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")
    if (path / WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((path / WEIGHTS_INDEX).read_text())
            shards = {str(f) for f in (index.get("weight_map") or {}).values()}
        except (OSError, ValueError, AttributeError) as exc:
            raise HFCheckpointError(f"{path / WEIGHTS_INDEX}: not a readable shard index ({exc})") from exc
        outside = sorted(f for f in shards if Path(f).name != f)
        if outside:
            raise HFCheckpointError(f"{path / WEIGHTS_INDEX}: shard names must be plain file names, got {outside[:3]}")
        missing = sorted(f for f in shards if not (path / f).is_file())
        if missing:
            raise HFCheckpointError(f"{path}: shards named by {WEIGHTS_INDEX} are missing: {', '.join(missing[:5])}")
    return config


# Sizes a transformers config may hold (config.json is untrusted: mmoe_core.limits); null is allowed
# because transformers configs use it for "not used" (q_lora_rank, sliding_window ...).
HF_LIMITS: dict[str, Limit] = {
    name: Limit(lo, hi, optional=True)
    for name, (lo, hi) in {
        "hidden_size": (1, 65536),
        "intermediate_size": (1, 1 << 20),
        "moe_intermediate_size": (1, 1 << 20),
        "shared_expert_intermediate_size": (0, 1 << 20),
        "num_hidden_layers": (1, 1024),
        "num_attention_heads": (1, 4096),
        "num_key_value_heads": (1, 4096),
        "head_dim": (1, 65536),
        "vocab_size": (1, 1 << 22),
        "max_position_embeddings": (1, 1 << 24),
        "num_local_experts": (1, 65536),
        "num_experts": (1, 65536),
        "n_routed_experts": (1, 65536),
        "n_shared_experts": (0, 65536),
        "num_experts_per_tok": (1, 65536),
        "kv_lora_rank": (1, 65536),
        "q_lora_rank": (1, 65536),
        "depth": (1, 1024),
        "num_heads": (1, 4096),
        "patch_size": (1, 4096),
        "image_size": (1, 65536),
        "out_hidden_size": (1, 65536),
        "num_position_embeddings": (1, 1 << 24),
    }.items()
}


def check_hf_config(config: dict, where: str, depth: int = 0) -> None:
    """ConfigError for a size of config.json (or of a nested ``*_config``) of the wrong type or out of range."""
    check_limits(config, HF_LIMITS, where)
    for key, value in config.items():
        if key.endswith("_config") and isinstance(value, dict) and depth < 3:
            check_hf_config(value, f"{where}: {key}", depth + 1)


def rough_parameters(config: dict) -> int:
    """A quick upper-ish count from the config's sizes (embeddings, attention, every expert's FFN), used to
    refuse a grossly oversized config before even a meta-device build has to create its modules."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    h, layers = int(text.get("hidden_size") or 0), int(text.get("num_hidden_layers") or 0)
    inter = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
    experts = int(text.get("num_local_experts") or text.get("num_experts") or text.get("n_routed_experts") or 1)
    return int(text.get("vocab_size") or 0) * h + layers * (4 * h * h + 3 * h * inter * experts)


def _dtype_width(dtype: Any, config: dict) -> int:
    if dtype == "auto":
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return torch.empty(0, dtype=getattr(torch, str(dtype).replace("torch.", ""), torch.float32)).element_size()


def check_rough_size(config_dict: dict, where: str, dtype: Any, device: Any) -> None:
    """ConfigError (with the numbers) for a config whose rough parameter count cannot fit the memory budget,
    before even the meta-device build of :func:`check_memory` has to create its modules."""
    rough = rough_parameters(config_dict)
    footprint = Footprint(rough, rough * _dtype_width(dtype, config_dict))
    check_footprint(footprint, f"{where} (a rough count from its sizes)", "load", device)


def check_weight_files(path: Path) -> None:
    """Every safetensors file of the folder has a header that fits the file (no pickle, no truncation)."""
    from mmoe_core.checkpoint import read_safetensors_header

    if (path / WEIGHTS).is_file():
        read_safetensors_header(path / WEIGHTS)
        return
    index = json.loads((path / WEIGHTS_INDEX).read_text())
    for name in sorted(set((index.get("weight_map") or {}).values())):
        read_safetensors_header(path / name)


def _no_network() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_device(device: Any) -> tuple[torch.device, str | None]:
    """(device the inputs go to, device_map for from_pretrained or None). "auto", None or a bare "cuda"
    with several GPUs visible: accelerate's device map over them; "cuda:N" / "cpu": that device."""
    if str(device) == "cuda" and torch.cuda.device_count() > 1:
        device = "auto"
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0"), ("auto" if torch.cuda.device_count() > 1 or str(device) == "auto" else None)
        return torch.device("cpu"), None
    return torch.device(device), None


def open_model(path: Path, device: Any = None, dtype: Any = None):
    """(model, tokenizer or None, processor or None, input device) for a local folder."""
    _no_network()
    path = Path(path)
    config_dict = check_folder(path)
    check_hf_config(config_dict, str(path / "config.json"))
    check_weight_files(path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    common = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(path, **common)
    except (ValueError, KeyError) as exc:
        raise HFCheckpointError(
            f"{path}: transformers cannot read this config (model_type {config_dict.get('model_type')!r}): {exc}"
        ) from exc
    target, device_map = resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if target.type == "cpu" else "auto"
    auto = AutoModelForImageTextToText if is_vision_language(config_dict) else AutoModelForCausalLM
    check_rough_size(config_dict, str(path / "config.json"), dtype, target if device_map is None else None)
    if device_map is None:
        check_memory(auto, config, dtype, target, path)
    kwargs = {**common, "use_safetensors": True, "dtype": dtype, "output_loading_info": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model, info = auto.from_pretrained(path, config=config, **kwargs)
    except ValueError as exc:
        raise HFCheckpointError(f"{path}: {auto.__name__} cannot build {type(config).__name__}: {exc}") from exc
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise
        raise HFCheckpointError(
            f"{path}: the weights do not fit config.json (tensor shapes differ): restore the "
            "config.json saved with these weights"
        ) from exc
    check_loading_info(info, path)
    check_finite(model.state_dict(), f"{path} (weights)")
    if device_map is None:
        model = model.to(target)
    model.eval()
    tokenizer = processor = None
    if is_vision_language(config_dict) and any((path / f).is_file() for f in PROCESSOR_FILES):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, **common)
        tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None and any((path / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    if tokenizer is None:
        raise HFCheckpointError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); MoEscope needs the "
            "model's tokenizer to turn text into tokens"
        )
    if is_vision_language(config_dict) and processor is None:
        raise HFCheckpointError(
            f"{path}: a vision-language model without its processor files ({' or '.join(PROCESSOR_FILES)})"
        )
    if device_map is not None:
        target = next(model.parameters()).device  # the first layer's device: where inputs go
    return model, tokenizer, processor, target


def check_memory(auto, config, dtype, target: torch.device, path: Path) -> None:
    """Build the model on the meta device (shapes only) and refuse it before any allocation when it
    needs more memory than ``target`` has (:mod:`mmoe_core.limits`; a device map spreads it instead)."""
    from mmoe_core.limits import check_footprint, meta_footprint

    if dtype == "auto":
        named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, str(named).replace("torch.", ""), torch.float32) if named else torch.float32
    try:
        _, footprint = meta_footprint(lambda: auto.from_config(config, dtype=dtype))
    except (ValueError, KeyError, TypeError) as exc:
        raise HFCheckpointError(f"{path}: {auto.__name__} cannot build {type(config).__name__}: {exc}") from exc
    check_footprint(footprint, str(Path(path) / "config.json"), "load", target)


def check_loading_info(info: dict, path: Path) -> None:
    """Refuse weights that leave parameters unset (transformers would initialise them at random)."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        names = ", ".join((missing + mismatched)[:4])
        raise HFCheckpointError(
            f"{path}: the weights do not fit config.json: {len(missing)} tensor(s) missing, "
            f"{len(mismatched)} of another shape ({names}); restore the config.json saved with "
            "these weights, or the missing shards"
        )


def load_snapshot(model: torch.nn.Module, path: Path, step: int) -> None:
    """Load snapshots/step_<N>.safetensors (the model's own state-dict keys) into ``model``."""
    from mmoe_core.checkpoint import load_into, load_state

    state = load_state(Path(path), snapshot=step)
    own = model.state_dict()
    state = {k: v.to(own[k].device, own[k].dtype) if k in own else v for k, v in state.items()}
    load_into(model, state, source=f"{path} snapshot {step}")

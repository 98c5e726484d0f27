"""Checkpoints are directories, never pickles.

    <ckpt>/config.json              family, sizes, encoder spec, gate kind, training options, code version
    <ckpt>/model.safetensors        final weights
    <ckpt>/snapshots/step_<N>.safetensors   periodic snapshots taken during training
    <ckpt>/train_log.parquet        loss parts and routing indicators per logging step

Weights are read with safetensors only, so opening a checkpoint cannot execute code. Writes go to a
temporary file that is renamed into place, so an interrupted save never leaves a truncated file.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmoe_core import __version__ as CODE_VERSION
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SNAPSHOT_DIR = "snapshots"
TRAIN_LOG_NAME = "train_log.parquet"
_SNAPSHOT_RE = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint directory is missing a file or holds weights that do not fit its config."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of every parameter and buffer (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path) -> None:
    state = state_to_save(model)
    _atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata={"code_version": CODE_VERSION}))


def save_config(config: dict, ckpt_dir: Path) -> None:
    config = {**config, "code_version": CODE_VERSION}
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(Path(ckpt_dir) / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(model: nn.Module, config: dict, ckpt_dir: Path, train_log=None) -> Path:
    """Write config.json, model.safetensors and (if given, a DataFrame) train_log.parquet."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, ckpt_dir)
    save_weights(model, ckpt_dir / WEIGHTS_NAME)
    if train_log is not None:
        _atomic_write(ckpt_dir / TRAIN_LOG_NAME, lambda tmp: train_log.to_parquet(tmp, index=False))
    return ckpt_dir


def save_snapshot(model: nn.Module, ckpt_dir: Path, step: int) -> Path:
    path = Path(ckpt_dir) / SNAPSHOT_DIR / f"step_{int(step)}.safetensors"
    save_weights(model, path)
    return path


def list_snapshots(ckpt_dir: Path) -> list[int]:
    folder = Path(ckpt_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    steps = [int(m.group(1)) for p in folder.iterdir() if (m := _SNAPSHOT_RE.match(p.name))]
    return sorted(steps)


def load_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint (no {CONFIG_NAME})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


def load_state(ckpt_dir: Path, snapshot: int | None = None) -> dict[str, torch.Tensor]:
    """Read weights with safetensors (no unpickling). ``snapshot`` picks snapshots/step_<N>."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / WEIGHTS_NAME if snapshot is None else ckpt_dir / SNAPSHOT_DIR / f"step_{snapshot}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    return load_file(str(path))


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> nn.Module:
    """Strictly load ``state`` into ``model``, naming every missing or unexpected key on failure."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"{source}: weights do not fit the model: missing {missing}, unexpected "
                              f"{unexpected}, wrong shape {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad_shape]}")
    model.load_state_dict(state, strict=True)
    return model


def load_train_log(ckpt_dir: Path):
    import pandas as pd
    path = Path(ckpt_dir) / TRAIN_LOG_NAME
    return pd.read_parquet(path) if path.is_file() else None

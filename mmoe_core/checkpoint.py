"""Checkpoints are directories, never pickles.

    <ckpt>/config.json              family, sizes, encoder spec, gate kind, training options, code version
    <ckpt>/model.safetensors        final weights
    <ckpt>/snapshots/step_<N>.safetensors   periodic snapshots taken during training
    <ckpt>/train_log.parquet        loss parts and routing indicators per logging step

Reading: weights are read with safetensors only, so opening a checkpoint cannot execute code. Before a
byte of tensor data is read, the header is checked against the file (a pickle or zip where safetensors
belong, a truncated copy, offsets that do not add up are refused with the file named); after reading,
every floating tensor is checked for NaN and Inf. ``config.json`` is capped in size and must be a JSON
object; its sizes are checked by the family (see :func:`mmoe_core.registry.check_config`).

Writing: every file goes to a temporary name, is fsynced and renamed into place (then its folder is
fsynced). A whole checkpoint is replaced with :func:`replacing_dir`: the new one is written into a
hidden sibling folder and swapped in (one ``renameat2(RENAME_EXCHANGE)``) only once complete, so config,
weights, snapshots and log change together and a process killed at any moment leaves the previous
checkpoint loadable. A lock file beside the folder keeps two writers out of one checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmoe_core import __version__ as CODE_VERSION
from mmoe_core.errors import BusyError, UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SNAPSHOT_DIR = "snapshots"
TRAIN_LOG_NAME = "train_log.parquet"
_SNAPSHOT_RE = re.compile(r"^step_(\d+)\.safetensors$")
MAX_CONFIG_BYTES = 64 * 1024 * 1024  # a config.json is a few KB; an answer vocabulary a few MB
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on its JSON header
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "pickled weights are never loaded (unpickling runs code); where the file is trusted, convert it "
    'with: python -c "import torch, safetensors.torch as s; '
    "s.save_file(torch.load('IN', weights_only=True), 'model.safetensors')\""
)


class CheckpointError(UserError, ValueError):
    """A checkpoint directory is missing a file or holds weights that do not fit its config."""


# ---------------------------------------------------------------------------------------------
# Durable writes
# ---------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (deepest first), then ``root`` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)
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


def save_train_log(train_log, ckpt_dir: Path) -> None:
    _atomic_write(Path(ckpt_dir) / TRAIN_LOG_NAME, lambda tmp: train_log.to_parquet(tmp, index=False))


def write_checkpoint(model: nn.Module, config: dict, ckpt_dir: Path, train_log=None) -> Path:
    """Write config.json, model.safetensors and (if given, a DataFrame) train_log.parquet into ``ckpt_dir``
    (each file atomically; use :func:`replacing_dir` to replace a whole checkpoint at once)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, ckpt_dir)
    save_weights(model, ckpt_dir / WEIGHTS_NAME)
    if train_log is not None:
        save_train_log(train_log, ckpt_dir)
    return ckpt_dir


def save_checkpoint(model: nn.Module, config: dict, ckpt_dir: Path, train_log=None) -> Path:
    """A new checkpoint at ``ckpt_dir`` (config.json, model.safetensors, train_log.parquet when given),
    replacing whatever checkpoint was there as a whole (its snapshots and log included)."""
    with replacing_dir(ckpt_dir) as staged:
        write_checkpoint(model, config, staged, train_log)
    return Path(ckpt_dir)


def save_snapshot(model: nn.Module, ckpt_dir: Path, step: int) -> Path:
    path = Path(ckpt_dir) / SNAPSHOT_DIR / f"step_{int(step)}.safetensors"
    save_weights(model, path)
    return path


# ---------------------------------------------------------------------------------------------
# Replacing a checkpoint folder as a whole
# ---------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


def _swap_into_place(staged: Path, target: Path) -> None:
    """Make ``staged`` the folder at ``target``; the old folder (if any) is removed afterwards."""
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(staged, target)
    elif _exchange(staged, target):
        shutil.rmtree(staged)  # now holds the previous checkpoint
    else:  # no atomic exchange here: two renames; _remove_leftovers puts the old one back after a crash
        old = _sibling(target, "old")
        os.rename(target, old)
        os.rename(staged, target)
        shutil.rmtree(old)
    fsync_path(parent)


def _remove_leftovers(target: Path) -> None:
    """Under the lock: drop staging folders of killed writers; restore an old folder a crash left moved."""
    for entry in target.parent.iterdir():
        if entry.name.startswith(f".{target.name}.staging-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(f".{target.name}.old-"):
            if os.path.lexists(target):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.rename(entry, target)


@contextlib.contextmanager
def _writer_lock(target: Path) -> Iterator[None]:
    lock = target.parent / f".{target.name}.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(
                f"{target} is being written by another process (it holds {lock}); wait until it "
                "finishes, or write to another folder"
            ) from None
        yield
    finally:
        os.close(fd)


def check_replaceable(target: Path) -> Path:
    """The real folder a new checkpoint may replace (symlinks resolved); CheckpointError when ``target``
    is a file, or a non-empty folder that is not a checkpoint (its contents would be lost)."""
    target = Path(os.path.realpath(Path(target).expanduser()))
    if target.parent == target:
        raise CheckpointError(
            f"cannot write a checkpoint at {target}; give a folder such as artifacts/checkpoints/NAME"
        )
    if os.path.lexists(target) and not target.is_dir():
        raise CheckpointError(f"{target} exists and is a file, not a checkpoint folder; choose another output folder")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{target} is a non-empty folder that is not a checkpoint (no {CONFIG_NAME}); writing "
            "a checkpoint there would replace its contents. Choose a new or empty folder"
        )
    return target


@contextlib.contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``target``; on a clean exit it is fsynced and swapped in as
    ``target`` (the previous folder is removed), on an exception it is deleted and ``target`` is left
    as it was. BusyError when another writer holds the same target."""
    target = check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(target):
        _remove_leftovers(target)
        staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
        os.chmod(staged, 0o755)
        try:
            yield staged
            fsync_tree(staged)
            _swap_into_place(staged, target)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def list_snapshots(ckpt_dir: Path) -> list[int]:
    folder = Path(ckpt_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    steps = [int(m.group(1)) for p in folder.iterdir() if (m := _SNAPSHOT_RE.match(p.name))]
    return sorted(steps)


def check_dir(ckpt_dir: Path) -> Path:
    """``ckpt_dir`` as a Path; CheckpointError when it does not exist or is a file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise CheckpointError(
            f"{ckpt_dir}: no such checkpoint folder; check the path, or train one with `python -m mmoe_core.train ...`"
        )
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is a file, not a checkpoint folder (config.json + {WEIGHTS_NAME})")
    return ckpt_dir


def read_json_file(path: Path, max_bytes: int, error: type[UserError] | None = None) -> object:
    """Parse a JSON file of at most ``max_bytes``; ``error`` (CheckpointError) names the file otherwise."""
    error = error or CheckpointError
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(
                f"{path} is {size / 1e6:.1f} MB; a file of this kind is at most {max_bytes / 1e6:.0f} MB, "
                "so this is not the file it should be"
            )
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: invalid JSON ({exc}); restore the file or rewrite it") from exc
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def load_config(ckpt_dir: Path) -> dict:
    path = check_dir(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir}: not a checkpoint (no {CONFIG_NAME}); give the folder that holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    config = read_json_file(path, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


# dtype -> bytes per element, as the safetensors format names them
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def _looks_pickled(head: bytes) -> str | None:
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save's format)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle"
    return None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking that the file holds them all (no tensor
    data is read). CheckpointError naming the file for a pickle, a truncated file or a bad header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            kind = _looks_pickled(head)
            if kind:
                raise CheckpointError(f"{path} is {kind}, not a safetensors file: {CONVERT_HINT}")
            if len(head) < 8:
                raise CheckpointError(
                    f"{path} is truncated ({size} bytes, not even a safetensors header); copy it again or retrain"
                )
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path} is not a safetensors file, or is truncated (its header claims {n} "
                    f"bytes, the file has {size}); copy it again or retrain"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged safetensors header ({exc}); copy it again or retrain") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not an object)")
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, info in header.items():
        tensors[name] = _tensor_info(path, name, info)
        end = max(end, int(info["data_offsets"][1]))
    data = size - 8 - n
    if end > data:
        raise CheckpointError(
            f"{path} is truncated: its header promises {end} bytes of tensor data, the file holds "
            f"{data} (an interrupted copy or save?); copy it again or retrain"
        )
    return tensors


def _tensor_info(path: Path, name: str, info: object) -> TensorInfo:
    ok = (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(isinstance(o, int) and o >= 0 for o in info["data_offsets"])
    )
    if not ok:
        raise CheckpointError(f"{path}: damaged safetensors header (tensor {name!r}: {str(info)[:120]})")
    start, stop = info["data_offsets"]
    width = _DTYPE_BYTES.get(info["dtype"])  # a dtype newer than this table: safetensors checks it on load
    if width is not None and stop - start != math.prod(info["shape"]) * width:
        raise CheckpointError(
            f"{path}: damaged safetensors header (tensor {name!r} has {stop - start} bytes for "
            f"shape {info['shape']} of {info['dtype']})"
        )
    return TensorInfo(info["dtype"], tuple(info["shape"]))


def weights_path(ckpt_dir: Path, snapshot: int | None = None) -> Path:
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir / WEIGHTS_NAME if snapshot is None else ckpt_dir / SNAPSHOT_DIR / f"step_{snapshot}.safetensors"


def checked_header(ckpt_dir: Path, snapshot: int | None = None) -> dict[str, TensorInfo]:
    """The header of the checkpoint's weights (or of snapshot ``snapshot``), with a clear error when absent."""
    path = weights_path(check_dir(ckpt_dir), snapshot)
    if path.is_file():
        return read_safetensors_header(path)
    if snapshot is not None:
        steps = list_snapshots(ckpt_dir)
        raise CheckpointError(
            f"{path} does not exist; snapshots of this checkpoint: {', '.join(map(str, steps)) or 'none'}"
        )
    pickles = sorted(p.name for p in Path(ckpt_dir).iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = f" (found {', '.join(pickles[:3])}: {CONVERT_HINT})" if pickles else "; the checkpoint is incomplete"
    raise CheckpointError(f"{path} does not exist{hint}")


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the tensors that hold NaN or Inf."""
    bad = []
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} tensor(s) hold NaN or Inf: {', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}; the training diverged or the file is damaged: use "
            "an earlier snapshot, or retrain (lower learning rate, gradient clipping)"
        )


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file's tensors: header checked first, NaN/Inf checked after (CheckpointError)."""
    read_safetensors_header(path)
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors' own checks (overlapping offsets ...): a damaged file, not a bug
        raise CheckpointError(f"{path}: cannot be read as safetensors ({exc}); copy it again or retrain") from exc
    check_finite(state, str(path))
    return state


def load_state(ckpt_dir: Path, snapshot: int | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint's weights with safetensors (no unpickling), after the header check, then the
    NaN/Inf check. ``snapshot`` picks snapshots/step_<N>."""
    checked_header(ckpt_dir, snapshot)
    return load_state_file(weights_path(ckpt_dir, snapshot))


def describe_mismatch(own: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    """What differs between the tensors a model has (``own``) and those a file holds, or None."""
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    bad_shape = sorted(k for k in set(own) & set(found) if tuple(own[k]) != tuple(found[k]))
    if not (missing or unexpected or bad_shape):
        return None

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the file ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if bad_shape:
        shapes = [f"{k} is {list(found[k])} in the file, {list(own[k])} in the model" for k in bad_shape[:3]]
        parts.append(f"{len(bad_shape)} with the wrong shape ({'; '.join(shapes)})")
    return "; ".join(parts)


def check_fits(model_shapes: Mapping[str, tuple[int, ...]], header: Mapping[str, TensorInfo], source: str) -> None:
    """CheckpointError when the weights file does not fit the model its config describes."""
    problem = describe_mismatch(model_shapes, {k: v.shape for k, v in header.items()})
    if problem:
        raise CheckpointError(
            f"{source}: the weights do not fit the model its {CONFIG_NAME} describes: {problem}. "
            f"The files come from different models: restore the {CONFIG_NAME} saved with these "
            "weights, or retrain"
        )


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> nn.Module:
    """Strictly load ``state`` into ``model``, naming the missing, unexpected or reshaped keys on failure."""
    own = model.state_dict()
    problem = describe_mismatch(
        {k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in state.items()}
    )
    if problem:
        raise CheckpointError(f"{source}: weights do not fit the model: {problem}")
    model.load_state_dict(state, strict=True)
    return model


def load_train_log(ckpt_dir: Path):
    import pandas as pd

    path = Path(ckpt_dir) / TRAIN_LOG_NAME
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow's errors for a damaged file have no common base class
        raise CheckpointError(f"{path}: cannot be read as Parquet ({exc}); delete it or retrain") from exc

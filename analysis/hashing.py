"""Stable content hashes for checkpoints and datasets (used by the artifact store to detect stale runs).

All hashes are lowercase hex SHA-256 strings.

* :func:`file_sha256` hashes one file's bytes. Results are memoised in-process, keyed by
  (resolved path, size, mtime_ns, inode): a page that checks staleness on every rerun pays a ``stat``,
  not a re-read of a large ``model.safetensors``; any rewrite of the file changes mtime/size and so is
  re-hashed. As in git's "racily clean" rule, a file modified less than ``_SETTLE_S`` seconds before it
  was hashed is not memoised (file timestamps are coarse, so a same-size rewrite within one timestamp
  tick would otherwise go unnoticed).
* :func:`dir_hash` hashes a directory tree as a sorted list of ``relative/posix/path``, size and (for
  files whose suffix is in ``content_suffixes``) the SHA-256 of the content. Everything else (images,
  archives, ...) contributes its name and size only: a dataset with 100k images hashes in seconds, at the
  price that an image edited in place to a different picture *of exactly the same byte size* is not
  noticed. Pass ``content_suffixes=None`` to hash every file's content. Hidden files and directories
  (name starting with ``.``) and ``__pycache__`` are skipped.
* :func:`checkpoint_hash` = hash of ``config.json`` + ``model.safetensors`` (or a sharded folder's index
  and shards; snapshots and logs are deliberately left out: they do not change what the precompute reads).
* :func:`dataset_hash` = :func:`dir_hash` of a dataset directory (or :func:`file_sha256` of a single file).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["file_sha256", "dir_hash", "checkpoint_hash", "dataset_hash", "CONTENT_SUFFIXES", "CHECKPOINT_FILES"]

# Files whose *content* is hashed by dir_hash by default; other files count by name and size.
CONTENT_SUFFIXES = frozenset(
    {".json", ".jsonl", ".parquet", ".safetensors", ".csv", ".tsv", ".txt", ".yaml", ".yml", ".npz", ".npy"}
)
CHECKPOINT_FILES = ("config.json", "model.safetensors")
SHARD_INDEX = "model.safetensors.index.json"

_CHUNK = 1 << 20
_SETTLE_S = 2.0
_cache: dict[tuple, str] = {}
_cache_lock = threading.Lock()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of one file's bytes, memoised on (path, size, mtime_ns, inode)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time() - st.st_mtime < _SETTLE_S:
        return digest  # too fresh to trust the (size, mtime) key; hash again next time
    with _cache_lock:
        if len(_cache) > 4096:  # bounded; entries are tiny but a long-lived app should not grow forever
            _cache.clear()
        _cache[key] = digest
    return digest


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def dir_hash(
    path: str | os.PathLike,
    patterns: Iterable[str] | None = None,
    content_suffixes: Iterable[str] | None = CONTENT_SUFFIXES,
) -> str:
    """Stable hash of a directory tree (see module docstring).

    ``patterns``: optional fnmatch globs on the relative posix path (e.g. ``["*.json", "images/*"]``);
    only matching files count. ``content_suffixes``: suffixes (with dot, case-insensitive) whose content
    is hashed; ``None`` hashes the content of every file.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    pats = list(patterns) if patterns is not None else None
    suffixes = None if content_suffixes is None else {s.lower() for s in content_suffixes}
    entries = []
    for f in _walk(root):
        rel = f.relative_to(root).as_posix()
        if pats is not None and not any(fnmatch.fnmatch(rel, p) for p in pats):
            continue
        entries.append((rel, f))
    entries.sort(key=lambda e: e[0])
    h = hashlib.sha256(b"moescope-dir-hash-v1\n")
    for rel, f in entries:
        size = f.stat().st_size
        if suffixes is None or f.suffix.lower() in suffixes:
            content = file_sha256(f)
        else:
            content = "-"
        h.update(f"{rel}\0{size}\0{content}\n".encode())
    return h.hexdigest()


def checkpoint_hash(ckpt_dir: str | os.PathLike) -> str:
    """Hash of a checkpoint directory's ``config.json`` and ``model.safetensors``.

    Raises FileNotFoundError when either file is missing.
    """
    d = Path(ckpt_dir)
    h = hashlib.sha256(b"moescope-checkpoint-hash-v1\n")
    for name in _weight_files(d):
        f = d / name
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {f}")
        h.update(f"{name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _weight_files(d: Path) -> list[str]:
    """config.json + model.safetensors; for a sharded Hugging Face folder (no model.safetensors, a
    ``model.safetensors.index.json``) the index and every shard it names instead of the single file."""
    index = d / SHARD_INDEX
    if (d / CHECKPOINT_FILES[1]).is_file() or not index.is_file():
        return list(CHECKPOINT_FILES)
    try:
        named = json.loads(index.read_text()).get("weight_map", {}).values()
        shards = sorted({str(f) for f in named if Path(str(f)).name == str(f) and str(f) not in ("", ".", "..")})
    except (OSError, ValueError, AttributeError):
        shards = []
    return [CHECKPOINT_FILES[0], SHARD_INDEX, *shards]


def dataset_hash(data: str | os.PathLike, patterns: Iterable[str] | None = None) -> str:
    """Hash of a dataset: :func:`dir_hash` of a directory, or the SHA-256 of a single file (e.g. a jsonl)."""
    p = Path(data)
    if p.is_file():
        return file_sha256(p)
    if p.is_dir():
        return dir_hash(p, patterns=patterns)
    raise FileNotFoundError(f"dataset not found: {p}")

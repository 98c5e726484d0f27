"""Status and staleness of published runs: is what a reader would open complete, and built from these inputs?

:func:`run_status` says ``missing`` (no manifest), ``partial`` (manifest unreadable, status not
complete, a listed file missing or of the wrong size; with ``verify=True`` also a wrong SHA-256),
``stale`` (built by an older store format, without the model's declaration ``spec``, or from a
checkpoint / dataset that now hashes differently from ``checkpoint_hash`` / ``dataset_hash``) or
``ready``. Messages name what changed and the rebuild command ``python -m analysis.precompute --run <run>``:
a stale run is never shown as if it were current.

Manifest keys read here: ``status``, ``files``, ``store_format``, ``spec``, ``checkpoint`` (path),
``checkpoint_hash``, ``dataset`` (path), ``dataset_hash`` and ``params`` (build ``manifest_base`` with
:func:`inputs_manifest`). Checkpoint hashes are memoised on (path, size, mtime) so checking on every page
render costs a ``stat``; dataset hashes (a walk over the tree) are reused for :data:`DATASET_HASH_TTL_S`
seconds by the status check (not by :func:`needs_rebuild`, which always hashes afresh).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.hashing import checkpoint_hash, dataset_hash, file_sha256
from analysis.store.layout import (
    _RUN_RE,
    MANIFEST,
    STORE_FORMAT,
    _check_run,
    _json_default,
    rebuild_command,
    resolve_root,
    runs_dir,
)
from mmoe_core.errors import UserError
from mmoe_core.spec import ModelSpec


@functools.cache
def code_version() -> str:
    """Package version plus short git commit when available, e.g. ``0.1.0+g1a2b3c4d5e6f.dirty``.

    Never fails: without an installed package the version is ``0.0.0``; without git (or a commit) the
    commit part is left out.
    """
    from mmoe_core import __version__ as version  # one version for the whole project

    version = str(version or "0.0.0")
    repo = Path(__file__).resolve().parents[2]
    try:
        r = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if r.returncode != 0 or not r.stdout.strip():
            return version
        sha = r.stdout.strip()
        d = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = ".dirty" if d.returncode == 0 and d.stdout.strip() else ""
        return f"{version}+g{sha}{dirty}"
    except (OSError, subprocess.SubprocessError):
        return version


def inputs_manifest(
    checkpoint_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike | None,
    params: Mapping[str, Any] | None = None,
    spec: ModelSpec | Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict:
    """Build ``manifest_base`` for :class:`RunWriter` with the keys staleness checks read:
    ``checkpoint``, ``checkpoint_hash``, ``dataset``, ``dataset_hash``, ``params``, ``spec`` (the model's
    declaration, ``ModelSpec.to_dict()``) (+ ``extra``)."""
    base: dict[str, Any] = dict(extra)
    if spec is not None:
        base["spec"] = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    if checkpoint_dir is not None:
        base["checkpoint"] = os.fspath(checkpoint_dir)
        base["checkpoint_hash"] = checkpoint_hash(checkpoint_dir)
    if data_dir is not None:
        base["dataset"] = os.fspath(data_dir)
        base["dataset_hash"] = dataset_hash(data_dir)
    base["params"] = _norm_params(params)
    return base


class InputsChanged(UserError, RuntimeError):
    """The checkpoint or the dataset changed while a precompute was reading it: nothing is published."""


def _hash_or_none(fn, path) -> str | None:
    try:
        return fn(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_inputs_unchanged(
    base: Mapping[str, Any], checkpoint_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None
) -> None:
    """Hash the inputs again and compare with the hashes ``base`` (:func:`inputs_manifest`, taken before
    the run) recorded; :class:`InputsChanged` naming what changed, so that a run built from a mix of old
    and new files is never published as if it were built from either."""
    changed = []
    for label, path, key, fn in (
        ("checkpoint", checkpoint_dir, "checkpoint_hash", checkpoint_hash),
        ("dataset", data_dir, "dataset_hash", dataset_hash),
    ):
        if path is None or not base.get(key):
            continue
        now = _hash_or_none(fn, path)
        if now != base[key]:
            changed.append(
                f"the {label} {path} (hash {_short(base[key])} when the run started, "
                f"{_short(now) if now else 'gone'} at its end)"
            )
    if changed:
        raise InputsChanged(
            f"{' and '.join(changed)} changed while the precompute read it; the run was not "
            "published and the previous version is kept. Run the precompute again once the files "
            "are settled"
        )


def _norm_params(params: Mapping[str, Any] | None) -> dict:
    """JSON-normalised params without ``code_version`` (which never forces a rebuild)."""
    if params is None:
        return {}
    norm = json.loads(json.dumps(dict(params), sort_keys=True, default=_json_default))
    norm.pop("code_version", None)
    return norm


def read_spec(manifest: Mapping[str, Any] | None) -> ModelSpec:
    """The model's declaration stored in a manifest; ``ValueError`` (saying why) when absent or unreadable."""
    raw = (manifest or {}).get("spec")
    if not isinstance(raw, Mapping):
        raise ValueError("the manifest holds no model declaration (spec)")
    try:
        return ModelSpec.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the manifest's model declaration (spec) is unreadable ({exc})") from exc


def _format_problem(m: Mapping[str, Any]) -> str | None:
    """Why a complete manifest cannot be read as this store format, or None."""
    fmt = m.get("store_format")
    if not isinstance(fmt, int) or fmt < STORE_FORMAT:
        return f"it was built by an older MoEscope (store format {fmt}; this one reads {STORE_FORMAT})"
    if fmt > STORE_FORMAT:
        return f"it was built by a newer MoEscope (store format {fmt}; this one reads {STORE_FORMAT})"
    try:
        read_spec(m)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class RunStatus:
    """``state`` is one of "missing", "partial", "stale", "ready"; ``message`` says why (with the rebuild
    command when a rebuild is needed); ``manifest`` is the parsed manifest (None when unreadable)."""

    state: str
    message: str
    manifest: dict | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        return self.state == "ready"


def _read_manifest(run_dir: Path) -> tuple[dict | None, str | None]:
    p = run_dir / MANIFEST
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable: {e}"
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e}"
    if not isinstance(m, dict):
        return None, "not a JSON object"
    return m, None


def _resolve_input_path(p: str | os.PathLike, root: Path) -> Path:
    path = Path(p)
    if path.is_absolute():
        return path
    for base in (Path.cwd(), root.parent, root):
        cand = base / path
        if cand.exists():
            return cand
    return path


# Hashing a dataset walks its whole tree (a stat per image); pages check status on every rerun, so the
# status check reuses a dataset hash for this many seconds. Checkpoints need no TTL (see hashing.py).
DATASET_HASH_TTL_S = 30.0
_dataset_memo: dict[str, tuple[float, str]] = {}


def _dataset_hash_memo(path: Path) -> str:
    key = str(path.resolve())
    hit = _dataset_memo.get(key)
    now = time.monotonic()
    if hit is not None and now - hit[0] < DATASET_HASH_TTL_S:
        return hit[1]
    h = dataset_hash(path)
    _dataset_memo[key] = (now, h)
    return h


def _short(h: str | None) -> str:
    return (h or "none")[:12]


def _status_of_dir(
    run: str, run_dir: Path, root: Path, checkpoint_dir=None, dataset_dir=None, verify: bool = False
) -> RunStatus:
    cmd = rebuild_command(run)
    if not run_dir.is_dir():
        return RunStatus("missing", f"run {run!r} has not been built; build it with: {cmd}")
    m, err = _read_manifest(run_dir)
    if m is None:
        if err == "missing":
            return RunStatus("missing", f"run {run!r} has no {MANIFEST}; build it with: {cmd}")
        return RunStatus("partial", f"run {run!r}: {MANIFEST} is {err}; rebuild with: {cmd}")
    if m.get("status") != "complete":
        return RunStatus("partial", f"run {run!r} is incomplete (status {m.get('status')!r}); rebuild with: {cmd}", m)
    files = m.get("files")
    if not isinstance(files, dict):
        return RunStatus("partial", f"run {run!r}: manifest lists no files; rebuild with: {cmd}", m)
    problems = []
    for name, info in sorted(files.items()):
        p = run_dir / name
        if not p.is_file():
            problems.append(f"{name} is missing")
            continue
        size = p.stat().st_size
        if isinstance(info, dict) and info.get("bytes") is not None and size != info["bytes"]:
            problems.append(f"{name} has {size} bytes, manifest says {info['bytes']}")
        elif verify and isinstance(info, dict) and info.get("sha256") and file_sha256(p) != info["sha256"]:
            problems.append(f"{name} content differs from the manifest")
    if problems:
        return RunStatus("partial", f"run {run!r} is partial: {'; '.join(problems)}; rebuild with: {cmd}", m)
    old = _format_problem(m)
    if old is not None:
        return RunStatus("stale", f"run {run!r} is stale: {old}; rebuild with: {cmd}", m)

    changes, notes = [], []
    ck = checkpoint_dir if checkpoint_dir is not None else m.get("checkpoint")
    if ck is not None and m.get("checkpoint_hash"):
        ckp = _resolve_input_path(ck, root)
        try:
            now = checkpoint_hash(ckp)
        except FileNotFoundError:
            notes.append(f"checkpoint {ck} not found, freshness not verified")
        else:
            if now != m["checkpoint_hash"]:
                changes.append(
                    f"checkpoint {ck} changed (now {_short(now)}, run built from {_short(m['checkpoint_hash'])})"
                )
    ds = dataset_dir if dataset_dir is not None else m.get("dataset")
    if ds is not None and m.get("dataset_hash"):
        dsp = _resolve_input_path(ds, root)
        if dsp.exists():
            now = _dataset_hash_memo(dsp)
            if now != m["dataset_hash"]:
                changes.append(f"dataset {ds} changed (now {_short(now)}, run built from {_short(m['dataset_hash'])})")
        else:
            notes.append(f"dataset {ds} not found, freshness not verified")
    if changes:
        return RunStatus("stale", f"run {run!r} is stale: {'; '.join(changes)}; rebuild with: {cmd}", m)
    msg = f"run {run!r} is ready"
    if notes:
        msg += " (" + "; ".join(notes) + ")"
    return RunStatus("ready", msg, m)


def run_status(
    run: str,
    root: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    verify: bool = False,
) -> RunStatus:
    """State of a published run: missing / partial / stale / ready (see module docstring).

    ``checkpoint_dir`` / ``dataset_dir`` override the paths recorded in the manifest;
    ``verify=True`` also re-hashes every listed file.
    """
    _check_run(run)
    r = resolve_root(root)
    link = r / "runs" / run
    run_dir = Path(os.path.realpath(link)) if os.path.lexists(link) else link
    return _status_of_dir(run, run_dir, r, checkpoint_dir, dataset_dir, verify)


def list_runs(root: str | os.PathLike | None = None) -> list[str]:
    """Published runs (those whose directory holds a manifest), sorted; hidden/staging entries excluded."""
    d = runs_dir(root)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith(".") or not _RUN_RE.match(n):
            continue
        if (d / n / MANIFEST).is_file():
            out.append(n)
    return sorted(out)


def rebuild_reasons(
    run: str,
    checkpoint_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike | None,
    params: Mapping[str, Any] | None,
    root: str | os.PathLike | None = None,
) -> list[str]:
    """Why ``run`` must be (re)built from these inputs; empty when the published run is up to date."""
    st = run_status(run, root, checkpoint_dir=checkpoint_dir, dataset_dir=data_dir)
    if st.state != "ready":
        return [st.message]
    m = st.manifest or {}
    reasons = []
    ck = checkpoint_hash(checkpoint_dir) if checkpoint_dir is not None else None
    if ck != m.get("checkpoint_hash"):
        reasons.append(f"checkpoint hash {_short(ck)} differs from the run's {_short(m.get('checkpoint_hash'))}")
    ds = dataset_hash(data_dir) if data_dir is not None else None
    if ds != m.get("dataset_hash"):
        reasons.append(f"dataset hash {_short(ds)} differs from the run's {_short(m.get('dataset_hash'))}")
    new, old = _norm_params(params), _norm_params(m.get("params"))
    if new != old:
        keys = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        reasons.append(f"params changed: {', '.join(keys)}")
    return reasons


def needs_rebuild(
    run: str,
    checkpoint_dir: str | os.PathLike | None,
    data_dir: str | os.PathLike | None,
    params: Mapping[str, Any] | None,
    root: str | os.PathLike | None = None,
) -> bool:
    """False when a ready run exists built from the same checkpoint hash, dataset hash and params
    (``code_version`` is ignored), so re-running the precompute with unchanged inputs does nothing."""
    return bool(rebuild_reasons(run, checkpoint_dir, data_dir, params, root))

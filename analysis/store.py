"""The artifact store: atomic writes of precomputed runs, stale/partial detection, and the read API.

No Streamlit and no torch here: pages read through :class:`RunStore`; ``analysis.precompute`` writes
through :class:`RunWriter`.

Layout
------
::

    <artifacts_root>/runs/
        <run>            -> symlink to .versions/<run>-<stamp>-<id>   (what readers open)
        .versions/<run>-<stamp>-<id>/   manifest.json, <table>.parquet, other small files
        .staging/<run>-<uuid>/          a writer's private work dir (+ <run>-<uuid>.lock, flock'ed)
        .locks/<run>.lock               serialises publishes of one run

Atomic publish
--------------
A :class:`RunWriter` writes every file into its private staging dir, writes ``manifest.json`` last,
fsyncs files and dirs, then, holding ``.locks/<run>.lock``: renames the staging dir to
``.versions/<run>-<stamp>-<id>`` (one ``rename(2)``), points a fresh temporary symlink at it and
``os.replace`` s that symlink over ``runs/<run>`` (the single atomic step readers can observe), fsyncs
``runs/``, and finally deletes the older versions of that run (and orphans of killed publishers).
A real directory at ``runs/<run>`` (older, non-atomic layout) is first moved into ``.versions``.
A writer killed at any point leaves either the old symlink (old run intact) or the new one (new run
complete); its staging dir is invisible to readers (hidden name) and is removed by the next writer,
which can tell a dead writer's leftovers from a live writer's work by trying the staging dir's
``flock`` (the kernel drops a killed process's locks).

Readers resolve ``runs/<run>`` once (:class:`RunStore` keeps the resolved version dir), so a publish in
the middle of a page render never mixes versions. The superseded version is deleted right after a
publish, so a long-lived reader should check :meth:`RunStore.is_current` (one ``readlink``) before use
and reopen when it returns False.

Manifest
--------
``{"run", "status": "complete", "created" (UTC ISO 8601), "code_version", "store_format",
"files": {filename: {"rows": n | null, "bytes": b, "sha256": h}}, **manifest_base}``.
The precompute passes ``manifest_base`` (build it with :func:`inputs_manifest`); the keys the store
itself interprets are ``checkpoint`` (path), ``checkpoint_hash``, ``dataset`` (path), ``dataset_hash``
and ``params`` (JSON object). Others (``family``, ``split``, ...) are carried along.

Staleness
---------
:func:`run_status` says ``missing`` (no manifest), ``partial`` (manifest unreadable, status not
complete, a listed file missing or of the wrong size; with ``verify=True`` also a wrong SHA-256),
``stale`` (the checkpoint named in the manifest, or the one passed, now hashes differently from
``checkpoint_hash``; same for the dataset when its path exists) or ``ready``. Messages name what changed
and the rebuild command ``python -m analysis.precompute --run <run>``. Checkpoint hashes are memoised on
(path, size, mtime) so checking on every page render costs a ``stat``; dataset hashes (a walk over the
tree) are reused for :data:`DATASET_HASH_TTL_S` seconds by the status check (not by
:func:`needs_rebuild`, which always hashes afresh).

Routing table
-------------
``routing.parquet`` is written sorted by (example_index, layer, call, position) in row groups of
64k rows, so a per-example filter touches one or two row groups. When a run has a routing table,
:class:`RunWriter` also writes two small aggregates computed by DuckDB from the staged file:
``routing_loads.parquet`` (per layer, call, position_kind, routed_modality, gate_modality, expert: top-k
slot count and summed combine weight; every expert 0..E-1 is present, dead ones with zeros) and
``routing_entropy_sample.parquet`` (a deterministic uniform sample of up to 50k positions per layer with
entropy / top1_prob and position metadata). The read API uses them when present and falls back to the
full routing table otherwise.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.hashing import checkpoint_hash, dataset_hash, file_sha256

__all__ = [
    "RunWriter", "RunStore", "RunStatus", "list_runs", "run_status", "needs_rebuild", "rebuild_reasons",
    "inputs_manifest", "code_version", "resolve_root", "runs_dir", "write_routing_with_aggregates",
    "write_routing_aggregates", "rebuild_command", "ROUTING_TYPES", "MANIFEST", "ROW_GROUP_SIZE",
]

MANIFEST = "manifest.json"
STORE_FORMAT = 1
ROW_GROUP_SIZE = 65_536
ENTROPY_SAMPLE_PER_LAYER = 50_000
_STAGING, _VERSIONS, _LOCKS = ".staging", ".versions", ".locks"
_RESERVED_KEYS = frozenset({"run", "status", "created", "code_version", "store_format", "files"})

_RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_VERSION_RE = re.compile(r"^(?P<run>.+)-(?P<stamp>\d{8}T\d{12}Z)-(?P<uid>[0-9a-f]{8})$")

ROUTING_SORT = ("example_index", "layer", "call", "position")
ROUTING_GROUPS = ("layer", "call", "position_kind", "routed_modality", "gate_modality")
# Declared types of the routing columns; present columns are cast to these on write (others kept as is).
ROUTING_TYPES: dict[str, pa.DataType] = {
    "layer": pa.string(), "call": pa.string(), "example_index": pa.int64(), "example_id": pa.string(),
    "position": pa.int32(), "position_kind": pa.string(), "token": pa.string(),
    "routed_modality": pa.string(), "gate_modality": pa.string(), "grid_row": pa.int16(),
    "grid_col": pa.int16(), "top1": pa.int16(),
    "topk_ids": pa.list_(pa.int16()), "topk_weights": pa.list_(pa.float32()),
    "combine": pa.list_(pa.float32()), "probs": pa.list_(pa.float32()), "logits": pa.list_(pa.float32()),
    "entropy": pa.float32(),
    "top1_prob": pa.float32(), "routed": pa.bool_(),
}


def rebuild_command(run: str) -> str:
    return f"python -m analysis.precompute --run {run}"


# ----------------------------------------------------------------------------------------- paths

def _default_root() -> Path:
    env = os.environ.get("MOESCOPE_ARTIFACTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "artifacts"


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The artifacts root: ``root`` if given, else ``mmoe_core.paths.artifacts_root()`` (falling back to
    ``$MOESCOPE_ARTIFACTS`` or ``<repo>/artifacts`` when that module is not importable)."""
    if root is not None:
        return Path(root)
    try:
        from mmoe_core.paths import artifacts_root
    except ImportError:
        return _default_root()
    return Path(artifacts_root())


def runs_dir(root: str | os.PathLike | None = None) -> Path:
    return resolve_root(root) / "runs"


def _check_run(run: str) -> str:
    if not isinstance(run, str) or not _RUN_RE.match(run):
        raise ValueError(f"invalid run name {run!r}: use letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return run


def _check_table_name(name: str) -> str:
    if not isinstance(name, str) or not _TABLE_RE.match(name):
        raise ValueError(f"invalid table name {name!r}: use letters, digits and '_'")
    return name


def _check_file_name(name: str) -> str:
    if not isinstance(name, str) or not _FILE_RE.match(name) or ".." in name:
        raise ValueError(f"invalid file name {name!r}: a plain name (letters, digits, '.', '_', '-')")
    return name


# ------------------------------------------------------------------------------------- helpers

def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (_dt.datetime, _dt.date)):
        return o.isoformat()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _to_arrow(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, Mapping):
        return pa.table(dict(data))
    raise TypeError(f"expected a pandas DataFrame, pyarrow Table or dict of columns, got {type(data).__name__}")


def _cast_routing(table: pa.Table) -> pa.Table:
    fields = []
    for f in table.schema:
        fields.append(pa.field(f.name, ROUTING_TYPES.get(f.name, f.type)))
    target = pa.schema(fields)
    if target.equals(table.schema.remove_metadata()):
        return table.replace_schema_metadata(None)
    return table.replace_schema_metadata(None).cast(target)


def _is_routing_table(name: str) -> bool:
    """``routing`` and ``<something>_routing`` (e.g. ``kb_routing``) get the routing types and sort order."""
    return name == "routing" or name.endswith("_routing")


def _sort_routing(table: pa.Table) -> pa.Table:
    keys = [(c, "ascending") for c in ROUTING_SORT if c in table.column_names]
    return table.sort_by(keys) if keys else table


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """Package version plus short git commit when available, e.g. ``0.1.0+g1a2b3c4d5e6f.dirty``.

    Never fails: without an installed package the version is ``0.0.0``; without git (or a commit) the
    commit part is left out.
    """
    from mmoe_core import __version__ as version  # one version for the whole project
    version = str(version or "0.0.0")
    repo = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                           text=True, timeout=5)
        if r.returncode != 0 or not r.stdout.strip():
            return version
        sha = r.stdout.strip()
        d = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5)
        dirty = ".dirty" if d.returncode == 0 and d.stdout.strip() else ""
        return f"{version}+g{sha}{dirty}"
    except (OSError, subprocess.SubprocessError):
        return version


def inputs_manifest(checkpoint_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None,
                    params: Mapping[str, Any] | None = None, **extra: Any) -> dict:
    """Build ``manifest_base`` for :class:`RunWriter` with the keys staleness checks read:
    ``checkpoint``, ``checkpoint_hash``, ``dataset``, ``dataset_hash``, ``params`` (+ ``extra``)."""
    base: dict[str, Any] = dict(extra)
    if checkpoint_dir is not None:
        base["checkpoint"] = os.fspath(checkpoint_dir)
        base["checkpoint_hash"] = checkpoint_hash(checkpoint_dir)
    if data_dir is not None:
        base["dataset"] = os.fspath(data_dir)
        base["dataset_hash"] = dataset_hash(data_dir)
    base["params"] = _norm_params(params)
    return base


def _norm_params(params: Mapping[str, Any] | None) -> dict:
    """JSON-normalised params without ``code_version`` (which never forces a rebuild)."""
    if params is None:
        return {}
    norm = json.loads(json.dumps(dict(params), sort_keys=True, default=_json_default))
    norm.pop("code_version", None)
    return norm


# ------------------------------------------------------------------------------------- locking

class _FileLock:
    """Exclusive ``flock`` on a path, held while the object is open; released by the kernel on death."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> "_FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _clean_staging(staging_root: Path) -> list[str]:
    """Remove staging dirs (and lock files) whose writer is gone; return the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(staging_root)
    except FileNotFoundError:
        return removed
    bases = sorted({n[:-5] if n.endswith(".lock") else n for n in names})
    for base in bases:
        lock = staging_root / f"{base}.lock"
        fd = None
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # a dir without a lock file: its writer is gone (writers lock before mkdir)
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live writer
        try:
            _rmtree(staging_root / base)
            if fd is not None:
                lock.unlink(missing_ok=True)
            removed.append(base)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


# ------------------------------------------------------------------------------------- writing

class RunWriter:
    """Write one run atomically. Use as a context manager::

        with RunWriter("demo", manifest_base=inputs_manifest(ckpt, data, params, family="mmoe")) as w:
            w.write_table("routing", routing_df)      # sorted + typed + aggregates added at commit
            w.write_table("examples", examples_df)
            w.write_json("projection_model", {...})
            w.write_bytes("projection_model.npz", raw)

    On a clean exit the manifest is written and the run published (see module docstring); on an
    exception the staging dir is discarded and the published run is left untouched.
    """

    def __init__(self, run: str, root: str | os.PathLike | None = None,
                 manifest_base: Mapping[str, Any] | None = None, *, aggregate_routing: bool = True,
                 row_group_size: int = ROW_GROUP_SIZE, compression: str = "zstd"):
        self.run = _check_run(run)
        self.root = resolve_root(root)
        base = dict(manifest_base or {})
        bad = _RESERVED_KEYS & base.keys()
        if bad:
            raise ValueError(f"manifest_base may not set reserved keys {sorted(bad)}")
        self.manifest_base = base
        self.aggregate_routing = aggregate_routing
        self.row_group_size = int(row_group_size)
        self.compression = compression
        self._extra: dict[str, Any] = {}
        self._files: set[str] = set()
        self._streams: dict[str, dict] = {}
        self._lock: _FileLock | None = None
        self._dir: Path | None = None
        self.published: Path | None = None

    # -- lifecycle
    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def staging_dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("RunWriter is not open (use it as a context manager)")
        return self._dir

    def open(self) -> "RunWriter":
        if self._dir is not None:
            return self
        staging_root = self.runs / _STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        _clean_staging(staging_root)
        while True:
            name = f"{self.run}-{uuid.uuid4().hex}"
            lock = _FileLock(staging_root / f"{name}.lock").acquire()
            try:
                same = os.stat(lock.path).st_ino == os.fstat(lock.fd).st_ino
            except FileNotFoundError:
                same = False  # a cleaner removed it between our open and our flock: try a new name
            if same:
                break
            lock.release()
        self._lock = lock
        self._dir = staging_root / name
        self._dir.mkdir()
        return self

    def __enter__(self) -> "RunWriter":
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
        return False

    def abort(self) -> None:
        """Discard everything written so far; the published run is untouched."""
        for s in self._streams.values():
            try:
                if s["writer"] is not None:
                    s["writer"].close()
            except Exception:
                pass
        self._streams.clear()
        if self._dir is not None:
            _rmtree(self._dir)
        self._release_staging()

    def _release_staging(self) -> None:
        if self._lock is not None:
            self._lock.path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None
        self._dir = None

    # -- writing files
    def _claim(self, filename: str) -> Path:
        _check_file_name(filename)
        if filename == MANIFEST:
            raise ValueError(f"{MANIFEST} is written by the store itself")
        if filename in self._files:
            raise ValueError(f"{filename} was already written in this run")
        self._files.add(filename)
        return self.staging_dir / filename

    def _unclaim(self, path: Path) -> None:
        """Forget a file whose write failed (so the caller may catch the error and carry on)."""
        self._files.discard(path.name)
        path.unlink(missing_ok=True)

    def _prepare(self, name: str, data: Any, sort: bool = True) -> pa.Table:
        table = _to_arrow(data)
        if _is_routing_table(name):
            table = _cast_routing(table)
            if sort:
                table = _sort_routing(table)
        return table.replace_schema_metadata(None)

    def write_table(self, name: str, data: Any) -> int:
        """Write ``<name>.parquet`` from a DataFrame / Arrow table / dict of columns; return the row count.

        ``routing`` (and ``*_routing``, e.g. ``kb_routing``) is cast to :data:`ROUTING_TYPES` and sorted by
        (example_index, layer, call, position).
        """
        _check_table_name(name)
        path = self._claim(f"{name}.parquet")
        try:
            table = self._prepare(name, data)
            pq.write_table(table, path, row_group_size=self.row_group_size, compression=self.compression)
        except BaseException:
            self._unclaim(path)
            raise
        return table.num_rows

    def append_table(self, name: str, data: Any) -> None:
        """Stream a large table in batches (same schema each time). Rows are buffered into row groups of
        ``row_group_size``; for ``routing`` each row group is sorted, so append examples in increasing
        ``example_index`` order to keep per-example reads cheap."""
        _check_table_name(name)
        s = self._streams.get(name)
        if s is None:
            path = self._claim(f"{name}.parquet")
            s = self._streams[name] = {"path": path, "writer": None, "buf": [], "rows": 0, "schema": None}
        table = _to_arrow(data)
        if _is_routing_table(name):
            table = _cast_routing(table)
        else:
            table = table.replace_schema_metadata(None)
        if s["schema"] is None:
            s["schema"] = table.schema
        elif not table.schema.equals(s["schema"]):
            table = table.cast(s["schema"])
        s["buf"].append(table)
        s["rows"] += table.num_rows
        if s["rows"] >= self.row_group_size:
            self._flush(name, final=False)

    def _flush(self, name: str, final: bool) -> None:
        s = self._streams[name]
        if not s["buf"]:
            return
        table = pa.concat_tables(s["buf"])
        if _is_routing_table(name):
            table = _sort_routing(table)
        n = table.num_rows if final else (table.num_rows // self.row_group_size) * self.row_group_size
        head, rest = table.slice(0, n), table.slice(n)
        if s["writer"] is None:
            s["writer"] = pq.ParquetWriter(s["path"], s["schema"], compression=self.compression)
        if head.num_rows:
            s["writer"].write_table(head, row_group_size=self.row_group_size)
        s["buf"] = [rest] if rest.num_rows else []
        s["rows"] = rest.num_rows

    def close_table(self, name: str) -> None:
        """Finish a streamed table (done automatically at commit)."""
        s = self._streams[name]
        self._flush(name, final=True)
        if s["writer"] is None:  # nothing was ever appended with rows
            pq.write_table(pa.Table.from_batches([], schema=s["schema"]), s["path"])
        else:
            s["writer"].close()
        del self._streams[name]

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``<name>.json`` (``name`` may already end in ``.json``)."""
        filename = name if name.endswith(".json") else f"{name}.json"
        path = self._claim(filename)
        try:
            path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
        except BaseException:
            self._unclaim(path)
            raise
        return path

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write an opaque file (e.g. ``projection_model.npz``) under its given name."""
        path = self._claim(name)
        path.write_bytes(bytes(data))
        return path

    def file_path(self, name: str) -> Path:
        """Claim ``name`` and return its staging path, for libraries that write files themselves."""
        return self._claim(name)

    def update_manifest(self, **fields: Any) -> None:
        """Add fields to the manifest (e.g. summary numbers known only at the end)."""
        bad = _RESERVED_KEYS & fields.keys()
        if bad:
            raise ValueError(f"reserved manifest keys {sorted(bad)}")
        self._extra.update(fields)

    # -- commit / publish
    def commit(self) -> Path:
        """Finish files, write the manifest, publish; returns the published version dir."""
        d = self.staging_dir
        for name in list(self._streams):
            self.close_table(name)
        if (self.aggregate_routing and "routing.parquet" in self._files
                and "routing_loads.parquet" not in self._files):
            write_routing_aggregates(self)
        files = {}
        for filename in sorted(self._files):
            p = d / filename
            if not p.is_file():
                raise RuntimeError(f"{filename} was claimed but never written")
            rows = pq.read_metadata(p).num_rows if filename.endswith(".parquet") else None
            files[filename] = {"rows": rows, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            _fsync(p)
        manifest = {"run": self.run, "status": "complete", "created": _utc_now().isoformat(),
                    "code_version": code_version(), "store_format": STORE_FORMAT, "files": files}
        manifest.update(self.manifest_base)
        manifest.update(self._extra)
        mpath = d / MANIFEST
        mpath.write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        _fsync(mpath)
        _fsync(d)
        self.published = self._publish()
        self.manifest = manifest
        return self.published

    def _publish(self) -> Path:
        runs = self.runs
        versions = runs / _VERSIONS
        versions.mkdir(parents=True, exist_ok=True)
        with _FileLock(runs / _LOCKS / f"{self.run}.lock"):
            vid = _new_version_id(self.run)
            target = versions / vid
            os.rename(self._dir, target)
            _fsync(versions)
            _fsync(self._dir.parent)
            self._release_staging()
            link = runs / self.run
            if link.is_dir() and not link.is_symlink():  # older, non-atomic layout: keep it as a version
                os.rename(link, versions / _new_version_id(self.run))
            elif link.exists() and not link.is_symlink():
                raise RuntimeError(f"{link} exists and is not a run directory")
            tmp = runs / f".{self.run}.link-{uuid.uuid4().hex[:12]}"
            os.symlink(f"{_VERSIONS}/{vid}", tmp)
            os.replace(tmp, link)
            _fsync(runs)
            # The new version is live; drop the older ones and orphans of killed publishers of this run.
            for entry in versions.iterdir():
                m = _VERSION_RE.match(entry.name)
                if m and m.group("run") == self.run and entry.name != vid:
                    _rmtree(entry)
            for entry in runs.iterdir():
                if entry.name.startswith(f".{self.run}.link-") and entry.is_symlink():
                    entry.unlink(missing_ok=True)
        return target


def _new_version_id(run: str) -> str:
    stamp = _utc_now().strftime("%Y%m%dT%H%M%S%f") + "Z"
    return f"{run}-{stamp}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------ routing aggregates

def write_routing_with_aggregates(writer: RunWriter, routing: Any) -> int:
    """Write ``routing`` (sorted, typed) plus its aggregates; returns the routing row count.
    (``RunWriter`` adds the aggregates at commit anyway; this makes it explicit.)"""
    n = writer.write_table("routing", routing)
    write_routing_aggregates(writer)
    return n


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fetch_arrow(result) -> pa.Table:
    """Arrow table of a DuckDB relation across DuckDB versions (``to_arrow_table`` in 1.4+/2.x)."""
    for attr in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(result, attr, None)
        if fn is not None:
            t = fn()
            return t.read_all() if hasattr(t, "read_all") else t
    raise RuntimeError("this DuckDB cannot return Arrow tables")


def write_routing_aggregates(writer: RunWriter) -> list[str]:
    """Compute ``routing_loads`` and ``routing_entropy_sample`` from the staged ``routing.parquet``
    with DuckDB and add them to the run. Returns the table names written."""
    src = writer.staging_dir / "routing.parquet"
    if "routing" in writer._streams:
        writer.close_table("routing")
    cols = set(pq.read_schema(src).names)
    written = []
    con = duckdb.connect(":memory:")
    try:
        rp = f"read_parquet({_sql_str(str(src))})"
        groups = [c for c in ROUTING_GROUPS if c in cols]
        g = ", ".join(groups)
        if {"layer", "topk_ids", "combine"} <= cols and "routing_loads.parquet" not in writer._files:
            sql = f"""
                WITH w AS (
                    SELECT {g}, expert, sum(wt)::DOUBLE AS weight FROM (
                        SELECT {g}, unnest(range(len(combine)))::INTEGER AS expert, unnest(combine) AS wt
                        FROM {rp}) GROUP BY ALL),
                s AS (
                    SELECT {g}, expert, count(*)::BIGINT AS slots FROM (
                        SELECT {g}, unnest(topk_ids)::INTEGER AS expert FROM {rp}) GROUP BY ALL)
                SELECT {", ".join(f"coalesce(w.{c}, s.{c}) AS {c}" for c in groups)},
                       coalesce(w.expert, s.expert) AS expert,
                       coalesce(s.slots, 0)::BIGINT AS slots, coalesce(w.weight, 0.0) AS weight
                FROM w FULL OUTER JOIN s USING ({g}, expert)
                ORDER BY ALL"""
            loads = _fetch_arrow(con.sql(sql))
            writer.write_table("routing_loads", loads)
            written.append("routing_loads")
        value_cols = [c for c in ("entropy", "top1_prob") if c in cols]
        if "layer" in cols and value_cols and "routing_entropy_sample.parquet" not in writer._files:
            meta = [c for c in ("layer", "call", "position_kind", "routed_modality", "gate_modality",
                                "example_index", "position") if c in cols]
            key = ", ".join(c for c in ("example_index", "layer", "call", "position") if c in cols)
            n = ENTROPY_SAMPLE_PER_LAYER
            # Deterministic Bernoulli sample per layer at rate n / rows(layer) (a hash of the row's key
            # decides), so each layer keeps about n uniformly chosen positions (all of them if fewer).
            sql = f"""
                WITH c AS (SELECT layer, count(*) AS n FROM {rp} GROUP BY layer)
                SELECT {", ".join("r." + x for x in meta + value_cols)}, c.n AS layer_rows
                FROM {rp} r JOIN c USING (layer)
                WHERE c.n <= {n} OR (hash({", ".join("r." + k for k in key.split(", "))}, 'moescope')
                                      % 1000000) < (1000000.0 * {n} / c.n)
                ORDER BY ALL"""
            sample = _fetch_arrow(con.sql(sql))
            writer.write_table("routing_entropy_sample", sample)
            written.append("routing_entropy_sample")
    finally:
        con.close()
    return written


# ------------------------------------------------------------------------------------- status

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


def _status_of_dir(run: str, run_dir: Path, root: Path, checkpoint_dir=None, dataset_dir=None,
                   verify: bool = False) -> RunStatus:
    cmd = rebuild_command(run)
    if not run_dir.is_dir():
        return RunStatus("missing", f"run {run!r} has not been built; build it with: {cmd}")
    m, err = _read_manifest(run_dir)
    if m is None:
        if err == "missing":
            return RunStatus("missing", f"run {run!r} has no {MANIFEST}; build it with: {cmd}")
        return RunStatus("partial", f"run {run!r}: {MANIFEST} is {err}; rebuild with: {cmd}")
    if m.get("status") != "complete":
        return RunStatus("partial", f"run {run!r} is incomplete (status {m.get('status')!r}); "
                                    f"rebuild with: {cmd}", m)
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
                changes.append(f"checkpoint {ck} changed (now {_short(now)}, run built from "
                               f"{_short(m['checkpoint_hash'])})")
    ds = dataset_dir if dataset_dir is not None else m.get("dataset")
    if ds is not None and m.get("dataset_hash"):
        dsp = _resolve_input_path(ds, root)
        if dsp.exists():
            now = _dataset_hash_memo(dsp)
            if now != m["dataset_hash"]:
                changes.append(f"dataset {ds} changed (now {_short(now)}, run built from "
                               f"{_short(m['dataset_hash'])})")
        else:
            notes.append(f"dataset {ds} not found, freshness not verified")
    if changes:
        return RunStatus("stale", f"run {run!r} is stale: {'; '.join(changes)}; rebuild with: {cmd}", m)
    msg = f"run {run!r} is ready"
    if notes:
        msg += " (" + "; ".join(notes) + ")"
    return RunStatus("ready", msg, m)


def run_status(run: str, root: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
               dataset_dir: str | os.PathLike | None = None, verify: bool = False) -> RunStatus:
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


def rebuild_reasons(run: str, checkpoint_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None,
                    params: Mapping[str, Any] | None, root: str | os.PathLike | None = None) -> list[str]:
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


def needs_rebuild(run: str, checkpoint_dir: str | os.PathLike | None, data_dir: str | os.PathLike | None,
                  params: Mapping[str, Any] | None, root: str | os.PathLike | None = None) -> bool:
    """False when a ready run exists built from the same checkpoint hash, dataset hash and params
    (``code_version`` is ignored), so re-running the precompute with unchanged inputs does nothing."""
    return bool(rebuild_reasons(run, checkpoint_dir, data_dir, params, root))


# ------------------------------------------------------------------------------------- reading

def _is_listlike(v: Any) -> bool:
    return isinstance(v, (list, tuple, set, frozenset, np.ndarray, pd.Index, pd.Series))


class RunStore:
    """Read API over one published run (DuckDB over its Parquet files).

    The run directory is resolved once at construction, so every query reads one consistent version.
    Each table ``<name>.parquet`` is a view ``<name>`` on a private in-memory DuckDB connection; every
    query runs on its own cursor, so one RunStore can be shared between Streamlit sessions/threads.
    User values always travel as bound parameters; table and column names are checked against the
    Parquet schema (``ValueError`` otherwise).
    """

    def __init__(self, run: str, root: str | os.PathLike | None = None):
        self.run = _check_run(run)
        self.root = resolve_root(root)
        link = self.root / "runs" / run
        if not os.path.lexists(link):
            raise FileNotFoundError(f"run {run!r} not found under {link.parent}; build it with: "
                                    f"{rebuild_command(run)}")
        self._link = link
        self._link_target = os.readlink(link) if link.is_symlink() else None
        self.dir = Path(os.path.realpath(link))
        if not self.dir.is_dir():
            raise FileNotFoundError(f"run {run!r} points to a missing directory {self.dir}")
        self.manifest, _ = _read_manifest(self.dir)
        self._lock = threading.RLock()
        self._schemas: dict[str, pa.Schema] = {}
        self._cache: dict[tuple, Any] = {}
        self.tables: list[str] = sorted(p.stem for p in self.dir.glob("*.parquet") if _TABLE_RE.match(p.stem))
        self._con = duckdb.connect(":memory:")
        # GLOBAL: queries run on cursors (own sessions); a session-local SET would not reach them, and
        # without the cache every query re-parses routing.parquet's footer (~10x slower per example).
        self._con.execute("SET GLOBAL parquet_metadata_cache = true")
        self._views: set[str] = set()  # created on first use, so opening a store stays cheap

    def _ensure_views(self, names: Iterable[str]) -> None:
        with self._lock:
            for t in names:
                if t in self._views:
                    continue
                path = str(self.dir / f"{t}.parquet")
                self._con.execute(f"CREATE VIEW {_qi(t)} AS SELECT * FROM read_parquet({_sql_str(path)})")
                self._views.add(t)

    # -- housekeeping
    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({self.run!r}, dir={str(self.dir)!r})"

    def is_current(self) -> bool:
        """False once ``runs/<run>`` has been republished (or removed): reopen to see the new version."""
        try:
            if self._link_target is None:
                return self._link.is_dir() and not self._link.is_symlink()
            return os.readlink(self._link) == self._link_target
        except OSError:
            return False

    @property
    def status(self) -> RunStatus:
        """:class:`RunStatus` of the version this store reads (checked afresh on each access; cheap)."""
        return self.check_status()

    def check_status(self, checkpoint_dir=None, dataset_dir=None, verify: bool = False) -> RunStatus:
        """:class:`RunStatus` of this version against the given (or the recorded) checkpoint/dataset."""
        return _status_of_dir(self.run, self.dir, self.root, checkpoint_dir, dataset_dir, verify)

    def has(self, name: str) -> bool:
        return name in self.tables

    # -- schema checks
    def schema(self, name: str) -> pa.Schema:
        if name not in self.tables:
            raise ValueError(f"unknown table {name!r} in run {self.run!r}; available: {', '.join(self.tables)}")
        with self._lock:
            s = self._schemas.get(name)
            if s is None:
                s = self._schemas[name] = pq.read_schema(self.dir / f"{name}.parquet")
        return s

    def columns(self, name: str) -> list[str]:
        return list(self.schema(name).names)

    def _check_cols(self, name: str, cols: Iterable[str]) -> list[str]:
        known = set(self.columns(name))
        cols = [cols] if isinstance(cols, str) else list(cols)
        bad = [c for c in cols if not isinstance(c, str) or c not in known]
        if bad:
            raise ValueError(f"unknown column(s) {bad} for table {name!r}; columns: {', '.join(sorted(known))}")
        return cols

    def _where(self, name: str, where: Mapping[str, Any] | str | None, params: Sequence[Any] | None
               ) -> tuple[str, list]:
        if where is None or (isinstance(where, Mapping) and not where):
            if params:
                raise ValueError("params given without a where clause")
            return "", []
        if isinstance(where, str):
            # A code-authored fragment with ? placeholders; values travel in params.
            return f" WHERE ({where})", list(params or [])
        if params:
            raise ValueError("params only go with a string where clause; a dict carries its own values")
        self._check_cols(name, where.keys())
        parts, args = [], []
        for col, val in where.items():
            q = _qi(col)
            if val is None:
                parts.append(f"{q} IS NULL")
            elif _is_listlike(val):
                vals = [v.item() if isinstance(v, np.generic) else v for v in list(val)]
                if not vals:
                    parts.append("FALSE")
                else:
                    parts.append(f"{q} IN ({', '.join('?' * len(vals))})")
                    args.extend(vals)
            else:
                parts.append(f"{q} = ?")
                args.append(val.item() if isinstance(val, np.generic) else val)
        return " WHERE " + " AND ".join(parts), args

    def _order(self, name: str, order_by: str | Sequence[str] | None) -> str:
        if not order_by:
            return ""
        items = [order_by] if isinstance(order_by, str) else list(order_by)
        parts = []
        for it in items:
            desc = isinstance(it, str) and it.startswith("-")
            col = it[1:] if desc else it
            self._check_cols(name, [col])
            parts.append(_qi(col) + (" DESC" if desc else ""))
        return " ORDER BY " + ", ".join(parts)

    @staticmethod
    def _limit(limit: int | None) -> str:
        if limit is None:
            return ""
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, got {limit!r}")
        return f" LIMIT {int(limit)}"

    # -- generic queries
    def _run(self, sql: str, params: Sequence[Any] | None, *tables: str) -> pd.DataFrame:
        """Run generated SQL that reads ``tables`` (their views are created if needed)."""
        self._ensure_views(tables)
        with self._lock:
            cur = self._con.cursor()
        try:
            return cur.execute(sql, list(params or [])).df()
        finally:
            cur.close()

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Run a code-authored query over the run's tables (each is a view named like the table).
        Pass values through ``params`` (``?`` or ``$name`` placeholders), never by formatting them in."""
        self._ensure_views(self.tables)
        with self._lock:
            cur = self._con.cursor()
        try:
            return cur.execute(query, params if params is not None else []).df()
        finally:
            cur.close()

    def table(self, name: str, columns: Sequence[str] | None = None,
              where: Mapping[str, Any] | str | None = None, params: Sequence[Any] | None = None,
              order_by: str | Sequence[str] | None = None, limit: int | None = None) -> pd.DataFrame:
        """Read (part of) a table.

        ``where``: a dict ``{column: value}`` (``= value``; a list/tuple/set means ``IN``; ``None`` means
        ``IS NULL``; all ANDed), or a code-authored SQL fragment with ``?`` placeholders bound from
        ``params``. ``order_by``: column name(s), ``-name`` for descending.
        """
        self.schema(name)
        cols = "*" if columns is None else ", ".join(_qi(c) for c in self._check_cols(name, columns))
        w, args = self._where(name, where, params)
        sql = f"SELECT {cols} FROM {_qi(name)}{w}{self._order(name, order_by)}{self._limit(limit)}"
        return self._run(sql, args, name)

    def read_json(self, name: str) -> Any:
        """Parse ``<name>.json`` (``name`` may include the suffix)."""
        filename = name if name.endswith(".json") else f"{name}.json"
        return json.loads(self.path(filename).read_text())

    def path(self, name: str) -> Path:
        """Path of a file of this run version (e.g. ``projection_model.npz``); FileNotFoundError if absent."""
        p = self.dir / _check_file_name(name)
        if not p.is_file():
            raise FileNotFoundError(f"run {self.run!r} has no file {name!r}")
        return p

    # -- page queries
    def _cached(self, key: tuple, fn):
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        val = fn()
        with self._lock:
            self._cache[key] = val
        return val

    def example_routing(self, example_index: int, layer: str | Sequence[str] | None = None,
                        columns: Sequence[str] | None = None) -> pd.DataFrame:
        """All routed positions of one example (optionally one or more layers), sorted by layer, call,
        position. Cheap: routing.parquet is sorted by example_index, so few row groups are read."""
        where: dict[str, Any] = {"example_index": int(example_index)}
        if layer is not None:
            where["layer"] = layer
        order = [c for c in ("layer", "call", "position") if c in self.columns("routing")]
        return self.table("routing", columns=columns, where=where, order_by=order)

    def layer_loads(self, layer: str | Sequence[str] | None = None, by: Sequence[str] | str | None = None
                    ) -> pd.DataFrame:
        """Per (layer, [by...], expert): ``slots`` (count of top-k slots), ``weight`` (summed combine
        weight), ``slot_fraction`` and ``weight_fraction`` (shares within the layer [and by-group]).
        Every expert appears (dead ones with 0). ``by`` may name call / position_kind / routed_modality /
        gate_modality. Read from the precomputed ``routing_loads`` when present; cached per store."""
        by = [by] if isinstance(by, str) else list(by or [])
        layers = None if layer is None else ([layer] if isinstance(layer, str) else list(layer))
        key = ("layer_loads", None if layers is None else tuple(layers), tuple(by))
        df = self._cached(key, lambda: self._layer_loads(layers, by))
        return df.copy()

    def _layer_loads(self, layers: list[str] | None, by: list[str]) -> pd.DataFrame:
        bad = [b for b in by if b not in ROUTING_GROUPS or b == "layer"]
        if bad:
            raise ValueError(f"layer_loads can group by {[g for g in ROUTING_GROUPS if g != 'layer']}, not {bad}")
        keys = ["layer", *by]
        src = "routing_loads" if self.has("routing_loads") else "routing"
        if src == "routing_loads":
            self._check_cols("routing_loads", keys)
            w, args = self._where("routing_loads", {"layer": layers} if layers is not None else None, None)
            inner = (f"SELECT {', '.join(map(_qi, keys))}, expert, sum(slots) AS slots, sum(weight) AS weight "
                     f"FROM routing_loads{w} GROUP BY ALL")
        else:
            self._check_cols("routing", [*keys, "topk_ids", "combine"])
            w, args = self._where("routing", {"layer": layers} if layers is not None else None, None)
            k = ", ".join(map(_qi, keys))
            inner = f"""
                WITH r AS (SELECT {k}, topk_ids, combine FROM routing{w}),
                w AS (SELECT {k}, expert, sum(wt)::DOUBLE AS weight FROM (
                        SELECT {k}, unnest(range(len(combine)))::INTEGER AS expert, unnest(combine) AS wt
                        FROM r) GROUP BY ALL),
                s AS (SELECT {k}, expert, count(*)::BIGINT AS slots FROM (
                        SELECT {k}, unnest(topk_ids)::INTEGER AS expert FROM r) GROUP BY ALL)
                SELECT {", ".join(f"coalesce(w.{_qi(c)}, s.{_qi(c)}) AS {_qi(c)}" for c in keys)},
                       coalesce(w.expert, s.expert) AS expert,
                       coalesce(s.slots, 0) AS slots, coalesce(w.weight, 0.0) AS weight
                FROM w FULL OUTER JOIN s USING ({k}, expert)"""
        part = ", ".join(map(_qi, keys))
        sql = f"""
            SELECT {part}, expert, slots::BIGINT AS slots, weight::DOUBLE AS weight,
                   slots / nullif(sum(slots) OVER (PARTITION BY {part}), 0) AS slot_fraction,
                   weight / nullif(sum(weight) OVER (PARTITION BY {part}), 0) AS weight_fraction
            FROM ({inner}) ORDER BY {part}, expert"""
        return self._run(sql, args, src)

    def entropy_values(self, layer: str, sample: int | None = 20_000, seed: int = 0,
                       column: str = "entropy") -> np.ndarray:
        """Token entropies (or ``column="top1_prob"``) of one layer for a histogram: all of them when
        there are at most ``sample``, else a uniform reservoir sample (repeatable for a given seed).
        Served from ``routing_entropy_sample`` when it holds enough rows for the layer."""
        if column not in ("entropy", "top1_prob"):
            raise ValueError(f"column must be 'entropy' or 'top1_prob', got {column!r}")
        if sample is not None and (isinstance(sample, bool) or int(sample) <= 0):
            raise ValueError(f"sample must be a positive integer or None, got {sample!r}")
        key = ("entropy_values", layer, None if sample is None else int(sample), int(seed), column)
        return self._cached(key, lambda: self._entropy_values(layer, sample, int(seed), column)).copy()

    def _entropy_values(self, layer: str, sample: int | None, seed: int, column: str) -> np.ndarray:
        src = "routing"
        if sample is not None and self.has("routing_entropy_sample") \
                and column in self.columns("routing_entropy_sample"):
            n_stored, n_total = self._layer_sample_count(layer)
            if n_stored >= int(sample) or n_stored == n_total:
                src = "routing_entropy_sample"
        self._check_cols(src, ["layer", column])
        inner = f"SELECT {_qi(column)} AS v FROM {src} WHERE layer = ?"
        if sample is None:
            sql = inner
        else:
            sql = (f"SELECT v FROM ({inner}) USING SAMPLE reservoir({int(sample)} ROWS) "
                   f"REPEATABLE ({int(seed)})")
        df = self._run(sql, [layer], src)
        return df["v"].to_numpy(dtype=np.float32)

    def _layer_sample_count(self, layer: str) -> tuple[int, int]:
        """(rows stored in routing_entropy_sample for the layer, rows the layer has in routing)."""
        def counts():
            has_total = "layer_rows" in self.columns("routing_entropy_sample")
            total = "max(layer_rows)" if has_total else "-1"
            df = self._run(f"SELECT layer, count(*) AS n, {total} AS t FROM routing_entropy_sample GROUP BY layer",
                           None, "routing_entropy_sample")
            return {r.layer: (int(r.n), int(r.t)) for r in df.itertuples(index=False)}
        return self._cached(("sample_counts",), counts).get(layer, (0, -1))

    def examples(self, filters: Mapping[str, Any] | None = None, limit: int | None = None) -> pd.DataFrame:
        """Rows of ``examples`` matching ``filters`` ({column: value or list of values}), in example order
        (``example_index``, or ``index`` as the precompute names it)."""
        cols = self.columns("examples")
        order = next((c for c in ("example_index", "index") if c in cols), None)
        return self.table("examples", where=dict(filters) if filters else None, order_by=order, limit=limit)

    def predictions(self) -> pd.DataFrame:
        return self.table("predictions")

    def layer_metrics(self) -> pd.DataFrame:
        return self.table("layer_metrics")

    def dynamics(self) -> pd.DataFrame:
        return self.table("dynamics")

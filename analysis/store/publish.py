"""Publishing a run atomically: a private staging dir, a manifest written last, one symlink swap.

A :class:`RunWriter` writes every file into its private staging dir, writes ``manifest.json`` last,
fsyncs files and dirs, then, holding ``.locks/<run>.lock``: renames the staging dir to
``.versions/<run>-<stamp>-<id>`` (one ``rename(2)``), points a fresh temporary symlink at it and
``os.replace`` s that symlink over ``runs/<run>`` (the single atomic step readers can observe), fsyncs
``runs/``, and finally deletes the older versions of that run that no reader holds (and orphans of killed
publishers). A reader (:class:`~analysis.store.reader.RunStore`) holds a shared ``flock`` on its version's
``.readers`` file for as long as it is open (:func:`hold_version`), so a republish while a page renders
leaves the old version readable; it is deleted by the first publish after its last reader closed.
A hold has a maximum age, :data:`MAX_HOLD_SECONDS` (30 minutes) after the version was superseded (the
stamp of the next version published): past it the collector reclaims the version even though a hold is
on it, so a stuck reader, or a store left open in a cache, cannot keep an old version forever. It removes
the manifest first; a :class:`~analysis.store.reader.RunStore` on a reclaimed version checks for it
before every read and raises :class:`VersionReclaimed` (reopen the run) instead of reading a
half-deleted version or failing with a DuckDB I/O error.
:func:`precompute_lock` keeps two precomputes of one run apart.
A real directory at ``runs/<run>`` (older, non-atomic layout) is first moved into ``.versions``.
A writer killed at any point leaves either the old symlink (old run intact) or the new one (new run
complete); its staging dir is invisible to readers (hidden name) and is removed by the next writer,
which can tell a dead writer's leftovers from a live writer's work by trying the staging dir's
``flock`` (the kernel drops a killed process's locks).

Manifest: ``{"run", "status": "complete", "created" (UTC ISO 8601), "code_version", "store_format",
"files": {filename: {"rows": n | null, "bytes": b, "sha256": h}}, **manifest_base}`` (build
``manifest_base`` with :func:`analysis.store.status.inputs_manifest`; it carries the ``spec``).
When a run has a routing table, the writer adds its aggregates at commit (:mod:`analysis.store.aggregates`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from analysis.hashing import file_sha256
from analysis.store.aggregates import write_routing_aggregates
from analysis.store.layout import (
    _LOCKS,
    _RESERVED_KEYS,
    _STAGING,
    _VERSION_RE,
    _VERSIONS,
    MANIFEST,
    ROW_GROUP_SIZE,
    STORE_FORMAT,
    _cast_routing,
    _check_file_name,
    _check_run,
    _check_table_name,
    _fsync,
    _is_routing_table,
    _json_default,
    _rmtree,
    _sort_routing,
    _to_arrow,
    _utc_now,
    resolve_root,
)
from analysis.store.status import code_version


class _FileLock:
    """Exclusive ``flock`` on a path, held while the object is open; released by the kernel on death."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> _FileLock:
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

        with RunWriter("demo", manifest_base=inputs_manifest(ckpt, data, params, spec=adapter.spec())) as w:
            w.write_table("routing", routing_df)      # sorted + typed + aggregates added at commit
            w.write_table("examples", examples_df)
            w.write_json("projection_model", {...})
            w.write_bytes("projection_model.npz", raw)

    On a clean exit the manifest is written and the run published (see module docstring); on an
    exception the staging dir is discarded and the published run is left untouched.
    """

    def __init__(
        self,
        run: str,
        root: str | os.PathLike | None = None,
        manifest_base: Mapping[str, Any] | None = None,
        *,
        aggregate_routing: bool = True,
        row_group_size: int = ROW_GROUP_SIZE,
        compression: str = "zstd",
        before_publish: Callable[[], None] | None = None,
    ):
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
        self.before_publish = before_publish  # last check before anything is published (raise to refuse)
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

    def open(self) -> RunWriter:
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

    def __enter__(self) -> RunWriter:
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

    def has_file(self, filename: str) -> bool:
        """Whether ``filename`` was written (or claimed) in this run."""
        return filename in self._files

    def is_streaming(self, name: str) -> bool:
        """Whether table ``name`` is being streamed with :meth:`append_table` (not yet closed)."""
        return name in self._streams

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
        if self.before_publish is not None:
            self.before_publish()
        if self.aggregate_routing and "routing.parquet" in self._files and "routing_loads.parquet" not in self._files:
            write_routing_aggregates(self)
        files = {}
        for filename in sorted(self._files):
            p = d / filename
            if not p.is_file():
                raise RuntimeError(f"{filename} was claimed but never written")
            rows = pq.read_metadata(p).num_rows if filename.endswith(".parquet") else None
            files[filename] = {"rows": rows, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
            _fsync(p)
        manifest = {
            "run": self.run,
            "status": "complete",
            "created": _utc_now().isoformat(),
            "code_version": code_version(),
            "store_format": STORE_FORMAT,
            "files": files,
        }
        manifest.update(self.manifest_base)
        manifest.update(self._extra)
        (d / READERS).touch()  # readers flock it shared while they read this version (see hold_version)
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
            # The new version is live; drop the older ones no reader holds, and orphans of killed publishers.
            collect_versions(self.run, versions, keep=vid)
            for entry in runs.iterdir():
                if entry.name.startswith(f".{self.run}.link-") and entry.is_symlink():
                    entry.unlink(missing_ok=True)
        return target


def _new_version_id(run: str) -> str:
    stamp = _utc_now().strftime("%Y%m%dT%H%M%S%f") + "Z"
    return f"{run}-{stamp}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------ readers and versions

READERS = ".readers"  # in every version dir: readers hold a shared flock on it, the collector an exclusive one

# How long a reader may hold a superseded version: a page renders in seconds, so a hold this long after
# a newer version was published is a stuck reader or a leaked store, and the collector reclaims anyway.
MAX_HOLD_SECONDS = 30 * 60


class VersionReclaimed(FileNotFoundError):
    """The version a reader holds was reclaimed (held longer than :data:`MAX_HOLD_SECONDS` after it was
    superseded): reopen the run to read the current version. A ``FileNotFoundError``, so the pages show
    it as an expected failure (a message, no traceback)."""


def hold_version(version_dir: Path) -> int | None:
    """Take a shared hold on a published version so that no publisher deletes it while it is read; the
    returned fd is the hold (close it with :func:`release_version`). None when the version has no readers
    file (built before holds existed, or a plain directory) or was deleted meanwhile: then check that the
    directory still exists and resolve the run link again."""
    try:
        fd = os.open(Path(version_dir) / READERS, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a collector deletes this very version
    if not (Path(version_dir) / MANIFEST).is_file():  # it was collected between our open and our flock
        os.close(fd)
        return None
    return fd


def release_version(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _collect(entry: Path, reclaim: bool = False) -> bool:
    """Delete one superseded version unless a reader holds it (``reclaim``: even then); True when deleted."""
    try:
        fd = os.open(entry / READERS, os.O_RDONLY)
    except FileNotFoundError:
        _rmtree(entry)  # no readers file: a version of the older layout, or a half-deleted one
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not reclaim:
            os.close(fd)
            return False  # read right now: the next publish (or collect_versions) deletes it
    try:
        (entry / MANIFEST).unlink(missing_ok=True)  # first: a reader that opens or reads it now sees it gone
        _rmtree(entry)
    finally:
        os.close(fd)
    return True


def _stamp(name: str) -> _dt.datetime:
    m = _VERSION_RE.match(name)
    return _dt.datetime.strptime(m.group("stamp"), "%Y%m%dT%H%M%S%fZ").replace(tzinfo=_dt.UTC)


def superseded_at(name: str, names: list[str]) -> _dt.datetime | None:
    """When version ``name`` stopped being current: the stamp of the next version of its run among
    ``names`` (versions of one run, stamps taken under the publish lock). None for the newest. A version
    deleted in between only makes this later, so the hold's age is never overestimated."""
    later = sorted(s for s in map(_stamp, names) if s > _stamp(name))
    return later[0] if later else None


def collect_versions(
    run: str,
    versions: Path,
    keep: str | None = None,
    now: _dt.datetime | None = None,
    max_hold_s: float = MAX_HOLD_SECONDS,
) -> list[str]:
    """Delete the versions of ``run`` under ``versions`` other than ``keep`` that no reader holds, and
    those superseded more than ``max_hold_s`` before ``now`` even if held (see :data:`MAX_HOLD_SECONDS`);
    returns the names kept because a reader holds them."""
    held = []
    try:
        names = [e.name for e in versions.iterdir()]
    except FileNotFoundError:
        return held
    mine = [n for n in names if (m := _VERSION_RE.match(n)) and m.group("run") == run]
    now = now or _utc_now()
    for name in mine:
        if name == keep:
            continue
        since = superseded_at(name, mine)
        reclaim = since is not None and (now - since).total_seconds() > max_hold_s
        if not _collect(versions / name, reclaim=reclaim):
            held.append(name)
    return held


@contextlib.contextmanager
def precompute_lock(
    run: str, root: str | os.PathLike | None = None, wait: bool = False, on_wait=None
) -> Iterator[None]:
    """Hold ``runs/.locks/<run>.precompute.lock`` for a whole precompute of ``run``: a second precompute
    of the same run refuses (:class:`~mmoe_core.errors.BusyError` naming the holder) or, with ``wait``,
    waits for it (``on_wait(message)`` is told first). The kernel drops the lock of a killed process."""
    from mmoe_core.errors import BusyError

    path = resolve_root(root) / "runs" / _LOCKS / f"{_check_run(run)}.precompute.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            message = f"another precompute of run {run!r} is running (process {holder} holds {path})"
            if not wait:
                raise BusyError(f"{message}; wait for it to finish, or pass --wait to queue behind it") from None
            if on_wait is not None:
                on_wait(f"{message}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)

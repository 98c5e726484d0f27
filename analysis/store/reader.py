"""Reading a published run: :class:`RunStore`, DuckDB page queries over its Parquet files.

No Streamlit and no torch here. Readers resolve ``runs/<run>`` once (a :class:`RunStore` keeps the
resolved version dir), so a publish in the middle of a page render never mixes versions. An open store
holds its version (a shared flock, :func:`analysis.store.publish.hold_version`): a republish leaves it
readable until the store is closed (or garbage-collected), for at most
:data:`~analysis.store.publish.MAX_HOLD_SECONDS` after the republish: then the version may be reclaimed,
and every read of its files raises :class:`~analysis.store.publish.VersionReclaimed` (reopen the run).
A long-lived reader should still check :meth:`RunStore.is_current` (one ``readlink``) and reopen to see
the new version.
:meth:`RunStore.spec` is the model's declaration (:class:`mmoe_core.spec.ModelSpec`) as precompute stored it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.store.aggregates import known_experts, loads_sql
from analysis.store.layout import (
    _TABLE_RE,
    DENSE_COLUMNS,
    EXAMPLE_KEY,
    MANIFEST,
    ROUTING_GROUPS,
    ROUTING_SORT,
    _check_file_name,
    _check_run,
    _qi,
    _sql_str,
    combine_from_topk,
    dense_table_name,
    layout_manifest_key,
    rebuild_command,
    resolve_root,
)
from analysis.store.publish import MAX_HOLD_SECONDS, VersionReclaimed, hold_version, release_version
from analysis.store.status import RunStatus, _read_manifest, _status_of_dir, read_spec
from mmoe_core.spec import ModelSpec


def _is_listlike(v: Any) -> bool:
    return isinstance(v, (list, tuple, set, frozenset, np.ndarray, pd.Index, pd.Series))


def _open_version(link: Path, run: str) -> tuple[str | None, Path, int | None]:
    """(link target, version dir, hold) of ``runs/<run>``: the version it names, held against deletion
    (:func:`analysis.store.publish.hold_version`); one collected between the two steps is resolved again."""
    for _ in range(5):
        target = os.readlink(link) if link.is_symlink() else None
        version = Path(os.path.realpath(link))
        hold = hold_version(version)
        # Unheld: a plain run directory, or a version built before holds (it has a manifest); a version
        # dir without its manifest is being collected, so resolve the link again.
        if hold is not None or (version.is_dir() and (target is None or (version / MANIFEST).is_file())):
            return target, version, hold
    raise FileNotFoundError(f"run {run!r} points to a missing directory {version}")


# Every RunStore not yet closed (weakly: a store nobody holds is collected as usual). Streamlit's resource
# cache keeps stores until the process ends, so they are closed at exit, before the interpreter tears
# its modules down.
_OPEN_STORES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def close_open_stores() -> None:
    for store in list(_OPEN_STORES):
        store.close()


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
            raise FileNotFoundError(f"run {run!r} not found under {link.parent}; build it with: {rebuild_command(run)}")
        self._link = link
        for _ in range(5):
            self._link_target, self.dir, hold = _open_version(link, run)
            self.manifest, _ = _read_manifest(self.dir)
            self.tables: list[str] = sorted(p.stem for p in self.dir.glob("*.parquet") if _TABLE_RE.match(p.stem))
            # A reclaim deletes a held version too, manifest first: a held version whose manifest is still
            # there after its tables were listed was whole when listed; otherwise resolve the link again.
            if hold is None or (self.dir / MANIFEST).is_file():
                break
            release_version(hold)
        self._release = weakref.finalize(self, release_version, hold)  # the version stays while this is open
        # only a published version (a manifest, or a hold on one) can be reclaimed
        self._published = self.manifest is not None or hold is not None
        self._lock = threading.RLock()
        self._schemas: dict[str, pa.Schema] = {}
        self._row_groups: dict[str, tuple] = {}  # routing tables: footer + per-row-group key ranges
        self._cache: dict[tuple, Any] = {}
        self._con = duckdb.connect(":memory:")
        _OPEN_STORES.add(self)
        # GLOBAL: queries run on cursors (own sessions); a session-local SET would not reach them, and
        # without the cache every query re-parses routing.parquet's footer (~10x slower per example).
        self._con.execute("SET GLOBAL parquet_metadata_cache = true")
        self._views: set[str] = set()  # created on first use, so opening a store stays cheap
        self._spec: ModelSpec | None = None

    def reclaimed(self) -> bool:
        """True once this store's version was reclaimed under it (its manifest is gone: held longer than
        :data:`~analysis.store.publish.MAX_HOLD_SECONDS` after a republish); one ``stat``."""
        return self._published and not (self.dir / MANIFEST).is_file()

    def _reclaimed_error(self) -> VersionReclaimed:
        return VersionReclaimed(
            f"run {self.run!r} was republished and the version this page was reading ({self.dir.name}) was "
            f"reclaimed after being held more than {MAX_HOLD_SECONDS // 60} minutes; reload the page to "
            "read the current version"
        )

    @contextlib.contextmanager
    def _reading(self):
        """Around every read of the version's files: a reclaimed version raises
        :class:`~analysis.store.publish.VersionReclaimed` before the read, and a read that fails because
        the version was reclaimed meanwhile raises it too (not DuckDB's or pyarrow's I/O error). A read
        that succeeds read whole files: the collector unlinks files, an open one stays readable."""
        if self.reclaimed():
            raise self._reclaimed_error()
        try:
            yield
        except (duckdb.Error, OSError) as exc:
            if self.reclaimed():
                raise self._reclaimed_error() from exc
            raise

    def _open_connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise RuntimeError(f"{self!r} is closed")
        return self._con

    def _ensure_views(self, names: Iterable[str]) -> None:
        with self._lock:
            for t in names:
                if t in self._views:
                    continue
                path = str(self.dir / f"{t}.parquet")
                self._open_connection().execute(f"CREATE VIEW {_qi(t)} AS SELECT * FROM read_parquet({_sql_str(path)})")
                self._views.add(t)

    # -- housekeeping
    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                # dropped, not only closed: a DuckDB object alive at interpreter exit makes the binding
                # library print "nanobind: leaked ..." after the program's own last line
                self._con = None
            self._views.clear()
        _OPEN_STORES.discard(self)
        self._release()

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

    def spec(self) -> ModelSpec:
        """The model's declaration stored with this run (fields, inputs, routed layers and their gates,
        prediction, outputs, labels ...). ``ValueError`` with the rebuild command when the manifest has
        none (:meth:`check_status` then says ``stale``)."""
        with self._lock:
            if self._spec is None:
                try:
                    self._spec = read_spec(self.manifest)
                except ValueError as exc:
                    raise ValueError(f"run {self.run!r}: {exc}; rebuild with: {rebuild_command(self.run)}") from exc
            return self._spec

    # -- schema checks
    def schema(self, name: str) -> pa.Schema:
        if name not in self.tables:
            raise ValueError(f"unknown table {name!r} in run {self.run!r}; available: {', '.join(self.tables)}")
        with self._lock:
            s = self._schemas.get(name)
            if s is None:
                with self._reading():
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

    def _where(
        self, name: str, where: Mapping[str, Any] | str | None, params: Sequence[Any] | None
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
    def _run(self, sql: str, params: Sequence[Any] | None, *tables: str, arrow: bool = False) -> pd.DataFrame:
        """Run generated SQL that reads ``tables`` (their views are created if needed). ``arrow``: fetch
        through Arrow (same frame; 2-3x faster for many rows with list and string columns)."""
        with self._reading():
            self._ensure_views(tables)
            with self._lock:
                cur = self._open_connection().cursor()
            try:
                if arrow:
                    return cur.sql(sql, params=list(params or [])).to_arrow_table().to_pandas()
                return cur.execute(sql, list(params or [])).df()
            finally:
                cur.close()

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Run a code-authored query over the run's tables (each is a view named like the table).
        Pass values through ``params`` (``?`` or ``$name`` placeholders), never by formatting them in."""
        with self._reading():
            self._ensure_views(self.tables)
            with self._lock:
                cur = self._open_connection().cursor()
            try:
                return cur.execute(query, params if params is not None else []).df()
            finally:
                cur.close()

    def table(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        where: Mapping[str, Any] | str | None = None,
        params: Sequence[Any] | None = None,
        order_by: str | Sequence[str] | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Read (part of) a table.

        ``where``: a dict ``{column: value}`` (``= value``; a list/tuple/set means ``IN``; ``None`` means
        ``IS NULL``; all ANDed), or a code-authored SQL fragment with ``?`` placeholders bound from
        ``params``. ``order_by``: column name(s), ``-name`` for descending.
        """
        return self._table(name, columns, where, params, order_by, limit)

    def _table(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        where: Mapping[str, Any] | str | None = None,
        params: Sequence[Any] | None = None,
        order_by: str | Sequence[str] | None = None,
        limit: int | None = None,
        arrow: bool = False,
    ) -> pd.DataFrame:
        self.schema(name)
        cols = "*" if columns is None else ", ".join(_qi(c) for c in self._check_cols(name, columns))
        w, args = self._where(name, where, params)
        sql = f"SELECT {cols} FROM {_qi(name)}{w}{self._order(name, order_by)}{self._limit(limit)}"
        return self._run(sql, args, name, arrow=arrow)

    def read_json(self, name: str) -> Any:
        """Parse ``<name>.json`` (``name`` may include the suffix)."""
        filename = name if name.endswith(".json") else f"{name}.json"
        with self._reading():
            return json.loads(self.path(filename).read_text())

    def path(self, name: str) -> Path:
        """Path of a file of this run version (e.g. ``projection_model.npz``); FileNotFoundError if absent
        (:class:`~analysis.store.publish.VersionReclaimed` when the whole version was reclaimed)."""
        p = self.dir / _check_file_name(name)
        with self._reading():
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

    def routing_layout(self, name: str = "routing") -> str:
        """ "wide" (E-wide probs, logits, combine in the table) or "split" (they live in ``<name>_dense``,
        combine rebuilt from the top-k): the manifest's ``<name>_layout``, else read off the schema."""
        entry = self.manifest.get(layout_manifest_key(name))
        if isinstance(entry, Mapping) and entry.get("layout") in ("wide", "split"):
            return entry["layout"]
        return "wide" if "combine" in self.columns(name) or "topk_weights" not in self.columns(name) else "split"

    def num_experts(self, name: str = "routing") -> dict[str, int]:
        """{layer: E} as the run records it (the table's layout entry, else the declared routed layers)."""
        return known_experts(self.manifest, name)

    def example_routing(
        self,
        example_index: int,
        layer: str | Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        dense: bool = False,
    ) -> pd.DataFrame:
        """All routed positions of one example (optionally one or more layers), sorted by layer, call,
        position. Cheap: routing.parquet is sorted by (example_index, layer, call, position) and its row
        groups carry min/max statistics, so only the one or two row groups holding the example are read.

        In the "split" layout (more than 16 experts) the E-wide ``probs``, ``logits`` and ``combine`` are
        not part of the default columns: ask for them by name or with ``dense=True``; probs and logits are
        then read from ``routing_dense`` (float16, returned as float32) for the same rows, and combine is
        rebuilt from topk_ids / topk_weights (exact in that layout)."""
        self._row_group_index("routing")  # parses the footer once (schema included)
        main_cols = self.columns("routing")
        if self.routing_layout() == "wide":
            return self._example_rows("routing", example_index, layer, columns)
        wanted = list(main_cols) if columns is None else list(columns)
        extra = [c for c in DENSE_COLUMNS if c not in wanted] if dense else []
        wanted_dense = [c for c in wanted + extra if c in DENSE_COLUMNS]
        if not wanted_dense:
            return self._example_rows("routing", example_index, layer, columns)
        keys = [c for c in ROUTING_SORT if c in main_cols]
        need = list(
            dict.fromkeys(
                [c for c in wanted if c not in DENSE_COLUMNS]
                + keys
                + (["topk_ids", "topk_weights"] if "combine" in wanted_dense else [])
            )
        )
        frame = self._example_rows("routing", example_index, layer, need)
        side = dense_table_name("routing")
        from_side = [c for c in wanted_dense if c != "combine"]
        if from_side:
            if not self.has(side):
                raise ValueError(
                    f"run {self.run!r} keeps no dense routing ({side}): probs and logits were "
                    "not stored (split layout without the dense side table)"
                )
            self._check_cols(side, from_side)
            dense_df = self._example_rows(side, example_index, layer, [*keys, *from_side])
            if len(dense_df) == len(frame) and all((dense_df[k].to_numpy() == frame[k].to_numpy()).all() for k in keys):
                for c in from_side:
                    frame[c] = [np.asarray(v, dtype=np.float32) for v in dense_df[c]]
            else:  # not row-aligned (should not happen: same sort, same filter): join on the keys
                frame = frame.merge(dense_df, on=keys, how="left")
        if "combine" in wanted_dense:
            experts, combine = self.num_experts(), np.empty(len(frame), dtype=object)
            for name, idx in frame.groupby("layer", sort=False).indices.items():
                ids, wts = frame["topk_ids"].iloc[idx].tolist(), frame["topk_weights"].iloc[idx].tolist()
                rows = combine_from_topk(ids, wts, experts.get(name) or int(max(np.max(v) for v in ids)) + 1)
                for j, i in enumerate(idx):
                    combine[i] = rows[j]
            frame["combine"] = combine
        return frame[[c for c in wanted + extra if c in frame.columns]].reset_index(drop=True)

    def _row_group_index(self, name: str) -> tuple:
        """(footer, example_index min/max, layer min/max per row group) of a routing table, read once per
        store: one example's rows are found from these ranges (the file is sorted by example_index), not by
        a query engine walking every row group's statistics on each read (~45 us per row group in DuckDB:
        0.3 s per query at 10^8 positions)."""
        with self._lock:
            hit = self._row_groups.get(name)
            if hit is not None:
                return hit
            if name not in self.tables:
                raise ValueError(f"unknown table {name!r} in run {self.run!r}; available: {', '.join(self.tables)}")
            with self._reading():
                pf = pq.ParquetFile(self.dir / f"{name}.parquet")  # one footer parse serves the schema too
            md = pf.metadata
            self._schemas.setdefault(name, pf.schema_arrow)
            col = {md.schema.column(j).path: j for j in range(md.num_columns)}
            n = md.num_row_groups
            ex_lo = np.full(n, np.iinfo(np.int64).min, np.int64)
            ex_hi = np.full(n, np.iinfo(np.int64).max, np.int64)
            ly_lo: list[str | None] = [None] * n
            ly_hi: list[str | None] = [None] * n
            for i in range(n):
                rg = md.row_group(i)
                st = rg.column(col["example_index"]).statistics if "example_index" in col else None
                if st is not None and st.has_min_max:
                    ex_lo[i], ex_hi[i] = int(st.min), int(st.max)
                st = rg.column(col["layer"]).statistics if "layer" in col else None
                if st is not None and st.has_min_max:
                    ly_lo[i], ly_hi[i] = st.min, st.max
            hit = self._row_groups[name] = (md, ex_lo, ex_hi, ly_lo, ly_hi)
            return hit

    def _example_groups(self, name: str, example_index: int, layers: list[str] | None) -> list[int]:
        """Row groups of ``name`` that may hold rows of the example (and of one of ``layers``)."""
        _, ex_lo, ex_hi, ly_lo, ly_hi = self._row_group_index(name)
        ex = int(example_index)
        groups = np.flatnonzero((ex_lo <= ex) & (ex <= ex_hi)).tolist()
        if layers is not None:
            groups = [i for i in groups if ly_lo[i] is None or any(ly_lo[i] <= name_ <= ly_hi[i] for name_ in layers)]
        return groups

    def _example_rows(
        self, name: str, example_index: int, layer: str | Sequence[str] | None, columns: Sequence[str] | None
    ) -> pd.DataFrame:
        """Rows of one example (and layer(s)) of a routing table, sorted by layer, call, position: the row
        groups whose key ranges hold it, read directly (Arrow), then filtered."""
        md = self._row_group_index(name)[0]
        known = self.columns(name)
        cols = list(known) if columns is None else self._check_cols(name, columns)
        layers = None if layer is None else ([layer] if isinstance(layer, str) else [str(x) for x in layer])
        order = [c for c in ("layer", "call", "position") if c in known]
        need = list(dict.fromkeys([*cols, *[c for c in ("example_index", "layer") if c in known], *order]))
        groups = self._example_groups(name, example_index, layers)
        with self._reading():
            pf = pq.ParquetFile(self.dir / f"{name}.parquet", metadata=md)  # own reader: thread-safe, no re-parse
            try:
                empty = pf.schema_arrow.empty_table().select(need)
                table = pf.read_row_groups(groups, columns=need) if groups else empty
            finally:
                pf.close()
        mask = pc.equal(table["example_index"], pa.scalar(int(example_index), table.schema.field("example_index").type))
        if layers is not None:
            mask = pc.and_(mask, pc.is_in(table["layer"], value_set=pa.array(layers, table.schema.field("layer").type)))
        table = table.filter(mask)
        if order:
            table = table.sort_by([(c, "ascending") for c in order])
        return table.select(cols).to_pandas()

    def example_read_stats(
        self, example_index: int, layer: str | Sequence[str] | None = None, name: str = "routing"
    ) -> dict[str, int]:
        """What :meth:`example_routing` reads for one example: ``row_groups_read`` of ``row_groups_total``
        and their ``bytes_read`` (compressed, all columns)."""
        layers = None if layer is None else ([layer] if isinstance(layer, str) else list(layer))
        md = self._row_group_index(name)[0]
        groups = self._example_groups(name, example_index, layers)
        return {
            "row_groups_read": len(groups),
            "row_groups_total": md.num_row_groups,
            "bytes_read": int(
                sum(md.row_group(i).column(j).total_compressed_size for i in groups for j in range(md.num_columns))
            ),
        }

    def scan_stats(self, query: str, params: Sequence[Any] | None = None) -> dict[str, int]:
        """What a query reads (DuckDB's EXPLAIN ANALYZE profile): ``row_groups_scanned`` of
        ``row_groups_total``, ``rows_scanned`` and ``bytes_read``. For benchmarks and tests of the layout."""
        with self._reading():
            self._ensure_views(self.tables)
            with self._lock:
                cur = self._open_connection().cursor()
            try:
                cur.execute("SET enable_profiling = 'json'")
                cur.execute("SET profiling_coverage = 'ALL'")
                out = cur.execute("EXPLAIN ANALYZE " + query, list(params or [])).fetchall()
            finally:
                cur.close()
        prof = json.loads(out[0][1])
        q, io = prof.get("query", {}), prof.get("io", {})
        return {
            "row_groups_scanned": int(q.get("total_row_groups_scanned", -1)),
            "row_groups_total": int(q.get("total_row_groups_to_scan", -1)),
            "rows_scanned": int(q.get("total_rows_scanned", -1)),
            "bytes_read": int(io.get("total_bytes_read", -1)),
        }

    def coselection(self, layer: str | Sequence[str] | None = None) -> pd.DataFrame:
        """Per layer, E x E counts of experts chosen together for one position (``coselection``; written by
        precompute, or counted from the routing file at publish). Empty frame when the run has none."""
        if not self.has("coselection"):
            return pd.DataFrame(columns=["layer", "expert_a", "expert_b", "count"])
        order = [c for c in ("layer", "expert_a", "expert_b") if c in self.columns("coselection")]
        return self.table("coselection", where=None if layer is None else {"layer": layer}, order_by=order)

    def layer_loads(
        self, layer: str | Sequence[str] | None = None, by: Sequence[str] | str | None = None
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
            inner = (
                f"SELECT {', '.join(map(_qi, keys))}, expert, sum(slots) AS slots, sum(weight) AS weight "
                f"FROM routing_loads{w} GROUP BY ALL"
            )
        else:
            cols = self.columns("routing")
            weight_col = "combine" if "combine" in cols else "topk_weights"
            self._check_cols("routing", [*keys, "topk_ids", weight_col])
            w, args = self._where("routing", {"layer": layers} if layers is not None else None, None)
            k = ", ".join(map(_qi, keys))
            extra = [c for c in ("topk_weights", "combine") if c in cols]
            rel = f"(SELECT {k}, topk_ids, {', '.join(extra)} FROM routing{w})"
            inner = loads_sql(rel, keys, cols, self.num_experts())
            args = args * inner.count(rel)  # the filtered relation is read once per side of the join
        part = ", ".join(map(_qi, keys))
        sql = f"""
            SELECT {part}, expert, slots::BIGINT AS slots, weight::DOUBLE AS weight,
                   slots / nullif(sum(slots) OVER (PARTITION BY {part}), 0) AS slot_fraction,
                   weight / nullif(sum(weight) OVER (PARTITION BY {part}), 0) AS weight_fraction
            FROM ({inner}) ORDER BY {part}, expert"""
        return self._run(sql, args, src)

    def entropy_values(
        self, layer: str, sample: int | None = 20_000, seed: int = 0, column: str = "entropy"
    ) -> np.ndarray:
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
        if (
            sample is not None
            and self.has("routing_entropy_sample")
            and column in self.columns("routing_entropy_sample")
        ):
            n_stored, n_total = self._layer_sample_count(layer)
            if n_stored >= int(sample) or n_stored == n_total:
                src = "routing_entropy_sample"
        self._check_cols(src, ["layer", column])
        inner = f"SELECT {_qi(column)} AS v FROM {src} WHERE layer = ?"
        if sample is None:
            sql = inner
        else:
            sql = f"SELECT v FROM ({inner}) USING SAMPLE reservoir({int(sample)} ROWS) REPEATABLE ({int(seed)})"
        df = self._run(sql, [layer], src)
        return df["v"].to_numpy(dtype=np.float32)

    def _layer_sample_count(self, layer: str) -> tuple[int, int]:
        """(rows stored in routing_entropy_sample for the layer, rows the layer has in routing)."""

        def counts():
            has_total = "layer_rows" in self.columns("routing_entropy_sample")
            total = "max(layer_rows)" if has_total else "-1"
            df = self._run(
                f"SELECT layer, count(*) AS n, {total} AS t FROM routing_entropy_sample GROUP BY layer",
                None,
                "routing_entropy_sample",
            )
            return {r.layer: (int(r.n), int(r.t)) for r in df.itertuples(index=False)}

        return self._cached(("sample_counts",), counts).get(layer, (0, -1))

    def examples(self, filters: Mapping[str, Any] | None = None, limit: int | None = None) -> pd.DataFrame:
        """Rows of ``examples`` matching ``filters`` ({column: value or list of values}), in
        ``example_index`` order."""
        order = EXAMPLE_KEY if EXAMPLE_KEY in self.columns("examples") else None
        return self.table("examples", where=dict(filters) if filters else None, order_by=order, limit=limit)

    def predictions(self) -> pd.DataFrame:
        return self.table("predictions")

    def layer_metrics(self) -> pd.DataFrame:
        return self.table("layer_metrics")

    def dynamics(self) -> pd.DataFrame:
        return self.table("dynamics")

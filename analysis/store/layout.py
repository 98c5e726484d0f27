"""Layout and names of the artifact store: where runs live, what may be called what, and how tables are typed.

::

    <artifacts_root>/runs/
        <run>            -> symlink to .versions/<run>-<stamp>-<id>   (what readers open)
        .versions/<run>-<stamp>-<id>/   manifest.json, <table>.parquet, other small files
        .staging/<run>-<uuid>/          a writer's private work dir (+ <run>-<uuid>.lock, flock'ed)
        .locks/<run>.lock               serialises publishes of one run

Every table of a run keys its rows by ``example_index`` (the example's row in its split) where it has
per-example rows: examples, predictions, routing, attributions, declared outputs, projection.
``routing`` (and ``<x>_routing``, e.g. ``kb_routing``) is cast to :data:`ROUTING_TYPES` and sorted by
:data:`ROUTING_SORT` on write, in one of two layouts (:data:`LAYOUTS`; :func:`split_routing`): "wide"
(everything in ``routing.parquet``) up to :data:`DENSE_INLINE_MAX_EXPERTS` experts, "split" above (the
per-position columns in ``routing.parquet``, the E-wide probs and logits in float16 in
``routing_dense.parquet``), written by :mod:`analysis.store.sink`.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MANIFEST = "manifest.json"
# 2: manifest carries the model's declaration ("spec"); every table keys examples by example_index;
# routing rows carry the gate's probs and image-grid cells.
STORE_FORMAT = 2
ROW_GROUP_SIZE = 65_536
EXAMPLE_KEY = "example_index"
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
    "layer": pa.string(),
    "call": pa.string(),
    "example_index": pa.int64(),
    "example_id": pa.string(),
    "position": pa.int32(),
    "position_kind": pa.string(),
    "token": pa.string(),
    "routed_modality": pa.string(),
    "gate_modality": pa.string(),
    "grid_row": pa.int16(),
    "grid_col": pa.int16(),
    "top1": pa.int16(),
    "topk_ids": pa.list_(pa.int16()),
    "topk_weights": pa.list_(pa.float32()),
    "combine": pa.list_(pa.float32()),
    "probs": pa.list_(pa.float32()),
    "logits": pa.list_(pa.float32()),
    "entropy": pa.float32(),
    "top1_prob": pa.float32(),
    "routed": pa.bool_(),
}


# Routing layouts (recorded per table in the manifest as ``<name>_layout``; see :func:`split_routing`):
# * "wide": every column of ROUTING_TYPES in <name>.parquet (the E-wide probs, logits and combine inline):
#   runs with at most DENSE_INLINE_MAX_EXPERTS experts per layer, i.e. every demo run;
# * "split": <name>.parquet keeps what the pages read per position (metadata, top-k ids and weights,
#   entropy, top-1 probability, routed) and <name>_dense.parquet the E-wide probs and logits as float16,
#   keyed and sorted like <name>; combine is not stored, being scatter(topk_ids, topk_weights) (checked on
#   write: a gate that weights experts outside its top-k needs the wide layout).
DENSE_INLINE_MAX_EXPERTS = 16
DENSE_COLUMNS = ("combine", "probs", "logits")
DENSE_TYPES: dict[str, pa.DataType] = {"probs": pa.list_(pa.float16()), "logits": pa.list_(pa.float16())}
DENSE_SUFFIX = "_dense"
LAYOUTS = ("wide", "split")
# Row groups of the split layout: one example of a large model (48 layers x 512 positions = 24,576 rows)
# spans 2-3 groups of the main table and one (example, layer) sits in one group of either file, while the
# footer of a 10^8-row file stays ~10 MB (parsed once per reader). The wide layout keeps ROW_GROUP_SIZE.
SPLIT_ROW_GROUP_SIZE = 16_384
DENSE_ROW_GROUP_SIZE = 8_192


def rebuild_command(run: str) -> str:
    return f"python -m analysis.precompute --run {run}"


# ----------------------------------------------------------------------------------------- paths


def _default_root() -> Path:
    env = os.environ.get("MOESCOPE_ARTIFACTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "artifacts"


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
        raise ValueError(
            f"invalid run name {run!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
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
    return _dt.datetime.now(_dt.UTC)


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


def _sql_str(s: str) -> str:
    """A SQL string literal (for paths the store itself builds; user values are bound parameters)."""
    return "'" + s.replace("'", "''") + "'"


def _qi(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


# ------------------------------------------------------------------------------ routing layouts


def dense_table_name(name: str) -> str:
    """The side table of a split routing table: ``routing`` -> ``routing_dense``."""
    return name + DENSE_SUFFIX


def layout_manifest_key(name: str) -> str:
    """Manifest key recording a routing table's layout: ``routing`` -> ``routing_layout``."""
    return name + "_layout"


def _chunks(col: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return list(col.chunks) if isinstance(col, pa.ChunkedArray) else [col]


def _list_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(per-row lengths, flat values of the rows in order) of one list array chunk, without copying
    when the rows are contiguous (a sliced array's values start at its first offset)."""
    offsets = arr.offsets.to_numpy()
    values = arr.values
    flat = values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_numpy(zero_copy_only=False)
    return np.diff(offsets), flat


def list_matrix(col: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """A list column whose rows all have the same length w as an [n, w] numpy array (None if ragged)."""
    mats = []
    for arr in _chunks(col):
        if arr.null_count:
            return None
        lengths, flat = _list_parts(arr)
        if len(lengths) == 0:
            continue
        if (lengths != lengths[0]).any():
            return None
        mats.append(flat.reshape(len(lengths), int(lengths[0])))
    if not mats:
        return np.zeros((0, 0))
    if len({m.shape[1] for m in mats}) > 1:
        return None
    return mats[0] if len(mats) == 1 else np.concatenate(mats)


def _list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.concatenate([np.diff(a.offsets.to_numpy()) for a in _chunks(col)] or [np.zeros(0, np.int32)])


def _codes(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list]:
    """(integer code per row, the distinct values) of a (possibly dictionary-encoded) column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    enc = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()


def experts_per_layer(table: pa.Table) -> dict[str, int]:
    """{layer: E} from the width of the E-wide lists (probs, else combine, else logits) of a routing table."""
    col = next((c for c in ("probs", "combine", "logits") if c in table.column_names), None)
    if col is None or "layer" not in table.column_names or table.num_rows == 0:
        return {}
    lengths = _list_lengths(table[col])
    codes, names = _codes(table["layer"])
    widest = np.zeros(len(names), dtype=np.int64)
    np.maximum.at(widest, codes, lengths)
    present = np.bincount(codes, minlength=len(names)) > 0
    return {str(names[i]): int(widest[i]) for i in range(len(names)) if present[i]}


def choose_layout(experts: Mapping[str, int] | int) -> str:
    """ "split" when some layer has more than :data:`DENSE_INLINE_MAX_EXPERTS` experts, else "wide"."""
    widest = experts if isinstance(experts, int) else max(experts.values(), default=0)
    return "split" if widest > DENSE_INLINE_MAX_EXPERTS else "wide"


_NOT_TOPK = (
    "this routing table gives combine weight outside the chosen top-k experts (or its topk_weights "
    "differ from combine): it cannot drop the combine column; write it in the 'wide' layout"
)


def check_combine_is_topk(table: pa.Table, atol: float = 1e-5) -> None:
    """``ValueError`` unless every row's combine weights are exactly its top-k ids' topk_weights (no weight
    on other experts), the condition for storing a routing table without its combine column."""
    if "combine" not in table.column_names or table.num_rows == 0:
        return
    comb, ids, wts = (list_matrix(table[c]) for c in ("combine", "topk_ids", "topk_weights"))
    if comb is not None and ids is not None and wts is not None:  # the usual case: fixed E and k
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= comb.shape[1]):
            raise ValueError(_NOT_TOPK)
        at_topk = np.take_along_axis(comb, ids, axis=1)
        total = comb.sum(axis=1, dtype=np.float64)
        if (np.abs(at_topk - wts) > atol).any() or (
            np.abs(total - wts.sum(axis=1, dtype=np.float64)) > atol * max(1, ids.shape[1])
        ).any():
            raise ValueError(_NOT_TOPK)
        return
    for row in table.select(["combine", "topk_ids", "topk_weights"]).to_pylist():  # ragged lists: row by row
        c, k, w = (np.asarray(row[x], dtype=np.float64) for x in ("combine", "topk_ids", "topk_weights"))
        k = k.astype(np.int64)
        if (
            (k < 0).any()
            or (k >= len(c)).any()
            or np.abs(c[k] - w).max(initial=0) > atol
            or abs(c.sum() - w.sum()) > atol * max(1, len(k))
        ):
            raise ValueError(_NOT_TOPK)


def _half(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A list<float32> column as list<float16> (numpy's rounding; contiguous rows, no nulls), else a cast."""
    out = []
    for arr in _chunks(col):
        if arr.null_count:
            return col.cast(pa.list_(pa.float16()))
        lengths, flat = _list_parts(arr)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        out.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.float16), pa.float16())))
    return pa.chunked_array(out, pa.list_(pa.float16()))


def split_routing(table: pa.Table, check: bool = True) -> tuple[pa.Table, pa.Table]:
    """A typed, sorted routing table -> (its "split" main table, its dense side table).

    Main: every column but probs, logits and combine. Dense: the sort keys present
    (example_index, layer, call, position) and probs / logits as lists of float16, in the same row order.
    ``check``: verify that combine is scatter(topk_ids, topk_weights) (:func:`check_combine_is_topk`).
    """
    if check:
        check_combine_is_topk(table)
    main = table.drop_columns([c for c in DENSE_COLUMNS if c in table.column_names])
    keys = [c for c in ROUTING_SORT if c in table.column_names]
    dense_cols = {c: table[c] for c in keys}
    for c in DENSE_TYPES:
        if c in table.column_names:
            dense_cols[c] = _half(table[c])
    return main, pa.table(dense_cols)


def sort_routing_if_needed(table: pa.Table) -> pa.Table:
    """:func:`_sort_routing`, skipping the copy when the rows are already in order (chunks built in
    (example_index, layer, call, position) order usually are)."""
    keys = [(c, "ascending") for c in ROUTING_SORT if c in table.column_names]
    if not keys or table.num_rows < 2:
        return table
    order = pc.sort_indices(table.select([c for c, _ in keys]), sort_keys=keys).to_numpy()
    if (order == np.arange(len(order))).all():
        return table
    return table.take(order)


def combine_from_topk(topk_ids: Any, topk_weights: Any, num_experts: int) -> np.ndarray:
    """[n, E] combine weights rebuilt from per-row top-k ids and weights (exact in the split layout)."""
    ids = np.stack([np.asarray(v, dtype=np.int64) for v in topk_ids]) if len(topk_ids) else np.zeros((0, 0), int)
    w = np.stack([np.asarray(v, dtype=np.float32) for v in topk_weights]) if len(topk_weights) else ids.astype(float)
    out = np.zeros((len(ids), int(num_experts)), dtype=np.float32)
    if len(ids):
        np.put_along_axis(out, ids, w.astype(np.float32), axis=1)
    return out

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
:data:`ROUTING_SORT` on write.
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
    "layer": pa.string(), "call": pa.string(), "example_index": pa.int64(), "example_id": pa.string(),
    "position": pa.int32(), "position_kind": pa.string(), "token": pa.string(),
    "routed_modality": pa.string(), "gate_modality": pa.string(), "grid_row": pa.int16(),
    "grid_col": pa.int16(), "top1": pa.int16(), "topk_ids": pa.list_(pa.int16()),
    "topk_weights": pa.list_(pa.float32()), "combine": pa.list_(pa.float32()), "probs": pa.list_(pa.float32()),
    "logits": pa.list_(pa.float32()), "entropy": pa.float32(), "top1_prob": pa.float32(), "routed": pa.bool_(),
}


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

"""Writing a routing table in the layout its experts call for (:data:`~analysis.store.layout.LAYOUTS`).

``RunWriter.write_table("routing", ...)`` always writes the "wide" layout. For models with many experts
(a 48-layer, 128-expert model over a few hundred thousand tokens is 10^8 routed positions, whose E-wide
float32 arrays alone would be ~150 GB) use :func:`write_routing` (a table in memory) or
:class:`RoutingSink` (streamed in chunks, in increasing ``example_index`` order)::

    with RunWriter(run, manifest_base=...) as w:
        with RoutingSink(w) as sink:            # layout "auto": split above 16 experts
            for chunk in chunks:                # DataFrame / Arrow chunks in the routing schema
                sink.append(chunk)

The split layout's two files are written by the sink itself (``RunWriter.file_path``), with row groups of
:data:`~analysis.store.layout.SPLIT_ROW_GROUP_SIZE` / :data:`~analysis.store.layout.DENSE_ROW_GROUP_SIZE`,
dictionary encoding for the strings only and byte-stream-split floats; close the sink (``with``) before the
writer commits. The layout is recorded in the manifest as ``<name>_layout`` = {"layout",
"experts": {layer: E}, "dense": "<name>_dense" or null, "dense_dtype"}; the reader and the aggregates take it
from there.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from analysis.store.layout import (
    DENSE_ROW_GROUP_SIZE,
    DENSE_TYPES,
    LAYOUTS,
    SPLIT_ROW_GROUP_SIZE,
    _cast_routing,
    _to_arrow,
    choose_layout,
    dense_table_name,
    experts_per_layer,
    layout_manifest_key,
    sort_routing_if_needed,
    split_routing,
)


def _leaf(field: pa.Field) -> str:
    return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name


def _parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Dictionary-encode the string columns only (a float column's dictionary never pays off at this
    size) and byte-stream-split the float32/float64 ones (zstd then finds their exponent bytes; DuckDB
    reads that encoding for FLOAT and DOUBLE, not for float16)."""

    def value_type(f: pa.Field) -> pa.DataType:
        return f.type.value_type if pa.types.is_list(f.type) else f.type

    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_dictionary(f.type)]
    floats = [_leaf(f) for f in schema if value_type(f) in (pa.float32(), pa.float64())]
    return {"use_dictionary": strings, "use_byte_stream_split": floats or False}


class _Stream:
    """One Parquet file written in full row groups of ``row_group_size`` as chunks arrive."""

    def __init__(self, path, row_group_size: int, compression_level: int | None = None):
        self.path, self.row_group_size, self.level = path, int(row_group_size), compression_level
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.buf: list[pa.Table] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(
                self.path,
                self.schema,
                compression="zstd",
                compression_level=self.level,
                **_parquet_options(self.schema),
            )
        elif not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        self.buf.append(table)
        self.rows += table.num_rows
        if self.rows >= self.row_group_size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buf:
            return
        table = pa.concat_tables(self.buf)
        n = table.num_rows if final else (table.num_rows // self.row_group_size) * self.row_group_size
        if n:
            self.writer.write_table(table.slice(0, n), row_group_size=self.row_group_size)
        rest = table.slice(n)
        self.buf, self.rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self, schema: pa.Schema | None = None) -> None:
        if self.writer is None:  # nothing appended: an empty file of the given schema
            pq.write_table(pa.Table.from_batches([], schema=schema or pa.schema([])), self.path)
            return
        self._flush(final=True)
        self.writer.close()

    def discard(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass


class RoutingSink:
    """Stream one routing table (``routing`` or ``<x>_routing``) into an open :class:`RunWriter`.

    ``layout``: "auto" (split when a layer has more than 16 experts, decided on the first chunk), "wide"
    or "split". ``dense``: in the split layout, also write the E-wide probs and logits (float16) to
    ``<name>_dense``; False keeps only the main table (top-k ids and weights, entropy, top-1 probability).
    ``check``: verify per chunk that combine is scatter(topk_ids, topk_weights) before dropping it.
    Each chunk is typed and sorted; append chunks in increasing ``example_index`` order.
    """

    def __init__(
        self,
        writer,
        name: str = "routing",
        layout: str = "auto",
        dense: bool = True,
        check: bool = True,
        row_group_size: int = SPLIT_ROW_GROUP_SIZE,
        dense_row_group_size: int = DENSE_ROW_GROUP_SIZE,
    ):
        if layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be 'auto', 'wide' or 'split', got {layout!r}")
        if not (name == "routing" or name.endswith("_routing")):
            raise ValueError(f"a routing table is named 'routing' or '<x>_routing', got {name!r}")
        self.writer, self.name = writer, name
        self.layout: str | None = None if layout == "auto" else layout
        self.dense, self.check = bool(dense), bool(check)
        self.row_group_size, self.dense_row_group_size = int(row_group_size), int(dense_row_group_size)
        self.experts: dict[str, int] = {}
        self.rows = 0
        self._main: _Stream | None = None
        self._side: _Stream | None = None
        self._last_example: int | None = None
        self._closed = False

    def append(self, chunk: Any) -> int:
        """Add a chunk of routed positions; returns its row count."""
        if self._closed:
            raise RuntimeError(f"RoutingSink({self.name!r}) is closed")
        table = sort_routing_if_needed(_cast_routing(_to_arrow(chunk)))
        if table.num_rows == 0:
            return 0
        for layer, e in experts_per_layer(table).items():
            self.experts[layer] = max(e, self.experts.get(layer, 0))
        if self.layout is None:
            self.layout = choose_layout(self.experts)
        if self.layout == "wide":
            self.writer.append_table(self.name, table)
        else:
            self._append_split(table)
        self.rows += table.num_rows
        self._record()
        return table.num_rows

    def _append_split(self, table: pa.Table) -> None:
        if "example_index" in table.column_names:
            first, last = table["example_index"][0].as_py(), table["example_index"][-1].as_py()
            if self._last_example is not None and first < self._last_example:
                raise ValueError(
                    f"{self.name}: chunks must come in increasing example_index order "
                    f"(got {first} after {self._last_example}): one example must stay a small read"
                )
            self._last_example = last
        main, dense = split_routing(table, check=self.check)
        if self._main is None:
            self._main = _Stream(self.writer.file_path(f"{self.name}.parquet"), self.row_group_size)
            if self.dense and any(c in dense.column_names for c in DENSE_TYPES):
                self._side = _Stream(
                    self.writer.file_path(f"{dense_table_name(self.name)}.parquet"),
                    self.dense_row_group_size,
                    compression_level=1,
                )
        self._main.write(main)
        if self._side is not None:
            self._side.write(dense)

    def _record(self) -> None:
        dense = dense_table_name(self.name) if self.layout == "split" and self._side is not None else None
        self.writer.update_manifest(
            **{
                layout_manifest_key(self.name): {
                    "layout": self.layout,
                    "experts": dict(sorted(self.experts.items())),
                    "dense": dense,
                    "dense_dtype": "float16" if dense else None,
                }
            }
        )

    def close(self) -> int:
        """Finish the table(s); returns the rows written. (A wide table would also be finished by the
        writer's commit; the split layout's files must be closed here.)"""
        if self._closed:
            return self.rows
        self._closed = True
        if self.writer.is_streaming(self.name):
            self.writer.close_table(self.name)
        for stream in (self._main, self._side):
            if stream is not None:
                stream.close()
        return self.rows

    def discard(self) -> None:
        """Drop open file handles after an error (the writer's abort removes the files)."""
        self._closed = True
        for stream in (self._main, self._side):
            if stream is not None:
                stream.discard()

    def __enter__(self) -> RoutingSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False


def write_routing(
    writer, data: Any, name: str = "routing", layout: str = "auto", dense: bool = True, **split_options: Any
) -> int:
    """Write a whole routing table (sorted, typed) in the chosen layout; returns its row count.
    The "wide" layout is exactly ``writer.write_table(name, data)``; ``split_options`` go to
    :class:`RoutingSink` (``check``, ``row_group_size``, ``dense_row_group_size``)."""
    table = _to_arrow(data)
    experts = experts_per_layer(table)
    if layout == "wide" or (layout == "auto" and choose_layout(experts) == "wide"):
        n = writer.write_table(name, table)
        writer.update_manifest(
            **{
                layout_manifest_key(name): {
                    "layout": "wide",
                    "experts": dict(sorted(experts.items())),
                    "dense": None,
                    "dense_dtype": None,
                }
            }
        )
        return n
    with RoutingSink(writer, name, layout="split", dense=dense, **split_options) as sink:
        sink.append(table)
    return sink.rows


__all__ = ["RoutingSink", "write_routing"]

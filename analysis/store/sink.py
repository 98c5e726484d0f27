"""Writing a routing table in the layout its experts call for (:data:`~analysis.store.layout.LAYOUTS`).

``RunWriter.write_table("routing", ...)`` always writes the "wide" layout. For models with many experts
(a 48-layer, 128-expert model over a few hundred thousand tokens is 10^8 routed positions, whose E-wide
float32 arrays alone would be ~150 GB) use :func:`write_routing` (a table in memory) or
:class:`RoutingSink` (streamed in chunks, in increasing ``example_index`` order)::

    with RunWriter(run, manifest_base=...) as w:
        with RoutingSink(w) as sink:            # layout "auto": split above 16 experts
            for chunk in chunks:                # DataFrame / Arrow chunks in the routing schema
                sink.append(chunk)

The layout is recorded in the manifest as ``<name>_layout`` = {"layout", "experts": {layer: E},
"dense": "<name>_dense" or null}; the reader and the aggregates take it from there.
"""
from __future__ import annotations

from typing import Any

from analysis.store.layout import (
    DENSE_TYPES,
    LAYOUTS,
    _cast_routing,
    _sort_routing,
    _to_arrow,
    choose_layout,
    dense_table_name,
    experts_per_layer,
    layout_manifest_key,
    split_routing,
)


class RoutingSink:
    """Stream one routing table (``routing`` or ``<x>_routing``) into an open :class:`RunWriter`.

    ``layout``: "auto" (split when a layer has more than 16 experts, decided on the first chunk), "wide"
    or "split". ``dense``: in the split layout, also write the E-wide probs and logits (float16) to
    ``<name>_dense``; False keeps only the main table (top-k ids and weights, entropy, top-1 probability).
    ``check``: verify per chunk that combine is scatter(topk_ids, topk_weights) before dropping it.
    Each chunk is typed and sorted; append chunks in increasing ``example_index`` order.
    """

    def __init__(self, writer, name: str = "routing", layout: str = "auto", dense: bool = True,
                 check: bool = True):
        if layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout must be 'auto', 'wide' or 'split', got {layout!r}")
        if not (name == "routing" or name.endswith("_routing")):
            raise ValueError(f"a routing table is named 'routing' or '<x>_routing', got {name!r}")
        self.writer, self.name, self.requested = writer, name, layout
        self.layout: str | None = None if layout == "auto" else layout
        self.dense, self.check = bool(dense), bool(check)
        self.experts: dict[str, int] = {}
        self.rows = 0
        self._closed = False

    def append(self, chunk: Any) -> int:
        """Add a chunk of routed positions; returns its row count."""
        if self._closed:
            raise RuntimeError(f"RoutingSink({self.name!r}) is closed")
        table = _sort_routing(_cast_routing(_to_arrow(chunk)))
        if table.num_rows == 0 and self.rows:
            return 0
        seen = experts_per_layer(table)
        for layer, e in seen.items():
            self.experts[layer] = max(e, self.experts.get(layer, 0))
        if self.layout is None:
            self.layout = choose_layout(self.experts)
        if self.layout == "wide":
            self.writer.append_table(self.name, table)
        else:
            main, dense = split_routing(table, check=self.check)
            self.writer.append_table(self.name, main)
            if self.dense and any(c in dense.column_names for c in DENSE_TYPES):
                self.writer.append_table(dense_table_name(self.name), dense)
        self.rows += table.num_rows
        self._record()
        return table.num_rows

    def _record(self) -> None:
        dense = dense_table_name(self.name) if self.layout == "split" and self.dense else None
        self.writer.update_manifest(**{layout_manifest_key(self.name): {
            "layout": self.layout, "experts": dict(sorted(self.experts.items())), "dense": dense,
            "dense_dtype": "float16" if dense else None}})

    def close(self) -> int:
        """Finish the table(s) (RunWriter's commit would too); returns the rows written."""
        if self._closed:
            return self.rows
        self._closed = True
        if self.writer.is_streaming(self.name):
            self.writer.close_table(self.name)
        dname = dense_table_name(self.name)
        if self.writer.is_streaming(dname):
            self.writer.close_table(dname)
        return self.rows

    def __enter__(self) -> RoutingSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        return False


def write_routing(writer, data: Any, name: str = "routing", layout: str = "auto", dense: bool = True) -> int:
    """Write a whole routing table (sorted, typed) in the chosen layout; returns its row count.
    The "wide" layout is exactly ``writer.write_table(name, data)``."""
    table = _to_arrow(data)
    if layout == "wide" or (layout == "auto" and choose_layout(experts_per_layer(table)) == "wide"):
        n = writer.write_table(name, table)
        writer.update_manifest(**{layout_manifest_key(name): {
            "layout": "wide", "experts": experts_per_layer(table), "dense": None, "dense_dtype": None}})
        return n
    with RoutingSink(writer, name, layout="split", dense=dense) as sink:
        sink.append(table)
    return sink.rows


__all__ = ["RoutingSink", "write_routing"]

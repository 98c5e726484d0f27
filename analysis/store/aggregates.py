"""Precomputed routing aggregates (OLMoE's lesson: count once, store the counts, plot from the store).

``routing.parquet`` is written sorted by (example_index, layer, call, position) in row groups (64k rows in
the wide layout, 16k in the split one), so a per-example filter touches one to three of them (DuckDB
prunes the others on their min/max statistics). When a run has a routing table, the
:class:`~analysis.store.publish.RunWriter` also writes two small aggregates computed by DuckDB from the
staged file:

* ``routing_loads``: per layer, call, position_kind, routed_modality, gate_modality and expert, the
  top-k slot count and the summed combine weight; every expert 0..E-1 is present, dead ones with zeros;
* ``routing_entropy_sample``: a deterministic uniform sample of up to :data:`ENTROPY_SAMPLE_PER_LAYER`
  positions per layer with entropy / top1_prob and position metadata.

* ``coselection`` (unless the caller wrote one): per layer, the E x E counts of experts chosen together
  for one position (diagonal: times chosen), the table :func:`analysis.indicator_tables.coselection_frame`
  builds in memory, here counted in one streamed pass over the file's row groups.

In the "split" layout (:func:`analysis.store.layout.split_routing`, more than 16 experts) there is no
combine column: the combine weight of a slot is its ``topk_weights`` entry, and the layer's expert count
comes from the manifest's ``routing_layout`` (so dead experts still get their zero rows).

The reader uses them when present and falls back to the full routing table otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.store.layout import ROUTING_GROUPS, _qi, _sql_str, layout_manifest_key

ENTROPY_SAMPLE_PER_LAYER = 50_000


def write_routing_with_aggregates(writer, routing: Any) -> int:
    """Write ``routing`` (sorted, typed) plus its aggregates; returns the routing row count.
    (``RunWriter`` adds the aggregates at commit anyway; this makes it explicit.)"""
    n = writer.write_table("routing", routing)
    write_routing_aggregates(writer)
    return n


def _fetch_arrow(result) -> pa.Table:
    """Arrow table of a DuckDB relation across DuckDB versions (``to_arrow_table`` in 1.4+/2.x)."""
    for attr in ("to_arrow_table", "fetch_arrow_table", "arrow"):
        fn = getattr(result, attr, None)
        if fn is not None:
            t = fn()
            return t.read_all() if hasattr(t, "read_all") else t
    raise RuntimeError("this DuckDB cannot return Arrow tables")


def known_experts(manifest: Mapping[str, Any] | None, name: str = "routing") -> dict[str, int]:
    """{layer: E} as a run records it: the table's ``<name>_layout`` entry, else the declared routed layers."""
    manifest = manifest or {}
    entry = manifest.get(layout_manifest_key(name))
    if isinstance(entry, Mapping) and isinstance(entry.get("experts"), Mapping) and entry["experts"]:
        return {str(k): int(v) for k, v in entry["experts"].items()}
    spec = manifest.get("spec")
    layers = spec.get("routed_layers") if isinstance(spec, Mapping) else None
    out = {}
    for layer in layers or ():
        if isinstance(layer, Mapping) and "name" in layer and "num_experts" in layer:
            out[str(layer["name"])] = int(layer["num_experts"])
    return out


def loads_sql(
    source: str, keys: Sequence[str], cols: Sequence[str] | set[str], experts: Mapping[str, int] | None = None
) -> str:
    """SQL for per (keys..., expert) ``slots`` (top-k picks) and ``weight`` (summed combine weight) over
    ``source`` (a relation with the routing columns); every expert 0..E-1 of a layer is present.

    Wide layout: the weight is summed over the E-wide ``combine`` (it may sit outside the top-k) and E is
    its width. Split layout (no ``combine``): a slot's weight is its ``topk_weights`` entry and E is
    ``experts[layer]`` (or the highest id seen + 1)."""
    k = ", ".join(map(_qi, keys))
    if "combine" in cols:
        return f"""
            WITH w AS (
                SELECT {k}, expert, sum(wt)::DOUBLE AS weight FROM (
                    SELECT {k}, unnest(range(len(combine)))::INTEGER AS expert, unnest(combine) AS wt
                    FROM {source}) GROUP BY ALL),
            s AS (
                SELECT {k}, expert, count(*)::BIGINT AS slots FROM (
                    SELECT {k}, unnest(topk_ids)::INTEGER AS expert FROM {source}) GROUP BY ALL)
            SELECT {", ".join(f"coalesce(w.{_qi(c)}, s.{_qi(c)}) AS {_qi(c)}" for c in keys)},
                   coalesce(w.expert, s.expert) AS expert,
                   coalesce(s.slots, 0)::BIGINT AS slots, coalesce(w.weight, 0.0)::DOUBLE AS weight
            FROM w FULL OUTER JOIN s USING ({k}, expert)"""
    known = "SELECT NULL::VARCHAR AS layer, 0 AS n WHERE FALSE"
    if experts:
        known = " UNION ALL ".join(
            f"SELECT {_sql_str(str(layer))} AS layer, {int(e)} AS n" for layer, e in experts.items()
        )
    return f"""
        WITH a AS (
            SELECT {k}, expert, count(*)::BIGINT AS slots, sum(wt)::DOUBLE AS weight FROM (
                SELECT {k}, unnest(topk_ids)::INTEGER AS expert, unnest(topk_weights) AS wt
                FROM {source}) GROUP BY ALL),
        known AS ({known}),
        n AS (SELECT layer, greatest(max(a.expert) + 1, max(known.n)) AS n
              FROM a LEFT JOIN known USING (layer) GROUP BY layer),
        zero AS (SELECT d.*, unnest(range(n.n))::INTEGER AS expert, 0::BIGINT AS slots, 0.0::DOUBLE AS weight
                 FROM (SELECT DISTINCT {k} FROM a) d JOIN n USING (layer))
        SELECT {k}, expert, sum(slots)::BIGINT AS slots, sum(weight)::DOUBLE AS weight
        FROM (SELECT * FROM a UNION ALL BY NAME SELECT * FROM zero) GROUP BY ALL"""


def coselection_counts(path, experts: Mapping[str, int] | None = None, batch_rows: int = 65_536) -> pa.Table:
    """``coselection`` (layer, expert_a, expert_b, count) of a routing Parquet file, streamed over its row
    groups: per layer, how often experts a and b were both among one position's top-k (a == b: times
    chosen), every pair of 0..E-1 present. Same numbers as ``R.co_selection`` per layer."""
    pf = pq.ParquetFile(path)
    layer_ids: dict[str, int] = {}
    counts: list[np.ndarray] = []  # per layer id: flat [Emax * Emax] int64
    emax = max([int(e) for e in (experts or {}).values()] + [1])

    def grow(e: int) -> None:
        nonlocal emax, counts
        if e <= emax:
            return
        counts = [np.pad(c.reshape(emax, emax), ((0, e - emax), (0, e - emax))).reshape(-1) for c in counts]
        emax = e

    for batch in pf.iter_batches(batch_size=batch_rows, columns=["layer", "topk_ids"]):
        layer = batch.column(0)
        enc = layer if pa.types.is_dictionary(layer.type) else pc.dictionary_encode(layer)
        local = [layer_ids.setdefault(str(v), len(layer_ids)) for v in enc.dictionary.to_pylist()]
        while len(counts) < len(layer_ids):
            counts.append(np.zeros(emax * emax, dtype=np.int64))
        rows_layer = np.asarray(local, dtype=np.int64)[enc.indices.to_numpy(zero_copy_only=False)]
        topk = batch.column(1)
        lengths = pc.list_value_length(topk).fill_null(0).to_numpy()
        ids = pc.list_flatten(topk).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(ids) == 0:
            continue
        grow(int(ids.max()) + 1)
        kk = int(lengths[0]) if len(lengths) else 0
        if kk and (lengths == kk).all():  # the usual case: k ids per row
            ids = ids.reshape(-1, kk)
            pairs = (ids[:, :, None] * emax + ids[:, None, :]).reshape(len(ids), -1)
            for lid in np.unique(rows_layer):
                sel = pairs[rows_layer == lid].reshape(-1)
                counts[lid] += np.bincount(sel, minlength=emax * emax)
        else:  # ragged top-k lists: one-hot counts, then chosen^T chosen per layer
            parents = pc.list_parent_indices(topk).to_numpy()
            chosen = np.zeros((batch.num_rows, emax), dtype=np.float64)
            np.add.at(chosen, (parents, ids), 1.0)
            for lid in np.unique(rows_layer):
                c = chosen[rows_layer == lid]
                counts[lid] += np.rint(c.T @ c).astype(np.int64).reshape(-1)
    names, a_col, b_col, n_col = [], [], [], []
    for name in sorted(layer_ids):
        c = counts[layer_ids[name]].reshape(emax, emax)
        seen = np.flatnonzero(c.sum(axis=0) + c.sum(axis=1))
        e = max(int((experts or {}).get(name, 0)), int(seen.max()) + 1 if len(seen) else 0)
        grid_a, grid_b = np.meshgrid(np.arange(e), np.arange(e), indexing="ij")
        names += [name] * (e * e)
        a_col.append(grid_a.reshape(-1))
        b_col.append(grid_b.reshape(-1))
        n_col.append(c[:e, :e].reshape(-1))

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    return pa.table(
        {"layer": pa.array(names, pa.string()), "expert_a": cat(a_col), "expert_b": cat(b_col), "count": cat(n_col)}
    )


def write_routing_aggregates(writer) -> list[str]:
    """Compute ``routing_loads``, ``routing_entropy_sample`` and (unless written) ``coselection`` from the
    staged ``routing.parquet`` and add them to the run. Returns the table names written."""
    src = writer.staging_dir / "routing.parquet"
    if writer.is_streaming("routing"):
        writer.close_table("routing")
    cols = set(pq.read_schema(src).names)
    manifest = {**dict(getattr(writer, "manifest_base", {}) or {}), **dict(getattr(writer, "_extra", {}) or {})}
    experts = known_experts(manifest)
    written = []
    con = duckdb.connect(":memory:")
    try:
        rp = f"read_parquet({_sql_str(str(src))})"
        groups = [c for c in ROUTING_GROUPS if c in cols]
        weights = "combine" in cols or "topk_weights" in cols
        if {"layer", "topk_ids"} <= cols and weights and not writer.has_file("routing_loads.parquet"):
            loads = _fetch_arrow(con.sql(loads_sql(rp, groups, cols, experts) + " ORDER BY ALL"))
            writer.write_table("routing_loads", loads)
            written.append("routing_loads")
        value_cols = [c for c in ("entropy", "top1_prob") if c in cols]
        if "layer" in cols and value_cols and not writer.has_file("routing_entropy_sample.parquet"):
            meta = [
                c
                for c in (
                    "layer",
                    "call",
                    "position_kind",
                    "routed_modality",
                    "gate_modality",
                    "example_index",
                    "position",
                )
                if c in cols
            ]
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
    if {"layer", "topk_ids"} <= cols and not writer.has_file("coselection.parquet"):
        writer.write_table("coselection", coselection_counts(src, experts))
        written.append("coselection")
    return written

"""Precomputed routing aggregates (OLMoE's lesson: count once, store the counts, plot from the store).

``routing.parquet`` is written sorted by (example_index, layer, call, position) in row groups of 64k
rows, so a per-example filter touches one or two row groups. When a run has a routing table, the
:class:`~analysis.store.publish.RunWriter` also writes two small aggregates computed by DuckDB from the
staged file:

* ``routing_loads``: per layer, call, position_kind, routed_modality, gate_modality and expert, the
  top-k slot count and the summed combine weight; every expert 0..E-1 is present, dead ones with zeros;
* ``routing_entropy_sample``: a deterministic uniform sample of up to :data:`ENTROPY_SAMPLE_PER_LAYER`
  positions per layer with entropy / top1_prob and position metadata.

The reader uses them when present and falls back to the full routing table otherwise.
"""
from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.store.layout import ROUTING_GROUPS, _sql_str

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


def write_routing_aggregates(writer) -> list[str]:
    """Compute ``routing_loads`` and ``routing_entropy_sample`` from the staged ``routing.parquet``
    with DuckDB and add them to the run. Returns the table names written."""
    src = writer.staging_dir / "routing.parquet"
    if writer.is_streaming("routing"):
        writer.close_table("routing")
    cols = set(pq.read_schema(src).names)
    written = []
    con = duckdb.connect(":memory:")
    try:
        rp = f"read_parquet({_sql_str(str(src))})"
        groups = [c for c in ROUTING_GROUPS if c in cols]
        g = ", ".join(groups)
        if {"layer", "topk_ids", "combine"} <= cols and not writer.has_file("routing_loads.parquet"):
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
        if "layer" in cols and value_cols and not writer.has_file("routing_entropy_sample.parquet"):
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

"""Benchmark the artifact store: streamed writes and the page queries on synthetic routing tables.

Two model shapes:

* ``large`` (default): 48 layers x 512 positions per example (64 image patches on an 8 x 8 grid, 448 text
  tokens), E=128, top-8 (a large Hugging Face MoE); 100M routed positions are ~4,070 examples, 2.1M tokens;
* ``demo``: the earlier benchmark's shape, 6 layers x 128 positions, E=8, top-2.

Each size is generated in chunks of whole examples and streamed into a RunWriter through
:class:`analysis.store.RoutingSink` (never the whole table in memory), in the layout asked for: ``auto``
("split" above 16 experts: per-position columns in routing.parquet, float16 probs/logits in
routing_dense.parquet) or ``wide`` (every column inline, float32: the layout the store had before).
``--baseline N`` also measures the wide layout at N positions in the same run (default 10M for the large
shape), and the report gives every number's ratio to it. Timings are p50/p95 over repeats, in ms; "reads"
is what DuckDB's profile says the query scanned (row groups read of the file's total).

    python benchmarks/store_queries.py --quick                                   # demo shape, 1M (< 1 min)
    python benchmarks/store_queries.py --positions 1000000 10000000 100000000   # large shape + baseline
    python benchmarks/store_queries.py --shape demo --positions 1000000 10000000 --baseline 0
    python benchmarks/store_queries.py ... --json --record                     # also append to BENCHMARKS.md

Target: page-query p95 <= 300 ms at every size, on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
from _common import command_line, record  # also puts the repo on sys.path
from _common import machine as common_machine

from analysis.store import RoutingSink, RunStore, RunWriter, inputs_manifest, run_status  # noqa: E402
from mmoe_core.spec import ModelSpec, RoutedLayerSpec  # noqa: E402

TARGET_P95_MS = 300.0


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    layers: tuple[str, ...]
    positions: int  # routed positions per example and layer
    image: int  # the first `image` positions are image patches on a square grid
    experts: int
    top_k: int
    vocab: int = 5000

    @property
    def per_example(self) -> int:
        return len(self.layers) * self.positions


SHAPES = {
    "large": Shape("large", tuple(f"layers.{i:02d}" for i in range(48)), 512, 64, 128, 8),
    "demo": Shape(
        "demo", ("decoder.1", "decoder.3", "inter.img", "inter.txt", "intra.img", "intra.txt"), 128, 96, 8, 2, 2000
    ),
}


class Generator:
    """Synthetic routing in the precompute's schema (combine = scatter of the renormalised top-k).

    Rows are drawn from per-regime pools of router outputs (healthy; drifting: one expert favoured;
    collapsing: three experts take most slots) so that 10^8 positions cost gathers, not 10^8 softmaxes
    and top-k sorts; layer 0 collapses, layer 1 drifts, the others are healthy. Each pool row's logits are
    N(0, 1) plus the regime's bias; probs its softmax. The healthy pool holds 2^18 rows, so a row's twin
    rarely shares a Parquet page with it (which would flatter the compression)."""

    POOLS = (1 << 18, 1 << 15, 1 << 15)  # healthy, drifting, collapsing

    def __init__(self, shape: Shape, seed: int = 0):
        self.shape, self.rng = shape, np.random.default_rng(seed)
        e, k = shape.experts, shape.top_k
        biases = np.zeros((3, e), np.float32)
        biases[1, 0] = 2.5
        biases[2, :3] = 4.0
        pools = [self._pool(b, size, e, k) for b, size in zip(biases, self.POOLS, strict=True)]
        self.pool = {c: np.concatenate([p[c] for p in pools]) for c in pools[0]}
        self.offset = np.concatenate([[0], np.cumsum(self.POOLS)[:-1]]).astype(np.int64)
        self.size = np.asarray(self.POOLS, dtype=np.int64)
        self.regime = np.zeros(len(shape.layers), np.int64)
        self.regime[0], self.regime[1 % len(shape.layers)] = 2, 1
        self.vocab = pa.array([f"tok{i}" for i in range(shape.vocab)])

    def _pool(self, bias: np.ndarray, size: int, e: int, k: int) -> dict[str, np.ndarray]:
        logits = self.rng.standard_normal((size, e), dtype=np.float32) + bias
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
        pv = np.take_along_axis(probs, part, 1)
        order = np.argsort(-pv, axis=1, kind="stable")
        topk, topw = np.take_along_axis(part, order, 1), np.take_along_axis(pv, order, 1)
        topw = (topw / topw.sum(axis=1, keepdims=True)).astype(np.float32)
        combine = np.zeros_like(probs)
        np.put_along_axis(combine, topk, topw, axis=1)
        return {
            "logits": logits,
            "probs": probs.astype(np.float32),
            "combine": combine,
            "topk": topk.astype(np.int16),
            "topw": topw,
            "entropy": (-(probs * np.log(np.clip(probs, 1e-12, None))).sum(1)).astype(np.float32),
            "top1_prob": probs.max(axis=1).astype(np.float32),
        }

    def chunk(self, first_row: int, rows: int) -> pa.Table:
        """Rows first_row .. first_row + rows of the table (global order: example, layer, position)."""
        s = self.shape
        idx = np.arange(first_row, first_row + rows, dtype=np.int64)
        example = idx // s.per_example
        layer = (idx // s.positions) % len(s.layers)
        position = (idx % s.positions).astype(np.int32)
        regime = self.regime[layer]
        pick = self.offset[regime] + (self.rng.random(rows) * self.size[regime]).astype(np.int64)
        image = position < s.image
        side = int(round(np.sqrt(s.image))) or 1
        kinds = np.where(image, 1, 0).astype(np.int32)

        def lists(a: np.ndarray, typ: pa.DataType) -> pa.Array:
            width = a.shape[1]
            offsets = pa.array(np.arange(0, a.shape[0] * width + 1, width, dtype=np.int32))
            return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), type=typ))

        def dict_str(codes: np.ndarray, values) -> pa.Array:
            values = values if isinstance(values, pa.Array) else pa.array(values)
            return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), values).cast(pa.string())

        ex_lo = int(example[0]) if rows else 0
        ex_ids = pa.array([f"ex{i:07d}" for i in range(ex_lo, int(example[-1]) + 1 if rows else 0)])
        p = {c: v[pick] for c, v in self.pool.items()}
        topk = p["topk"]
        return pa.table(
            {
                "layer": dict_str(layer, list(s.layers)),
                "call": dict_str(np.zeros(rows, np.int32), ["sequence"]),
                "example_index": example,
                "example_id": dict_str(example - ex_lo, ex_ids),
                "position": position,
                "position_kind": dict_str(kinds, ["text_token", "image_patch"]),
                "token": dict_str(self.rng.integers(0, s.vocab, rows), self.vocab),
                "routed_modality": dict_str(kinds, ["text", "image"]),
                "gate_modality": dict_str(kinds, ["text", "image"]),
                "grid_row": np.where(image, position // side, -1).astype(np.int16),
                "grid_col": np.where(image, position % side, -1).astype(np.int16),
                "top1": topk[:, 0].copy(),
                "topk_ids": lists(topk, pa.int16()),
                "topk_weights": lists(p["topw"], pa.float32()),
                "combine": lists(p["combine"], pa.float32()),
                "probs": lists(p["probs"], pa.float32()),
                "logits": lists(p["logits"], pa.float32()),
                "entropy": p["entropy"],
                "top1_prob": p["top1_prob"],
                "routed": np.ones(rows, dtype=bool),
            }
        )


def synth_small_tables(shape: Shape, n_ex: int, seed: int = 1) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    layers = list(shape.layers)
    examples = pd.DataFrame(
        {
            "example_index": np.arange(n_ex, dtype=np.int64),
            "example_id": [f"ex{i:07d}" for i in range(n_ex)],
            "split": rng.choice(["train", "dev", "test"], n_ex, p=[0.8, 0.1, 0.1]),
            "decided_by": rng.choice(["text", "image", "both"], n_ex),
            "label": rng.integers(0, 500, n_ex),
            "gold_rank": rng.integers(1, 50, n_ex),
            "correct": rng.random(n_ex) < 0.6,
        }
    )
    predictions = pd.DataFrame(
        {
            "example_index": np.repeat(examples.example_index.to_numpy(), 5),
            "rank": np.tile(np.arange(1, 6), n_ex),
            "candidate": rng.integers(0, 500, n_ex * 5),
            "score": rng.random(n_ex * 5).astype(np.float32),
        }
    )
    layer_metrics = pd.DataFrame(
        {
            "layer": layers,
            "experts": shape.experts,
            "k": shape.top_k,
            "token_entropy": rng.random(len(layers)),
            "load_cv": rng.random(len(layers)),
            "verdict": rng.choice(["healthy", "warning", "collapsed"], len(layers)),
        }
    )
    dynamics = pd.DataFrame(
        {
            "step": np.repeat(np.arange(0, 2000, 100), len(layers)),
            "layer": np.tile(layers, 20),
            "token_entropy": rng.random(20 * len(layers)),
        }
    )
    return {"examples": examples, "predictions": predictions, "layer_metrics": layer_metrics, "dynamics": dynamics}


def fake_checkpoint(d: Path, mb: int = 64) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"family": "synthetic"}))
    (d / "model.safetensors").write_bytes(os.urandom(mb << 20))
    return d


def timed(fn, repeats: int) -> dict:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    a = np.array(times)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "max_ms": float(a.max()),
        "n": repeats,
    }


MIN_FREE = 6 * 2**30  # stop writing (and remove the run) when the disk gets this full: it is shared


def bytes_per_position(shape: Shape, layout: str, dense: bool) -> float:
    """On-disk bytes per routed position (for the free-space check), from earlier runs of this script."""
    if layout == "wide" or shape.experts <= 16:
        return 120.0 if shape.experts <= 16 else 1100.0
    return 60.0 + (3.6 * shape.experts if dense else 0.0)


def write_run(
    root: Path, shape: Shape, n: int, layout: str, chunk_rows: int, row_group_size: int | None, dense: bool = True
) -> dict:
    """Generate and stream n positions into run "bench"; returns timings (generation kept apart)."""
    gen = Generator(shape)
    n_ex = -(-n // shape.per_example)
    ckpt = fake_checkpoint(root / "checkpoints" / "bench")
    spec = ModelSpec(
        "synthetic",
        f"synthetic {shape.name}",
        routed_layers=tuple(RoutedLayerSpec(name, shape.experts, shape.top_k) for name in shape.layers),
    )
    kw = {} if row_group_size is None else {"row_group_size": row_group_size}
    gen_s = append_s = 0.0
    w = RunWriter("bench", root=root, manifest_base=inputs_manifest(ckpt, None, {"n": n}, spec=spec), **kw).open()
    try:
        sink = RoutingSink(w, layout=layout, dense=dense)
        chunk = max(shape.per_example, (chunk_rows // shape.per_example) * shape.per_example)
        for lo in range(0, n, chunk):
            t0 = time.perf_counter()
            table = gen.chunk(lo, min(chunk, n - lo))
            t1 = time.perf_counter()
            sink.append(table)
            del table
            if shutil.disk_usage(root).free < MIN_FREE:
                raise SystemExit(
                    f"stopped at {lo + chunk:,} of {n:,} positions: under {MIN_FREE / 2**30:.0f} GiB "
                    f"free in {root} (shared disk); the partial run is removed"
                )
            append_s += time.perf_counter() - t1
            gen_s += t1 - t0
        t0 = time.perf_counter()
        sink.close()
        for name, df in synth_small_tables(shape, n_ex).items():
            w.write_table(name, df)
        close_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        w.commit()
        commit_s = time.perf_counter() - t0
    except BaseException:
        w.abort()
        raise
    write_s = append_s + close_s + commit_s
    return {
        "examples": n_ex,
        "layout": sink.layout,
        "generate_s": round(gen_s, 1),
        "append_s": round(append_s + close_s, 1),
        "aggregate_hash_publish_s": round(commit_s, 1),
        "write_s": round(write_s, 1),
        "positions_per_s": round(n / write_s),
    }


def bench_one(
    shape: Shape,
    n: int,
    layout: str,
    repeats: int,
    workdir: str | None,
    chunk_rows: int,
    row_group_size: int | None,
    dense: bool = True,
) -> dict:
    need = bytes_per_position(shape, layout, dense) * n * 1.05
    free = shutil.disk_usage(workdir or tempfile.gettempdir()).free
    if free - need < MIN_FREE:
        raise SystemExit(
            f"{n:,} positions ({layout}) need ~{need / 2**30:.0f} GiB; only {free / 2**30:.0f} GiB free "
            f"in {workdir or tempfile.gettempdir()} (keeping {MIN_FREE / 2**30:.0f} GiB spare)"
        )
    with tempfile.TemporaryDirectory(dir=workdir, prefix="moescope-bench-") as tmp:
        root = Path(tmp)
        print(f"  writing {n:,} positions ({shape.name}, {layout}) ...", file=sys.stderr, flush=True)
        info = write_run(root, shape, n, layout, chunk_rows, row_group_size, dense)
        vdir = (root / "runs" / "bench").resolve()
        sizes = {p.name: p.stat().st_size for p in vdir.iterdir()}
        print(f"  wrote in {info['write_s']} s; querying ...", file=sys.stderr, flush=True)
        n_ex = info["examples"]
        rng = np.random.default_rng(123)
        exs = rng.integers(0, n_ex, repeats)
        layers = [shape.layers[int(i)] for i in rng.integers(0, len(shape.layers), repeats)]
        res: dict[str, dict] = {}
        res["open RunStore"] = timed(lambda i: RunStore("bench", root).close(), repeats)
        run_status("bench", root)  # first call hashes the checkpoint once; later calls stat it
        res["run_status (ckpt hash memoised)"] = timed(lambda i: run_status("bench", root), repeats)
        fresh = [RunStore("bench", root) for _ in range(repeats)]
        res["example_routing(ex) first query of a store"] = timed(
            lambda i: fresh[i].example_routing(int(exs[i])), repeats
        )
        store = RunStore("bench", root)
        store.example_routing(0)  # warm the parquet metadata cache, as the first page render would
        res["example_routing(ex)"] = timed(lambda i: store.example_routing(int(exs[i])), repeats)
        res["example_routing(ex, layer)"] = timed(
            lambda i: store.example_routing(int(exs[i]), layer=layers[i]), repeats
        )
        if store.routing_layout() == "split" and store.has("routing_dense"):
            store.example_routing(0, layer=shape.layers[0], dense=True)
            res["example_routing(ex, layer, dense=True)"] = timed(
                lambda i: store.example_routing(int(exs[i]), layer=layers[i], dense=True), repeats
            )
        fresh2 = [RunStore("bench", root) for _ in range(repeats)]
        res["layer_loads cold"] = timed(lambda i: fresh2[i].layer_loads(), repeats)
        res["layer_loads warm"] = timed(lambda i: store.layer_loads(), repeats)
        res["open + layer_loads(by=routed_modality)"] = timed(
            lambda i: RunStore("bench", root).layer_loads(by="routed_modality"), repeats
        )
        res["entropy_values(layer, 20000) cold"] = timed(lambda i: fresh2[i].entropy_values(layers[i], 20_000), repeats)
        res["coselection(layer) cold"] = timed(lambda i: fresh[i].coselection(layers[i]), repeats)
        res["examples(decided_by=image, correct=False)"] = timed(
            lambda i: store.examples({"decided_by": "image", "correct": False}), repeats
        )
        res["examples(limit=50)"] = timed(lambda i: store.examples(limit=50), repeats)
        res["predictions of one example"] = timed(
            lambda i: store.table("predictions", where={"example_index": int(exs[i])}), repeats
        )
        res["layer_metrics"] = timed(lambda i: store.layer_metrics(), repeats)
        res["dynamics"] = timed(lambda i: store.dynamics(), repeats)
        ex, lay = int(exs[0]), layers[0]
        reads = {  # what each query reads: the row groups example_routing picks, DuckDB's profile for the rest
            "example_routing(ex)": store.example_read_stats(ex),
            "example_routing(ex, layer)": store.example_read_stats(ex, lay),
            "layer_loads cold": store.scan_stats("SELECT * FROM routing_loads"),
            "entropy_values(layer, 20000) cold": store.scan_stats(
                "SELECT entropy FROM routing_entropy_sample WHERE layer = ?", [lay]
            ),
            "coselection(layer) cold": store.scan_stats("SELECT * FROM coselection WHERE layer = ?", [lay]),
        }
        reads["example_routing(ex) first query of a store"] = reads["example_routing(ex)"]
        if "example_routing(ex, layer, dense=True)" in res:
            side = store.example_read_stats(ex, lay, name="routing_dense")
            main = reads["example_routing(ex, layer)"]
            reads["example_routing(ex, layer, dense=True)"] = {
                k: side[k] + main[k] for k in ("row_groups_read", "row_groups_total", "bytes_read")
            }
        rows_ex = len(store.example_routing(ex))
        for s in fresh + fresh2 + [store]:
            s.close()
        return {
            "shape": shape.name,
            "positions": n,
            "layers": len(shape.layers),
            "experts": shape.experts,
            "top_k": shape.top_k,
            "per_example": shape.per_example,
            "rows_of_one_example": rows_ex,
            **info,
            "row_group_size": row_group_size,
            "bytes": sizes,
            "queries": res,
            "reads": reads,
            "worst_p95_ms": max(v["p95_ms"] for v in res.values()),
            "within_target": all(v["p95_ms"] <= TARGET_P95_MS for v in res.values()),
        }


def machine() -> dict:
    return {**common_machine(), "duckdb": duckdb.__version__, "pyarrow": pa.__version__, "pandas": pd.__version__}


def _mb(b: float) -> str:
    return f"{b / 1e6:,.0f}" if b >= 1e7 else f"{b / 1e6:,.1f}"


def markdown(results: list[dict], baseline: dict | None) -> str:
    runs = ([baseline] if baseline else []) + results

    def label(r: dict) -> str:
        return f"{r['layout']} {r['positions'] / 1e6:g}M" + (" (baseline)" if r is baseline else "")

    out = [
        "| run | examples | write positions/s | write s (aggregate+hash+publish s) | routing MB | dense MB "
        "| all files MB | bytes/position | worst page p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        b = r["bytes"]
        total = sum(b.values())
        ratio = ""
        if baseline and r is not baseline:
            ratio = f" ({r['positions_per_s'] / baseline['positions_per_s']:.2f}x)"
        out.append(
            f"| {label(r)} | {r['examples']:,} | {r['positions_per_s']:,}{ratio} | {r['write_s']} "
            f"({r['aggregate_hash_publish_s']}) | {_mb(b.get('routing.parquet', 0))} | "
            f"{_mb(b.get('routing_dense.parquet', 0))} | {_mb(total)} | {total / r['positions']:.0f} | "
            f"{r['worst_p95_ms']:.0f} |"
        )
    out.append("")
    names = list(dict.fromkeys(q for r in runs for q in r["queries"]))
    head = "| page query | " + " | ".join(f"{label(r)} p95 ms" for r in runs)
    if baseline:
        head += " | " + " | ".join(f"{label(r)} / baseline" for r in results)
    out += [
        head + " | reads (largest run) |",
        "|---|" + "---:|" * (len(runs) + (len(results) if baseline else 0)) + "---|",
    ]
    big = runs[-1]
    for q in names:
        cells = [f"{r['queries'][q]['p95_ms']:.1f}" if q in r["queries"] else "" for r in runs]
        if q in big["queries"] and big["queries"][q]["p95_ms"] > TARGET_P95_MS:
            cells[-1] += " **over target**"
        if baseline:
            for r in results:
                a, b = r["queries"].get(q), baseline["queries"].get(q)
                cells.append(f"{a['p95_ms'] / b['p95_ms']:.2f}" if a and b and b["p95_ms"] > 0 else "")
        rd = big["reads"].get(q)
        where = ""
        if rd:
            groups = rd.get("row_groups_read", rd.get("row_groups_scanned"))
            where = f"{groups} of {rd['row_groups_total']} row groups, {rd['bytes_read'] / 1e6:.1f} MB"
        out.append(f"| {q} | " + " | ".join(cells) + f" | {where} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="large")
    ap.add_argument(
        "--positions",
        type=int,
        nargs="+",
        default=None,
        help="routed positions per synthetic run (default: 1000000 10000000)",
    )
    ap.add_argument("--layout", choices=("auto", "wide", "split"), default="auto")
    ap.add_argument(
        "--baseline",
        type=int,
        default=None,
        help="also measure the wide layout at this many positions (default 10000000 for the large shape, 0 = none)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="timings per query (default 30; --quick 10)")
    ap.add_argument("--quick", action="store_true", help="demo shape, 1M positions, no baseline, fewer repeats")
    ap.add_argument("--chunk-rows", type=int, default=262_144, help="rows generated and appended at a time")
    ap.add_argument(
        "--row-group-size",
        type=int,
        default=None,
        help="RunWriter row groups of the wide layout (default: the store's)",
    )
    ap.add_argument("--no-dense", action="store_true", help="split layout without the routing_dense side table")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    ap.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    ap.add_argument("--workdir", default=None, help="where the temporary artifacts root goes")
    ap.add_argument("--note", default=None, help="a line to add to the recorded section")
    args = ap.parse_args(argv)
    shape = SHAPES["demo" if args.quick else args.shape]
    sizes = args.positions or ([1_000_000] if args.quick else [1_000_000, 10_000_000])
    repeats = args.repeats or (10 if args.quick else 30)
    base_n = (
        0
        if args.quick
        else (args.baseline if args.baseline is not None else (10_000_000 if shape.name == "large" else 0))
    )
    info = machine()  # load average before the benchmark's own work
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    baseline = None
    if base_n:
        print(f"baseline: wide layout, {base_n:,} positions ...", file=sys.stderr, flush=True)
        baseline = bench_one(shape, base_n, "wide", repeats, args.workdir, args.chunk_rows, args.row_group_size)
    results = []
    for n in sizes:
        print(f"benchmarking {n:,} positions ({args.layout}) ...", file=sys.stderr, flush=True)
        results.append(
            bench_one(
                shape,
                n,
                args.layout,
                repeats,
                args.workdir,
                args.chunk_rows,
                args.row_group_size,
                dense=not args.no_dense,
            )
        )
        if args.json_out:  # keep what is done so far
            Path(args.json_out).write_text(
                json.dumps({"machine": info, "started": started, "baseline": baseline, "results": results}, indent=2)
            )
    payload = {
        "machine": info,
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command_line(),
        "target_p95_ms": TARGET_P95_MS,
        "baseline": baseline,
        "results": results,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=2))
    body = markdown(results, baseline)
    print(json.dumps(payload, indent=2) if args.json else body)
    if args.record:
        record(
            "Artifact store at large-model scale" if shape.name == "large" else "Artifact store queries",
            info,
            command_line(),
            body,
            args.note,
        )
    return 0 if all(r["within_target"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the artifact store's page queries on synthetic routing tables.

Generates a routing table of N routed positions (6 layers x 128 positions per example, E=8, top-2),
publishes it with RunWriter (which sorts it and writes the routing aggregates) into a temporary root,
then times the queries the pages make, reporting p50/p95 in milliseconds over repeats.

    python benchmarks/store_queries.py                      # 1M and 10M positions, markdown table
    python benchmarks/store_queries.py --quick              # 1M only, fewer repeats (< 1 minute)
    python benchmarks/store_queries.py --positions 2000000 --json
    python benchmarks/store_queries.py --record             # also append a dated section to BENCHMARKS.md

Project target: p95 <= 300 ms at 10M positions on 2 CPU cores for every page query.
"""
from __future__ import annotations

import argparse
import json
import os
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

from analysis.store import RunStore, RunWriter, inputs_manifest, run_status  # noqa: E402
from mmoe_core.spec import ModelSpec, RoutedLayerSpec  # noqa: E402

TARGET_P95_MS = 300.0
LAYERS = ("decoder.1", "decoder.3", "inter.img", "inter.txt", "intra.img", "intra.txt")  # sorted names
POSITIONS_PER_LAYER = 128   # cls + 31 text tokens + 96 image patches
EXPERTS, TOP_K = 8, 2


def synth_routing(n: int, seed: int = 0) -> tuple[pa.Table, int]:
    """A routing table of exactly n rows in the store's schema; returns (table, number of examples)."""
    rng = np.random.default_rng(seed)
    per_ex = len(LAYERS) * POSITIONS_PER_LAYER
    n_ex = -(-n // per_ex)
    idx = np.arange(n)
    example_index = (idx // per_ex).astype(np.int64)
    layer_i = (idx // POSITIONS_PER_LAYER) % len(LAYERS)
    position = (idx % POSITIONS_PER_LAYER).astype(np.int32)
    bias = rng.normal(0, 1.0, (len(LAYERS), EXPERTS)).astype(np.float32)
    bias[0, 0] += 3.0  # one layer drifting towards collapse
    logits = rng.standard_normal((n, EXPERTS), dtype=np.float32) + bias[layer_i]
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    topk = np.argsort(-probs, axis=1)[:, :TOP_K].astype(np.int16)
    topw = np.take_along_axis(probs, topk.astype(np.int64), axis=1)
    topw /= topw.sum(axis=1, keepdims=True)
    combine = np.zeros_like(probs)
    np.put_along_axis(combine, topk.astype(np.int64), topw, axis=1)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1).astype(np.float32)
    del z  # probs stays: the routing table stores the gate's own probabilities

    def lists(a: np.ndarray, typ: pa.DataType) -> pa.Array:
        width = a.shape[1]
        offsets = pa.array(np.arange(0, a.shape[0] * width + 1, width, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1), type=typ))

    def dict_str(indices: np.ndarray, values: list[str]) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32)), pa.array(values)).cast(pa.string())

    kind_i = np.where(position == 0, 0, np.where(position < 32, 1, 2))
    kinds = ["cls", "text_token", "image_patch"]
    modality_i = (kind_i == 2).astype(np.int32)
    vocab = [f"tok{i}" for i in range(2000)]
    token_i = rng.integers(0, len(vocab), n)
    table = pa.table({
        "layer": dict_str(layer_i, list(LAYERS)),
        "call": dict_str(np.zeros(n, np.int32), ["mention"]),
        "example_index": example_index,
        "example_id": dict_str(example_index, [f"ex{i:07d}" for i in range(n_ex)]),
        "position": position,
        "position_kind": dict_str(kind_i, kinds),
        "token": dict_str(token_i, vocab),
        "routed_modality": dict_str(modality_i, ["text", "image"]),
        "gate_modality": dict_str(1 - modality_i, ["text", "image"]),
        "grid_row": np.where(kind_i == 2, (position - 32) // 12, -1).astype(np.int16),
        "grid_col": np.where(kind_i == 2, (position - 32) % 12, -1).astype(np.int16),
        "top1": topk[:, 0].copy(),
        "topk_ids": lists(topk, pa.int16()),
        "topk_weights": lists(topw.astype(np.float32), pa.float32()),
        "combine": lists(combine, pa.float32()),
        "probs": lists(probs, pa.float32()),
        "logits": lists(logits, pa.float32()),
        "entropy": entropy,
        "top1_prob": probs.max(axis=1).astype(np.float32),
        "routed": np.ones(n, dtype=bool),
    })
    return table, n_ex


def synth_small_tables(n_ex: int, seed: int = 1) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    examples = pd.DataFrame({
        "example_index": np.arange(n_ex, dtype=np.int64),
        "example_id": [f"ex{i:07d}" for i in range(n_ex)],
        "split": rng.choice(["train", "dev", "test"], n_ex, p=[0.8, 0.1, 0.1]),
        "decided_by": rng.choice(["text", "image", "both"], n_ex),
        "label": rng.integers(0, 500, n_ex),
        "gold_rank": rng.integers(1, 50, n_ex),
        "correct": rng.random(n_ex) < 0.6,
    })
    predictions = pd.DataFrame({"example_index": np.repeat(examples.example_index.to_numpy(), 5),
                                "rank": np.tile(np.arange(1, 6), n_ex),
                                "candidate": rng.integers(0, 500, n_ex * 5),
                                "score": rng.random(n_ex * 5).astype(np.float32)})
    layer_metrics = pd.DataFrame({"layer": list(LAYERS), "experts": EXPERTS, "k": TOP_K,
                                  "token_entropy": rng.random(len(LAYERS)),
                                  "load_cv": rng.random(len(LAYERS)),
                                  "verdict": rng.choice(["healthy", "warning", "collapsed"], len(LAYERS))})
    dynamics = pd.DataFrame({"step": np.repeat(np.arange(0, 2000, 100), len(LAYERS)),
                             "layer": np.tile(list(LAYERS), 20),
                             "token_entropy": rng.random(20 * len(LAYERS))})
    return {"examples": examples, "predictions": predictions, "layer_metrics": layer_metrics,
            "dynamics": dynamics}


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
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "max_ms": float(a.max()), "n": repeats}


def bench_one(n: int, repeats: int, workdir: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=workdir, prefix="moescope-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        routing, n_ex = synth_routing(n)
        small = synth_small_tables(n_ex)
        gen_s = time.perf_counter() - t0
        ckpt = fake_checkpoint(root / "checkpoints" / "bench")
        t0 = time.perf_counter()
        spec = ModelSpec("synthetic", "synthetic", routed_layers=tuple(RoutedLayerSpec(name, EXPERTS, TOP_K)
                                                                      for name in LAYERS))
        with RunWriter("bench", root=root, manifest_base=inputs_manifest(ckpt, None, {"n": n}, spec=spec)) as w:
            w.write_table("routing", routing)
            for name, df in small.items():
                w.write_table(name, df)
        write_s = time.perf_counter() - t0
        del routing
        vdir = (root / "runs" / "bench").resolve()
        sizes = {p.name: p.stat().st_size for p in vdir.iterdir()}
        rng = np.random.default_rng(123)
        exs = rng.integers(0, n_ex, repeats)
        layers = [LAYERS[i % len(LAYERS)] for i in range(repeats)]
        res: dict[str, dict] = {}

        res["open RunStore"] = timed(lambda i: RunStore("bench", root).close(), repeats)
        run_status("bench", root)  # first call hashes the checkpoint once; later calls stat it
        res["run_status (ckpt hash memoised)"] = timed(lambda i: run_status("bench", root), repeats)
        store = RunStore("bench", root)
        store.example_routing(0)  # warm the parquet metadata cache, as the first page render would
        res["example_routing(ex)"] = timed(lambda i: store.example_routing(int(exs[i])), repeats)
        res["example_routing(ex, layer)"] = timed(
            lambda i: store.example_routing(int(exs[i]), layer=layers[i]), repeats)
        fresh = [RunStore("bench", root) for _ in range(repeats)]
        res["layer_loads cold"] = timed(lambda i: fresh[i].layer_loads(), repeats)
        res["layer_loads warm"] = timed(lambda i: store.layer_loads(), repeats)
        res["open + layer_loads(by=routed_modality)"] = timed(
            lambda i: RunStore("bench", root).layer_loads(by="routed_modality"), repeats)
        res["entropy_values(layer, 20000) cold"] = timed(
            lambda i: fresh[i].entropy_values(layers[i], 20_000), repeats)
        res["examples(decided_by=image, correct=False)"] = timed(
            lambda i: store.examples({"decided_by": "image", "correct": False}), repeats)
        res["examples(limit=50)"] = timed(lambda i: store.examples(limit=50), repeats)
        res["predictions of one example"] = timed(
            lambda i: store.table("predictions", where={"example_index": int(exs[i])}), repeats)
        res["layer_metrics"] = timed(lambda i: store.layer_metrics(), repeats)
        res["dynamics"] = timed(lambda i: store.dynamics(), repeats)
        # Reference only (not a page path): what layer_loads would cost without the stored aggregate.
        nagg = RunStore("bench", root)
        nagg.tables = [t for t in nagg.tables if t != "routing_loads"]
        ref = {"layer_loads from full routing (no aggregate)": timed(
            lambda i: nagg._layer_loads(None, []), max(2, min(3, repeats)))}
        for s in fresh + [store, nagg]:
            s.close()
        page = {k: v for k, v in res.items()}
        return {"positions": n, "examples": n_ex, "layers": len(LAYERS), "experts": EXPERTS, "top_k": TOP_K,
                "generate_s": round(gen_s, 2), "write_publish_s": round(write_s, 2),
                "bytes": sizes, "queries": page, "reference": ref,
                "worst_p95_ms": max(v["p95_ms"] for v in page.values()),
                "within_target": all(v["p95_ms"] <= TARGET_P95_MS for v in page.values())}


def machine() -> dict:
    return {**common_machine(), "duckdb": duckdb.__version__, "pyarrow": pa.__version__, "pandas": pd.__version__}


def markdown(results: list[dict]) -> str:
    out = []
    for r in results:
        out.append(f"**{r['positions']:,} routed positions** ({r['examples']:,} examples, {r['layers']} layers, "
                   f"E={r['experts']}, top-{r['top_k']}; routing.parquet "
                   f"{r['bytes'].get('routing.parquet', 0) / 2**20:.0f} MiB; generate {r['generate_s']} s, "
                   f"write+aggregate+publish {r['write_publish_s']} s)\n")
        out.append("| query | p50 ms | p95 ms | max ms | n |")
        out.append("|---|---:|---:|---:|---:|")
        for name, v in list(r["queries"].items()) + [(k + " *", v) for k, v in r["reference"].items()]:
            flag = " **over target**" if not name.endswith("*") and v["p95_ms"] > TARGET_P95_MS else ""
            out.append(f"| {name} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f}{flag} | {v['max_ms']:.1f} | {v['n']} |")
        out.append(f"\nworst page-query p95: {r['worst_p95_ms']:.1f} ms "
                   f"({'within' if r['within_target'] else 'OVER'} the {TARGET_P95_MS:.0f} ms target). "
                   "`*` = reference only, not a page path.\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, nargs="+", default=None,
                    help="routed positions per synthetic run (default: 1000000 10000000)")
    ap.add_argument("--repeats", type=int, default=None, help="timings per query (default 30; --quick 10)")
    ap.add_argument("--quick", action="store_true", help="1M positions only, fewer repeats")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--record", action="store_true", help="append the results to BENCHMARKS.md")
    ap.add_argument("--workdir", default=None, help="where the temporary artifacts root goes")
    ap.add_argument("--note", default=None, help="a line to add to the recorded section")
    args = ap.parse_args(argv)
    sizes = args.positions or ([1_000_000] if args.quick else [1_000_000, 10_000_000])
    repeats = args.repeats or (10 if args.quick else 30)
    info = machine()  # load average before the benchmark's own work
    results = []
    for n in sizes:
        print(f"benchmarking {n:,} positions ...", file=sys.stderr, flush=True)
        results.append(bench_one(n, repeats, args.workdir))
    if args.json:
        print(json.dumps({"machine": info, "target_p95_ms": TARGET_P95_MS, "results": results}, indent=2))
    else:
        print(markdown(results))
    if args.record:
        record("Artifact store queries", info, command_line(), markdown(results), args.note)
    return 0 if all(r["within_target"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

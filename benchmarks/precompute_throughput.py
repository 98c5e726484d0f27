"""Benchmark precompute throughput: one process against ``torchrun --nproc_per_node 2``.

Runs ``python -m analysis.precompute --run RUN --force`` and ``torchrun --nproc_per_node 2 -m
analysis.precompute --run RUN --force`` on the same checkpoint and dataset (wall clock of the whole CLI,
imports and writing included), and reports routed positions per second (rows of the published
``routing`` + ``kb_routing`` tables divided by the wall time). Needs a built demo run: ``--root`` names an
artifacts root holding ``checkpoints/RUN``; without it one is built in a temporary folder with
``MOESCOPE_ARTIFACTS=<tmp> python -m demo_build --scale tiny --only mmoe-balanced``.

    python benchmarks/precompute_throughput.py [--root DIR] [--run mmoe-balanced] [--quick] [--json] [--record]

``--quick`` caps the split at 32 examples (``--max-examples``) and skips the dynamics/attribution extras
as far as the CLI allows (small samples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, command_line, load_average, machine, record  # noqa: F401


def ensure_root(root: str | None, run: str) -> Path:
    if root:
        return Path(root)
    tmp = Path(tempfile.mkdtemp(prefix="moescope-bench-"))
    env = {**os.environ, "MOESCOPE_ARTIFACTS": str(tmp)}
    print(f"building the tiny demo run {run} in {tmp} ...", file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, "-m", "demo_build", "--scale", "tiny", "--only", run], cwd=REPO, env=env, check=True
    )
    return tmp


def positions(run_dir: Path) -> dict:
    import pyarrow.parquet as pq

    out = {}
    for name in ("routing", "kb_routing"):
        files = sorted(run_dir.glob(f"{name}.parquet")) or sorted(run_dir.glob(f"{name}/*.parquet"))
        out[name] = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return out


def one(cmd: list[str], root: Path, run: str, args: list[str] | None = None) -> dict:
    env = {**os.environ, "MOESCOPE_ARTIFACTS": str(root)}
    if args is not None:
        env["MOESCOPE_PRECOMPUTE_ARGS"] = json.dumps(args)
    load0 = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"command": " ".join(cmd), "error": proc.stderr[-2000:], "wall_s": round(wall, 2)}
    pos = positions(root / "runs" / run)
    total = sum(pos.values())
    return {
        "command": " ".join(cmd),
        "wall_s": round(wall, 2),
        "positions": pos,
        "total_positions": total,
        "positions_per_s": round(total / wall, 1),
        "load_avg_start": load0,
        "load_avg_end": load_average(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None)
    ap.add_argument("--run", default="mmoe-balanced")
    ap.add_argument("--data", default=None, help="dataset dir (default: <root>/data/entity when it exists)")
    ap.add_argument("--max-examples", type=int, default=None, help="cap the split (default: all; --quick 32)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--note", default=None)
    a = ap.parse_args(argv)
    info = machine()
    root = ensure_root(a.root, a.run)
    extra = ["--run", a.run, "--root", str(root), "--force"]
    data = root / "data" / "entity"
    if a.data or data.is_dir():
        extra += ["--data", str(a.data or data)]
    cap = a.max_examples or (32 if a.quick else None)
    if cap:
        extra += ["--max-examples", str(cap)]
    if a.quick:
        # batch 8: with 32 examples each rank gets whole batches (a rank with none crashes merge_parts);
        # no attribution sample: the MMoE router-logit attributions currently fail in precompute (see BENCHMARKS)
        extra += ["--batch-size", "8", "--attribution-sample", "0", "--dynamics-sample", "8", "--projection", "pca"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    single = one([sys.executable, "-m", "analysis.precompute", *extra], root, a.run)
    # torch 2.14's torchrun reads "--run" after "-m analysis.precompute" as its own --run-path (ambiguous
    # option): the same main() is started through benchmarks/_precompute_entry.py, arguments via the env
    entry = str(Path(__file__).with_name("_precompute_entry.py"))
    double = one([torchrun, "--nproc_per_node", "2", entry], root, a.run, extra)
    ratio = (
        double["positions_per_s"] / single["positions_per_s"]
        if "positions_per_s" in single and "positions_per_s" in double
        else None
    )
    result = {
        "run": a.run,
        "root": str(root),
        "max_examples": cap,
        "one_process": single,
        "torchrun_2": double,
        "speedup_torchrun_2": round(ratio, 3) if ratio else None,
    }
    rows = [
        "| mode | wall s | routed positions (routing + kb_routing) | positions/s | load avg start -> end |",
        "|---|---:|---:|---:|---|",
    ]
    for label, r in (("one process", single), ("torchrun --nproc_per_node 2", double)):
        if "error" in r:
            rows.append(f"| {label} | {r['wall_s']} | failed: {r['error'][-200:]!r} | | |")
        else:
            rows.append(
                f"| {label} | {r['wall_s']:.1f} | {r['total_positions']:,} | {r['positions_per_s']:,.0f} "
                f"| {r['load_avg_start']} -> {r['load_avg_end']} |"
            )
    body = "\n".join(rows) + (
        f"\n\ntorchrun / one process: **{ratio:.2f}x** (run {a.run}, "
        f"max examples {cap or 'all'}; wall clock of the whole CLI, imports, gather and "
        "writing included).\n"
        if ratio
        else "\n"
    )
    if a.json:
        print(json.dumps({"machine": info, **result}, indent=2))
    else:
        print(body)
    if a.record and all("error" in r for r in (single, double)):
        print("both modes failed: nothing recorded", file=sys.stderr)
        return 1
    if a.record:
        record("Precompute throughput: one process vs torchrun x2", info, command_line(), body, a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

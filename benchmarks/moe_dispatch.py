"""Benchmark SwitchMoE dispatch: dense all-experts (the published approach) against sparse dispatch.

Input: x of shape [B, L, D] = [--batch, 51, --dim] (MMoE's CLS + 50 tokens), routed by itself; expert
FFNs D -> 4D -> D (published FeedForward). Configurations E=4/k=3 (MMoE), E=16/k=2, E=64/k=2 with the
standard gate (``topk_softmax``), plus E=4/k=3 with the published gate (``mmoe_reference``, whose
combine weights are zero for every position past the first E: sparse dispatch skips them). Outputs of
the two dispatches are compared (max abs difference, allclose at 1e-5).

    python benchmarks/moe_dispatch.py [--quick] [--json] [--record] [--batch 64] [--dim 96] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch  # noqa: E402
from _common import command_line, load_average, machine, record  # noqa: F401

from mmoe_core.moe import SwitchMoE  # noqa: E402

CONFIGS = [(4, 3, "topk_softmax"), (16, 2, "topk_softmax"), (64, 2, "topk_softmax"), (4, 3, "mmoe_reference")]
SEQ = 51


def bench(e: int, k: int, gate: str, b: int, dim: int, repeats: int) -> dict:
    torch.manual_seed(0)
    moe = SwitchMoE(dim, dim, e, k, gate=gate, mult=4, dispatch="dense").eval()
    x = torch.randn(b, SEQ, dim, generator=torch.Generator().manual_seed(1))
    times = {"dense": [], "sparse": []}
    outs = {}
    with torch.no_grad():
        for mode in ("dense", "sparse"):  # warm-up + outputs
            moe.dispatch = mode
            outs[mode] = moe(x)
        for _ in range(repeats):
            for mode in ("dense", "sparse"):
                moe.dispatch = mode
                t0 = time.perf_counter()
                moe(x)
                times[mode].append(time.perf_counter() - t0)
    diff = float((outs["dense"] - outs["sparse"]).abs().max())
    med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    return {
        "experts": e,
        "top_k": k,
        "gate": gate,
        "tokens": b * SEQ,
        "shape": [b, SEQ, dim],
        "dim": dim,
        "hidden": 4 * dim,
        "dense_ms": round(med["dense"], 2),
        "sparse_ms": round(med["sparse"], 2),
        "speedup_sparse": round(med["dense"] / med["sparse"], 2),
        "max_abs_diff": diff,
        "equal_outputs": bool(torch.allclose(outs["dense"], outs["sparse"], atol=1e-5, rtol=1e-5)),
        "repeats": repeats,
        "load_avg_end": load_average(),
    }


def markdown(results: list[dict]) -> str:
    out = [
        "| E / k | gate | x shape (tokens) | dense ms | sparse ms | sparse speedup | outputs equal (max abs diff) "
        "| load avg end |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        out.append(
            f"| {r['experts']} / {r['top_k']} | {r['gate']} | {r['shape']} ({r['tokens']:,}) "
            f"| {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | **{r['speedup_sparse']:.2f}x** "
            f"| {'yes' if r['equal_outputs'] else 'NO'} ({r['max_abs_diff']:.1e}) | {r['load_avg_end']} |"
        )
    out.append(
        f"\nMedians over {results[0]['repeats']} interleaved repeats; expert FFN D -> 4D -> D; forward only (no_grad)."
    )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="sequences of 51 positions (default 64; --quick 16)")
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=None, help="default 10; --quick 3")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--note", default=None)
    a = ap.parse_args(argv)
    b = a.batch or (16 if a.quick else 64)
    repeats = a.repeats or (3 if a.quick else 10)
    info = machine()
    results = [bench(e, k, g, b, a.dim, repeats) for e, k, g in CONFIGS]
    if a.json:
        print(
            json.dumps(
                {"machine": info, "results": results, "equal_outputs": all(r["equal_outputs"] for r in results)},
                indent=2,
            )
        )
    else:
        print(markdown(results))
    if a.record:
        record("SwitchMoE dispatch: dense (published) vs sparse", info, command_line(), markdown(results), a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

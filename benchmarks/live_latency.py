"""Benchmark one live example end to end, for every built run in an artifacts root.

Per run: load the adapter (``analysis.live.load_live_adapter``), its base examples, one warm-up
(``warm_up``), then N times: build a live example from a base example with its first declared editable
text field edited (``live_example``) and run it (``run_live``: forward with routing records, routing rows,
prediction and ranking; with ``--attribution`` also integrated gradients, 16 steps). Reports p50 / p95 / max of the
end-to-end wall time (example building included) and the mean of run_live's own timings.

    python benchmarks/live_latency.py --root DIR [--runs A B] [--n 20] [--quick] [--json] [--record]

Without ``--root`` the default artifacts root (``MOESCOPE_ARTIFACTS`` or artifacts/) is used. Target:
p95 within 1 s (without attribution; attribution reported beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import command_line, load_average, machine, record  # noqa: F401

TARGET_P95_S = 1.0


def built_runs(root: Path) -> list[str]:
    return sorted(p.parent.name for p in (root / "runs").glob("*/manifest.json"))


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))]


def bench_run(run: str, root: Path, n: int, attribution: bool) -> dict:
    from analysis.live import live_example, load_base_examples, load_live_adapter, run_live, warm_up

    t0 = time.perf_counter()
    adapter = load_live_adapter(run, root, device="cpu")
    bases = load_base_examples(adapter, run, root)
    load_s = time.perf_counter() - t0
    warm_s = warm_up(adapter, bases[0], attribution=attribution)
    spec = adapter.spec()
    edited = next((f.name for f in spec.editable_fields() if f.kind in ("text", "long_text")), None)
    totals, parts = [], {}
    for i in range(n):
        base = bases[i % len(bases)]
        t = time.perf_counter()
        texts = {edited: f"{base.get(edited) or ''} (edit {i})"} if edited else {}
        ex = live_example(spec, base, texts=texts)
        res = run_live(adapter, ex, attribution=attribution)
        totals.append(time.perf_counter() - t)
        for k, v in res.timings.items():
            parts.setdefault(k, []).append(v)
    return {
        "run": run,
        "family": adapter.family,
        "n": n,
        "attribution": attribution,
        "load_s": round(load_s, 2),
        "warm_up_s": round(warm_s, 2),
        "p50_s": round(statistics.median(totals), 3),
        "p95_s": round(pct(totals, 0.95), 3),
        "max_s": round(max(totals), 3),
        "mean_parts_s": {k: round(statistics.mean(v), 3) for k, v in parts.items()},
        "within_target": pct(totals, 0.95) <= TARGET_P95_S,
        "load_avg_end": load_average(),
    }


def markdown(results: list[dict]) -> str:
    out = [
        "| run | attribution | n | p50 s | p95 s | max s | mean forward / routing / attribution s | load s "
        "| warm-up s | p95 <= 1 s | load avg end |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for r in results:
        p = r["mean_parts_s"]
        out.append(
            f"| {r['run']} | {'yes' if r['attribution'] else 'no'} | {r['n']} | {r['p50_s']:.3f} "
            f"| **{r['p95_s']:.3f}** | {r['max_s']:.3f} | {p.get('forward', 0):.3f} / "
            f"{p.get('routing', 0):.3f} / "
            f"{p.get('attribution', 0):.3f} | {r['load_s']:.1f} | {r['warm_up_s']:.1f} "
            f"| {'met' if r['within_target'] else 'NOT met'} | {r['load_avg_end']} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None)
    ap.add_argument("--runs", nargs="+", default=None, help="default: every run with a manifest in the root")
    ap.add_argument("--n", type=int, default=None, help="examples per run and mode (default 20; --quick 5)")
    ap.add_argument("--attribution", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--note", default=None)
    a = ap.parse_args(argv)
    from analysis.store import resolve_root

    root = Path(resolve_root(a.root))
    runs = a.runs or built_runs(root)
    n = a.n or (5 if a.quick else 20)
    info = machine()
    if not runs:
        print(
            f"no built run (runs/*/manifest.json) under {root}: build one with `python -m analysis.precompute`",
            file=sys.stderr,
        )
        return 1
    modes = {"no": [False], "yes": [True], "both": [False, True]}[a.attribution]
    results = [bench_run(run, root, n, attr) for run in runs for attr in modes]
    body = markdown(results) + (
        f"\n\nRoot: `{root}`; CPU; end-to-end = live_example + run_live. Target p95 <= {TARGET_P95_S:.0f} s.\n"
    )
    if a.json:
        print(
            json.dumps({"machine": info, "root": str(root), "target_p95_s": TARGET_P95_S, "results": results}, indent=2)
        )
    else:
        print(body)
    if a.record:
        record("Live example latency (end to end)", info, command_line(), body, a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

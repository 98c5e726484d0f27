"""Benchmark the cost of routing records: MMoE forward with a RoutingRecorder against without.

Model: the demo MMoE architecture (tiny-64 open_clip towers, hidden 32, 4 experts top-3, expert FFN x2),
randomly initialised, gate ``--gate``. Inputs: B entities and B mentions (random token texts and random
pixels), the same for every mode. Modes, timed interleaved (median over repeats):

* ``off``: ``recorder=None`` (the default; zero cost by design);
* ``on``: ``RoutingRecorder()`` as analysis uses it (detached CPU copies + per-position metadata + token
  strings for display);
* ``on, no token strings``: the same, without decoding token strings;
* ``training``: ``RoutingRecorder(keep_graph=True)`` (tensors kept, no copies, no strings).

    python benchmarks/routing_overhead.py [--quick] [--json] [--record] [--batch 32] [--repeats 20]

Target: records cost at most 10% (on / off <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch  # noqa: E402
from _common import command_line, machine, record  # noqa: F401

from mmoe_core.encoders import EncoderSpec  # noqa: E402
from mmoe_core.families.mmoe.model import build_model  # noqa: E402
from mmoe_core.routing_record import RoutingRecorder  # noqa: E402

TARGET = 1.10


def build(gate: str):
    torch.manual_seed(0)
    return build_model(
        {
            "family": "mmoe",
            "model": dict(
                encoder=EncoderSpec(name="tiny-64").to_dict(),
                image_dim=32,
                text_hidden=32,
                image_hidden=32,
                cross_hidden=32,
                expert_mult=2,
                num_experts=4,
                top_k=3,
                gate=gate,
            ),
        }
    ).eval()


def inputs(model, b: int):
    words = ["Jaguar", "rock", "band", "from", "Italy", "ship", "city", "on", "the", "Nile", "red", "striped"]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(2 * b)]
    ids = model.towers.tokenize(texts)
    s = model.towers.image_size
    pixels = torch.randn(2 * b, 3, s, s, generator=g)
    return ids[:b], pixels[:b], ids[b:], pixels[b:]


def bench(gate: str, b: int, repeats: int) -> dict:
    model = build(gate)
    e_ids, e_pix, m_ids, m_pix = inputs(model, b)

    def run(mode: str):
        if mode == "off":
            rec, strings = None, None
        elif mode == "on":
            rec, strings = RoutingRecorder(), None
        elif mode == "on_no_strings":
            rec, strings = RoutingRecorder(), False
        else:
            rec, strings = RoutingRecorder(keep_graph=True), None
        grad = mode == "training"
        with torch.set_grad_enabled(grad):
            t0 = time.perf_counter()
            if strings is None:
                model(e_ids, e_pix, m_ids, m_pix, recorder=rec)
            else:  # same forward, token strings switched off on both sides
                ents = model.encode_entities(e_ids, e_pix, None, rec, chunk_size=b, token_strings=strings)
                mens = model.encode_mentions(m_ids, m_pix, None, rec, token_strings=strings)
                model.match(ents, mens, chunk_size=b)
            return time.perf_counter() - t0

    modes = ["off", "on", "on_no_strings", "training"]
    for m in modes:  # warm-up
        run(m)
    times = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            times[m].append(run(m))
    med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
    best = {m: min(v) * 1e3 for m, v in times.items()}
    return {
        "gate": gate,
        "batch": b,
        "repeats": repeats,
        "median_ms": {m: round(v, 2) for m, v in med.items()},
        "min_ms": {m: round(v, 2) for m, v in best.items()},
        "ratio_on_off_min": round(best["on"] / best["off"], 3),
        "ratio_on_no_strings_off_min": round(best["on_no_strings"] / best["off"], 3),
        "p95_ms": {m: round(sorted(v)[max(0, int(0.95 * len(v)) - 1)] * 1e3, 2) for m, v in times.items()},
        "ratio_on_off": round(med["on"] / med["off"], 3),
        "ratio_on_no_strings_off": round(med["on_no_strings"] / med["off"], 3),
        "ratio_training_off": round(med["training"] / med["off"], 3),
        "within_target": med["on"] / med["off"] <= TARGET,
    }


def markdown(results: list[dict]) -> str:
    out = [
        "| gate | batch | off ms | on ms | on (no token strings) ms | training (keep_graph) ms | on/off "
        "| no-strings/off | training/off | on/off (min) | no-strings/off (min) | target on/off <= 1.10 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        m = r["median_ms"]
        out.append(
            f"| {r['gate']} | {r['batch']} | {m['off']:.1f} | {m['on']:.1f} | {m['on_no_strings']:.1f} "
            f"| {m['training']:.1f} | **{r['ratio_on_off']:.3f}** | {r['ratio_on_no_strings_off']:.3f} "
            f"| {r['ratio_training_off']:.3f} | {r['ratio_on_off_min']:.3f} | {r['ratio_on_no_strings_off_min']:.3f} "
            f"| {'met' if r['within_target'] else 'NOT met'} |"
        )
    out.append(
        f"\nTimes are medians (ratios also of the minimum, the least disturbed run) over {results[0]['repeats']} interleaved repeats of one forward (B entities + B mentions, "  # noqa: E501
        "tiny-64 towers, hidden 32, E=4 top-3). `training` runs with autograd on (as in training), so its "
        "ratio also contains the autograd cost."
    )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="entities and mentions per forward (default 32; --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="default 20; --quick 10")
    ap.add_argument("--gates", nargs="+", default=["topk_softmax", "mmoe_reference"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--note", default=None)
    a = ap.parse_args(argv)
    repeats = a.repeats or (10 if a.quick else 20)
    a.batch = a.batch or (8 if a.quick else 32)
    info = machine()
    results = [bench(g, a.batch, repeats) for g in a.gates]
    if a.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "target_ratio": TARGET,
                    "results": results,
                    "ratio_on_off": max(r["ratio_on_off"] for r in results),
                    "within_target": all(r["within_target"] for r in results),
                },
                indent=2,
            )
        )
    else:
        print(markdown(results))
    if a.record:
        record("Routing records overhead (MMoE forward)", info, command_line(), markdown(results), a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())

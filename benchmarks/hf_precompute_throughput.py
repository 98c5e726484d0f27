"""Benchmark routing capture of a Hugging Face MoE model: routed token-layer positions per second.

A tiny-width Qwen3-MoE (``Qwen3MoeForCausalLM``: 16 layers, 64 experts, top-8, width 32), built offline
with random weights and saved with ``save_pretrained``, is opened through the registry
(``load_adapter``) and run over generated corpus documents until at least ``--positions`` routed
(token, layer) positions are recorded. Three timings over the same batches:

* ``forward``: ``adapter.run(record=False)``: the model alone (predictions included);
* ``capture``: ``adapter.run(record=True)``: the router hooks' copies and the per-position metadata;
* ``table``: the recorder flattened into the routing table (``analysis.routing_table.routing_frame``
  when present, else :func:`mmoe_core.routing_record.flatten_call`), what precompute stores.

    python benchmarks/hf_precompute_throughput.py [--positions 1000000] [--batch-size 32] [--threads N]
                                                 [--device cpu|cuda] [--json] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, machine, record  # noqa: F401 -- _common puts the repo on sys.path

LAYERS, EXPERTS, TOP_K, WIDTH = 16, 64, 8, 32


def build_model(folder: Path, texts: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from mmoe_core.families.hf_moe.build import build_word_tokenizer, text_moe_config

    tok = build_word_tokenizer(texts)
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    config = text_moe_config(
        "qwen3_moe",
        len(tok),
        hidden=WIDTH,
        layers=LAYERS,
        heads=4,
        experts=EXPERTS,
        top_k=TOP_K,
        expert_hidden=16,
        special_ids=special,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def table_builder():
    try:
        from analysis.routing_table import routing_frame

        return "analysis.routing_table.routing_frame", lambda recorder: len(routing_frame(recorder))
    except ImportError:
        from mmoe_core.routing_record import flatten_call

        return "flatten_call", lambda recorder: sum(len(flatten_call(c)["position"]) for c in recorder.calls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, default=1_000_000, help="routed token-layer positions to reach")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--record", action="store_true", help="append the result to BENCHMARKS.md")
    a = p.parse_args(argv)
    import torch

    from mmoe_core.adapter import load_adapter
    from mmoe_core.families.hf_moe.corpus import build_corpus

    if a.threads:
        torch.set_num_threads(a.threads)
    corpus = build_corpus(0, "default")
    texts = [r["text"] for split in ("train", "dev", "test") for r in corpus[split]]
    with tempfile.TemporaryDirectory(prefix="moescope-hf-bench-") as tmp:
        build_model(Path(tmp), texts)
        adapter = load_adapter(Path(tmp), device=a.device)
        examples = [{"index": i, "id": str(i), "text": t, "labels": {}} for i, t in enumerate(texts)]
        name, build_table = table_builder()
        adapter.run(examples[: a.batch_size], record=True, batch_size=a.batch_size)  # warm-up
        times = {"forward": 0.0, "capture": 0.0, "table": 0.0}
        positions = tokens = batches = 0
        i = 0
        while positions < a.positions:
            batch = [dict(examples[(i + j) % len(examples)], index=i + j) for j in range(a.batch_size)]
            i += a.batch_size
            t0 = time.perf_counter()
            adapter.run(batch, record=False, batch_size=a.batch_size)
            t1 = time.perf_counter()
            out = adapter.run(batch, record=True, batch_size=a.batch_size)
            t2 = time.perf_counter()
            rows = build_table(out.recorder)
            t3 = time.perf_counter()
            times["forward"] += t1 - t0
            times["capture"] += t2 - t1
            times["table"] += t3 - t2
            positions += rows
            tokens += rows // LAYERS
            batches += 1
    result = {
        "model": f"Qwen3MoeForCausalLM, {LAYERS} layers, {EXPERTS} experts top-{TOP_K}, width {WIDTH}",
        "table_builder": name,
        "device": a.device,
        "batch_size": a.batch_size,
        "batches": batches,
        "tokens": tokens,
        "routed_positions": positions,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "positions_per_s": {
            "forward_only": round(positions / times["forward"]),
            "capture": round(positions / times["capture"]),
            "capture_plus_table": round(positions / (times["capture"] + times["table"])),
            "table_only": round(positions / times["table"]),
        },
        "capture_overhead": round(times["capture"] / times["forward"] - 1, 3),
    }
    info = machine()
    if a.json:
        print(json.dumps({"machine": info, **result}, indent=1))
    else:
        print(json.dumps(result, indent=1))
    if a.record:
        pps = result["positions_per_s"]
        body = "\n".join(
            [
                f"{result['model']}, random weights (save_pretrained, opened through the registry); {tokens:,} tokens of "  # noqa: E501
                f"corpus-world documents in {batches} batches of {a.batch_size} -> {positions:,} routed token-layer "
                f"positions; table: `{name}`.",
                "",
                "| stage | seconds | routed positions / s |",
                "|---|---:|---:|",
                f"| forward, no recording | {times['forward']:.1f} | {pps['forward_only']:,} |",
                f"| forward with routing capture | {times['capture']:.1f} | {pps['capture']:,} |",
                f"| routing table from the recorder | {times['table']:.1f} | {pps['table_only']:,} |",
                f"| **capture + table** | {times['capture'] + times['table']:.1f} | **{pps['capture_plus_table']:,}** |",  # noqa: E501
                "",
                f"Capture overhead over the plain forward: {100 * result['capture_overhead']:.1f}%.",
            ]
        )
        record("Hugging Face MoE routing capture throughput", info, command_line(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

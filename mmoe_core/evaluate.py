"""Evaluation CLI: ``python -m mmoe_core.evaluate CKPT_DIR --data DIR --split test [--json] [--modalities ...]``.

Loads the checkpoint through :func:`mmoe_core.adapter.load_adapter`, runs the split and prints the
family's ``summarize`` (MMoE: MRR, MR, Hits@1/3/5/10/20, every mention ranked against the whole KB,
overall and by decisive label; ranks as the published code computes them, see mmoe_core/families/mmoe/ranking.py).
With ``--json`` stdout carries exactly one JSON object; progress always goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mmoe_core.adapter import load_adapter
from mmoe_core.errors import ConfigError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmoe_core.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="test")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    p.add_argument("--modalities", default=None, help="ablation (MMoE): comma-separated subset of text,image,cross")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="default: CUDA when present, else CPU")
    p.add_argument("--snapshot", type=int, default=None, help="evaluate snapshots/step_<N> instead")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--no-progress", action="store_true")
    return p


def _clean(value):
    """JSON-safe: NaN -> None (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def format_summary(summary: dict) -> str:
    """Readable table: one line per slice with every metric."""
    lines = []

    def line(label: str, metrics: dict) -> str:
        cells = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        return f"{label:<24} " + "  ".join(cells)

    for key, value in summary.items():
        if key == "overall":
            lines.append(line("overall", value))
        elif key.startswith("by_") and isinstance(value, dict):
            for slice_value, metrics in value.items():
                lines.append(line(f"{key[3:]}={slice_value}", metrics))
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    modalities: list[str] | None = None,
    batch_size: int = 32,
    device=None,
    snapshot: int | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    adapter = load_adapter(Path(checkpoint), device=device, snapshot=snapshot)
    if modalities:
        if not hasattr(adapter, "modalities"):
            raise ConfigError(f"--modalities: family {adapter.family!r} has no modality ablation")
        unknown = sorted(set(modalities) - set(adapter.modalities))
        if unknown:
            raise ConfigError(
                f"--modalities: {unknown} are not modalities of this model; choose from {', '.join(adapter.modalities)}"
            )
        adapter.modalities = tuple(modalities)
    examples = adapter.load_examples(Path(data), split)
    if limit:
        examples = examples[:limit]
    started = time.perf_counter()
    out = adapter.run(examples, record=False, batch_size=batch_size, progress=progress)
    summary = adapter.summarize(out.predictions, examples)
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "family": adapter.family,
        "examples": len(examples),
        "seconds": round(time.perf_counter() - started, 2),
        **summary,
    }


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    result = evaluate(
        args.checkpoint,
        args.data,
        args.split,
        modalities,
        args.batch_size,
        args.device,
        args.snapshot,
        args.limit,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps(_clean(result), sort_keys=False))
    else:
        header = {k: v for k, v in result.items() if not (k == "overall" or k.startswith("by_"))}
        print(" ".join(f"{k}={v}" for k, v in header.items()))
        print(format_summary({k: v for k, v in result.items() if k == "overall" or k.startswith("by_")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

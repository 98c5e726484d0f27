"""Generate a demo world with known ground truth.

Usage::

    python -m mmoe_core.data.generate --world entity --out artifacts/data/entity --seed 0
    python -m mmoe_core.data.generate --world qa --out artifacts/data/qa --seed 0 --scale tiny

``--world entity`` writes a multimodal entity-linking set in the MIMIC / MEL-MMoE layout
(``kb_entity.json``, ``qid2id.json``, ``DEMO_{train,dev,test}.json``, ``kb_image/``,
``mention_image/``) plus ``ground_truth.json`` (decisive modality and candidate sets per mention)
and ``world.json``. See :mod:`mmoe_core.data.entity_world` for what makes each label true.

``--world qa`` writes a product question-answering set (``qa_{train,dev,test}.jsonl``,
``products.jsonl``, ``images/``, ``world.json``). See :mod:`mmoe_core.data.qa_world`.

The output is a pure function of (world, seed, scale): the same arguments give byte-identical files.
The world is built in a sibling temporary folder, checked, and only then moved to ``--out``; an
existing ``--out`` is replaced only if it is a previously generated world (it holds ``world.json``)
or empty, never an arbitrary folder. A failed check raises and leaves ``--out`` untouched.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .entity_world import build_entity_world, check_entity_world, write_entity_world
from .qa_world import build_qa_world, check_qa_world, write_qa_world

__all__ = ["generate_entity_world", "generate_qa_world", "check_entity_world", "check_qa_world", "main"]

SCALE_NAMES = ("tiny", "default")


class WorldCheckError(RuntimeError):
    """The generated world broke one of its own guarantees (a generator bug)."""


def _replaceable(out_dir: Path) -> bool:
    return not out_dir.exists() or (out_dir / "world.json").is_file() or not any(out_dir.iterdir())


def _build_then_swap(out_dir: str | Path, write: Callable[[Path], None], check: Callable[[Path], list[str]]) -> Path:
    """Write into ``<out>.partial``, check it, then atomically take the place of ``out``."""
    out_dir = Path(out_dir)
    if not _replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a generated world (no world.json); refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        write(partial)
        problems = check(partial)
        if problems:
            shown = "\n  ".join(problems[:20])
            raise WorldCheckError(f"generated world violates {len(problems)} guarantees:\n  {shown}")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def generate_entity_world(out_dir: str | Path, seed: int = 0, scale: str = "default", progress: bool = True) -> Path:
    """Generate, check and write the entity world; returns ``out_dir``. Raises WorldCheckError on violations."""
    _check_scale(scale)
    world = build_entity_world(seed=seed, scale=scale)
    return _build_then_swap(out_dir, lambda d: write_entity_world(world, d, progress), check_entity_world)


def generate_qa_world(out_dir: str | Path, seed: int = 0, scale: str = "default", progress: bool = True) -> Path:
    """Generate, check and write the product QA world; returns ``out_dir``. Raises WorldCheckError on violations."""
    _check_scale(scale)
    world = build_qa_world(seed=seed, scale=scale)
    return _build_then_swap(out_dir, lambda d: write_qa_world(world, d, progress), check_qa_world)


def _check_scale(scale: str) -> None:
    if scale not in SCALE_NAMES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALE_NAMES}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmoe_core.data.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=("entity", "qa"), required=True, help="which demo world to write")
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced if it holds a previous world)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument(
        "--scale",
        choices=SCALE_NAMES,
        default="default",
        help="'default' for the demo, 'tiny' for tests (default: default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    generate = generate_entity_world if args.world == "entity" else generate_qa_world
    started = time.perf_counter()
    out = generate(args.out, seed=args.seed, scale=args.scale, progress=not args.quiet)
    print(
        f"wrote {args.world} world (seed {args.seed}, scale {args.scale}) to {out} "
        f"in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

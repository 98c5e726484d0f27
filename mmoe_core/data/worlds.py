"""The built-in generated worlds ("entity", "qa") as :class:`mmoe_core.registry.World` entries.

A world folder is up to date when its ``world.json`` names the same scale and seed (the generators
are pure functions of world, seed and scale: see :mod:`mmoe_core.data.generate`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mmoe_core.registry import World, register_world


def world_is_built(out_dir: Path, scale: str, seed: int) -> bool:
    info = Path(out_dir) / "world.json"
    if not info.is_file():
        return False
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("scale") == scale and meta.get("seed") == seed


def build_entity_world(out_dir: Path, scale: str, seed: int) -> None:
    from mmoe_core.data.generate import generate_entity_world

    generate_entity_world(out_dir, seed=seed, scale=scale, progress=False)


def build_qa_world(out_dir: Path, scale: str, seed: int) -> None:
    from mmoe_core.data.generate import generate_qa_world

    generate_qa_world(out_dir, seed=seed, scale=scale, progress=False)


ENTITY = register_world(
    World(
        "entity",
        build_entity_world,
        world_is_built,
        "entity linking: a KB of entities sharing ambiguous names, mentions with pictures "
        "(MIMIC / MEL-MMoE layout); ground truth: the decisive modality",
    )
)
QA = register_world(
    World(
        "qa",
        build_qa_world,
        world_is_built,
        "product QA: products with a picture and a context, questions of many types (QA jsonl); "
        "ground truth: the answer source",
    )
)

"""What the MMoE model reads: entity and mention texts, images, the KB's inputs, and adapter examples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmoe_core.encoders import ClipTowers
from mmoe_core.families.mmoe.config import SEP


def entity_text(name: str, desc: str) -> str:
    """Published entity input: ``entity_name [SEP] desc``."""
    return f"{name}{SEP}{desc}"


def mention_text(mention: str, sentence: str, desc: str | None = None) -> str:
    """Published mention input ``mention [SEP] sentence [SEP] desc``; the desc part only when given.

    In the published release the mention 'desc' is an extra description (DME's choice); in the demo
    world it is the *gold* entity's description (it gives the answer away), so by default it is left out
    (``mention_desc="none"``); ``"dataset"`` reads it as published, ``"dme"`` appends DME's choice.
    """
    text = f"{mention}{SEP}{sentence}"
    return f"{text}{SEP}{desc}" if desc else text


def _open_image(path):
    try:
        from mmoe_core.data.readers import load_image
    except ImportError:  # data layer not importable: plain PIL
        from PIL import Image

        def load_image(p):
            return Image.open(p).convert("RGB")

    return load_image(path)


def pixels_for(towers: ClipTowers, images: Sequence) -> Tensor:
    """Preprocess images (PIL, a path, or None for 'no image' -> zeros, as published)."""
    loaded = [(_open_image(img) if isinstance(img, (str, Path)) else img) for img in images]
    return towers.preprocess(loaded)


@dataclass
class KBInputs:
    """Tokenised texts and preprocessed images of every KB entity (row = entity index)."""

    ids: Tensor  # [N, L]
    first_pixels: Tensor  # [N, 3, S, S] the first image (eval, as published), zeros if none
    all_pixels: Tensor  # [M, 3, S, S] every image of every entity (training only; else empty)
    image_rows: list[list[int]]  # rows of all_pixels per entity (empty: no image)
    names: list[str]
    qids: list[str]


def kb_inputs(towers: ClipTowers, entities: Sequence, all_images: bool = False) -> KBInputs:
    """Entities sorted by index, each image loaded once; ``all_images`` keeps every image (training
    picks one at random), else only the first one (evaluation, as published)."""
    entities = sorted(entities, key=lambda e: e.index)
    if [e.index for e in entities] != list(range(len(entities))):
        raise ValueError("entity indices must be 0..N-1")
    ids = towers.tokenize([entity_text(e.name, e.desc) for e in entities])
    zero = torch.zeros(1, 3, towers.image_size, towers.image_size)
    if not all_images:
        first = pixels_for(towers, [e.images[0] if e.images else None for e in entities])
        return KBInputs(
            ids, first, zero[:0], [[] for _ in entities], [e.name for e in entities], [e.id for e in entities]
        )
    paths, rows = [], []
    for e in entities:
        rows.append(list(range(len(paths), len(paths) + len(e.images))))
        paths.extend(e.images)
    all_pixels = pixels_for(towers, paths)
    first = torch.cat([all_pixels[r[0] : r[0] + 1] if r else zero for r in rows]) if rows else zero[:0]
    return KBInputs(ids, first, all_pixels, rows, [e.name for e in entities], [e.id for e in entities])


# ---------------------------------------------------------------------------------------------
# Examples (the adapter's vocabulary) from an entity dataset
# ---------------------------------------------------------------------------------------------


def _entity_type(dataset, mention) -> str:
    gt = (dataset.ground_truth or {}).get("mentions", {}).get(mention.id, {}) if dataset.ground_truth else {}
    return str(mention.meta.get("entity_type") or gt.get("entity_type") or "unknown")


def examples_from_dataset(dataset, split: str) -> list[dict]:
    """Adapter examples of one split. ``text`` is left to the adapter (it may add a DME description)."""
    examples = []
    for i, m in enumerate(dataset.splits[split]):
        group = dataset.name_groups.get(m.mention) or dataset.name_groups.get(m.entity_name) or []  # shares its name
        examples.append(
            {
                "index": i,
                "id": m.id,
                "split": split,
                "labels": {
                    "decisive": m.decisive or "unknown",
                    "entity_type": _entity_type(dataset, m),
                    "has_image": "yes" if m.image is not None else "no",
                },
                "mention": m.mention,
                "sentence": m.sentence,
                "dataset_desc": m.desc,
                "image_path": str(m.image) if m.image is not None else None,
                "gold_index": int(m.answer_index),
                "gold_qid": m.answer_qid,
                "gold_name": m.entity_name,
                "candidates": [e.index for e in group],
            }
        )
    return examples


def read_dataset(data_dir: Path, splits: Sequence[str] = ("train", "dev", "test")):
    from mmoe_core.data.readers import read_entity_dataset

    return read_entity_dataset(Path(data_dir), splits=tuple(splits))

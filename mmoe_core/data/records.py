"""Typed records for entity-linking and product-QA datasets, as produced by :mod:`mmoe_core.data.readers`.

They are frozen: a dataset read once is shared (e.g. cached by the app) and must not be mutated.
``meta`` dicts carry optional extras (ground truth of a demo world, fields a real set adds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path


@dataclass(frozen=True)
class Entity:
    """A knowledge-base entity. ``index`` is its row in the KB (from qid2id.json, id-sorted order)."""

    id: str
    index: int
    name: str
    desc: str
    images: tuple[Path, ...]


@dataclass(frozen=True)
class Mention:
    """A linked mention. ``decisive`` is 'text', 'image' or 'both' in a demo world, None for real sets.

    ``meta`` holds the record's fields beyond the published ones, then the demo ground truth entry
    (name group, candidate sets, stated attributes, ...) when the folder has one.
    """

    id: str
    mention: str
    entity_name: str
    sentence: str
    image: Path | None
    answer_qid: str
    answer_index: int
    desc: str
    decisive: str | None
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class EntityDataset:
    """A MIMIC / MEL-MMoE folder: the KB (sorted by id, as the published loader does) and mention splits.

    ``nil_skipped`` counts the mentions per split whose answer was "nil" (dropped, as the published
    code does). ``warnings`` lists oddities that do not stop reading (e.g. qid2id not in id order).
    """

    root: Path
    name: str
    entities: list[Entity]
    splits: dict[str, list[Mention]]
    nil_skipped: dict[str, int]
    ground_truth: dict | None = None
    warnings: tuple[str, ...] = ()

    @cached_property
    def by_qid(self) -> dict[str, Entity]:
        return {e.id: e for e in self.entities}

    @cached_property
    def name_groups(self) -> dict[str, list[Entity]]:
        """Entities per name (in KB order): the candidates a mention of that name is ambiguous between."""
        groups: dict[str, list[Entity]] = {}
        for e in self.entities:
            groups.setdefault(e.name, []).append(e)
        return groups

    def mentions(self) -> list[Mention]:
        return [m for split in self.splits.values() for m in split]


@dataclass(frozen=True)
class QAItem:
    """A question about a product. ``answer_source`` is 'image', 'context' or 'both' when known."""

    id: str
    product_id: str | None
    question: str
    answer: str
    question_type: str | None
    answer_source: str | None
    context: str
    image: Path | None
    category: str | None
    context_conflict: bool | None
    meta: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class QADataset:
    """A QA jsonl folder: questions per split, products by id (when products.jsonl exists), world.json if any."""

    root: Path
    splits: dict[str, list[QAItem]]
    products: dict[str, dict] = field(default_factory=dict)
    world: dict | None = None

    def items(self) -> list[QAItem]:
        return [q for split in self.splits.values() for q in split]

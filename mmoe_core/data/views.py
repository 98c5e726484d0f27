"""Declared views of the data worlds: what a dataset browser shows of each world, as plain data.

A :class:`DatasetView` names a world (its folder is ``<artifacts>/data/<world>``) and lists its tables
(:class:`TableView`): how to read the table from the world's folder, which columns to filter by, which
column holds the split, the picture and the title of a row, the columns to show for one row, and
optionally the rows related to it (e.g. the knowledge-base entries a mention must be told apart from).
The dataset browser page builds itself from these; a world defined elsewhere (a plug-in, a test) adds
its own view with :func:`register_view`. Reading goes through :mod:`mmoe_core.data.readers`, the same
readers a user points at real data.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

__all__ = ["TableView", "DatasetView", "register_view", "views", "world_stamp"]


@dataclass(frozen=True)
class TableView:
    name: str  # the tab's title, e.g. "Entities"
    description: str
    read: Callable[[Path], pd.DataFrame]  # (world folder) -> the table
    filters: tuple[str, ...] = ()  # categorical columns offered as multi-select filters
    split: str = ""  # the column holding the split (offered as one choice)
    key: str = "id"  # the column a row is picked by
    title: str = ""  # the column that is a row's one-line text
    image: str = ""  # the column holding a picture path for the picked row
    details: tuple[str, ...] = ()  # columns shown for the picked row, in this order
    long_text: str = ""  # a column shown in full under the picked row
    gallery: bool = False  # show the pictures of the (filtered) rows as cards
    related: Callable[[Path, str], pd.DataFrame] | None = None  # (folder, key) -> rows related to one row
    related_title: str = ""  # e.g. "Candidates sharing the name"


@dataclass(frozen=True)
class DatasetView:
    world: str  # the world's folder name under <artifacts>/data
    title: str
    description: str
    tables: tuple[TableView, ...] = field(default_factory=tuple)


_VIEWS: dict[str, DatasetView] = {}


def register_view(view: DatasetView) -> DatasetView:
    _VIEWS[view.world] = view
    return view


def views() -> list[DatasetView]:
    """Every registered view, the built-in worlds first."""
    return list(_VIEWS.values())


def world_stamp(root: Path) -> float:
    """Changes when a world is regenerated (its ``world.json`` marker), for caches."""
    marker = Path(root) / "world.json"
    return marker.stat().st_mtime if marker.is_file() else 0.0


# ----------------------------------------------------------------------------------------- built-in worlds


@functools.lru_cache(maxsize=4)
def _entities(root: str, stamp: float):
    from mmoe_core.data.readers import read_entity_dataset

    return read_entity_dataset(root)


def _entity_data(root: Path):
    return _entities(str(root), world_stamp(root))


def _entity_rows(root: Path) -> pd.DataFrame:
    from mmoe_core.data.readers import entity_table

    ds = _entity_data(root)
    table = entity_table(ds)
    table["image_path"] = [str(e.images[0]) if e.images else None for e in ds.entities]
    return table


def _mention_rows(root: Path) -> pd.DataFrame:
    from mmoe_core.data.readers import mention_table

    ds = _entity_data(root)
    table = mention_table(ds)
    table["image_path"] = [str(m.image) if m.image is not None else None for ms in ds.splits.values() for m in ms]
    return table


def _candidates(root: Path, mention_id: str) -> pd.DataFrame:
    """Entities sharing the gold entity's name, marked gold / fits the text / fits the picture."""
    from mmoe_core.data.readers import candidates_for, entity_type

    ds = _entity_data(root)
    mention = next(m for m in ds.mentions() if m.id == mention_id)
    fits_text = set(mention.meta.get("text_candidates", []))
    fits_image = set(mention.meta.get("image_candidates", []))
    rows = []
    for e in candidates_for(ds, mention):
        marks = [
            "gold" if e.id == mention.answer_qid else "",
            "fits text" if e.id in fits_text else "",
            "fits image" if e.id in fits_image else "",
        ]
        rows.append(
            {
                "id": e.id,
                "name": e.name,
                "type": entity_type(ds, e.id) or "entity",
                "desc": e.desc,
                "image_path": str(e.images[0]) if e.images else None,
                "marks": " · ".join(m for m in marks if m),
            }
        )
    return pd.DataFrame(rows)


def _qa_rows(root: Path) -> pd.DataFrame:
    from mmoe_core.data.readers import qa_table, read_qa_dataset

    ds = read_qa_dataset(root)
    table = qa_table(ds)
    items = [q for qs in ds.splits.values() for q in qs]
    table["image_path"] = [str(q.image) if q.image is not None else None for q in items]
    table["context"] = [q.context for q in items]
    return table


register_view(
    DatasetView(
        "entity",
        "Entity world",
        "A knowledge base of entities sharing a few ambiguous names, and mentions of them "
        "(a sentence and, mostly, a picture) with the modality that decides each one.",
        (
            TableView(
                "Entities",
                "the knowledge base",
                _entity_rows,
                filters=("type", "name"),
                title="name",
                image="image_path",
                details=("name", "id", "type", "name_group_size"),
                long_text="desc",
                gallery=True,
            ),
            TableView(
                "Mentions",
                "linked mentions; nil mentions are skipped, as the published loader does",
                _mention_rows,
                filters=("decisive", "entity_type", "has_image"),
                split="split",
                title="sentence",
                image="image_path",
                details=("mention", "entity_name", "answer_qid", "entity_type", "decisive", "n_candidates"),
                long_text="sentence",
                related=_candidates,
                related_title="Candidates sharing the name",
            ),
        ),
    )
)

register_view(
    DatasetView(
        "qa",
        "Product QA world",
        "Products with a picture and a context text, and questions whose answer lives in "
        "the picture, the context, or both.",
        (
            TableView(
                "QA items",
                "questions about products",
                _qa_rows,
                filters=("question_type", "answer_source", "category"),
                split="split",
                title="question",
                image="image_path",
                details=("question", "answer", "question_type", "answer_source", "category", "context_conflict"),
                long_text="context",
            ),
        ),
    )
)


CORPUS_SPLITS = ("train", "dev", "test")


def _corpus_rows(root: Path) -> pd.DataFrame:
    """The documents of the corpus world (``corpus_<split>.jsonl``, plain JSONL records), labels as columns."""
    from mmoe_core.data.jsonl_records import read_jsonl

    rows = []
    for split in CORPUS_SPLITS:
        path = Path(root) / f"corpus_{split}.jsonl"
        if path.is_file():
            for ex in read_jsonl(path, check_images=False):
                rows.append(
                    {
                        "id": ex["id"],
                        "split": split,
                        **ex["labels"],
                        "words": len(ex["text"].split()),
                        "text": ex["text"],
                    }
                )
    if not rows:
        from mmoe_core.data.readers import DatasetError

        raise DatasetError(f"{root}: no corpus_<split>.jsonl files")
    return pd.DataFrame(rows)


register_view(
    DatasetView(
        "corpus",
        "Corpus world",
        "Documents of four known domains (entity sentences, product descriptions, arithmetic, code-like lines) "
        "for a text MoE language model; the domain is the ground truth for expert specialisation.",
        (
            TableView(
                "Documents",
                "plain JSONL records, the format a user's own text data takes",
                _corpus_rows,
                filters=("domain",),
                split="split",
                title="text",
                details=("id", "domain", "words"),
                long_text="text",
            ),
        ),
    )
)

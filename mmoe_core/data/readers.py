"""Readers for the two dataset layouts the project serves, real or generated.

Entity linking: the MIMIC / MEL-MMoE folder used by WikiMEL, RichpediaMEL and WikiDiverse::

    kb_entity.json          [{"id": "Q…", "type": "entity", "entity_name", "desc", "image_list": [...]}]
    qid2id.json             one line: {"Q…": row index of the entity in the id-sorted KB}
    <NAME>_train.json       [{"id", "mentions", "entities", "sentence", "imgPath", "answer", "desc"}]
    <NAME>_dev.json, <NAME>_test.json
    kb_image/, mention_image/
    ground_truth.json       optional, demo worlds only (decisive modality, candidate sets)

``desc`` on mentions is optional (MEL-MMoE adds it; the original MIMIC files lack it). As in the
published loader, KB entities are sorted by id, names are URL-unquoted, "nil" answers are dropped
(and counted here), and a mention ``imgPath`` may be stored as ``mention_image/<stem>.jpg``.

Product QA: ``qa_{train,dev,test}.jsonl`` (one question per line), optional ``products.jsonl``,
``images/`` and ``world.json``.

Every problem with the input raises :class:`DatasetError` naming the file, the record (0-based
position in the file) and the field. The input is untrusted: every file is capped in size
(:data:`MAX_DATA_FILE_BYTES`), fields are type-checked (ground truth included), and picture paths must stay
inside the dataset folder (no ``..``, not absolute, no symlink out; :mod:`mmoe_core.data.images`); with
``check_images`` every picture is also checked to be a PNG, JPEG or WebP within the pixel cap (its header
only), and pictures are decoded with the same checks (:func:`load_image`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from PIL import Image

from .errors import DatasetError
from .images import check_image_file, open_image_checked, safe_relative_path
from .records import Entity, EntityDataset, Mention, QADataset, QAItem

if TYPE_CHECKING:  # pandas is only needed by the table helpers
    import pandas as pd

__all__ = [
    "DatasetError",
    "read_entity_dataset",
    "read_qa_dataset",
    "load_image",
    "detect_dataset_name",
    "candidates_for",
    "entity_type",
    "entity_table",
    "mention_table",
    "qa_table",
]

ENTITY_FIELDS = {"id": str, "entity_name": str, "desc": str, "image_list": list}
MENTION_FIELDS = {"id": str, "mentions": str, "entities": str, "sentence": str, "imgPath": str, "answer": str}
QA_FIELDS = {"id": str, "question": str, "answer": str, "context": str, "image": str}
ANSWER_SOURCES = ("image", "context", "both")
DECISIVE = ("text", "image", "both")
NIL = "nil"
MAX_DATA_FILE_BYTES = 2 * 1024**3  # one JSON / JSONL file of a dataset (the largest published KBs are far below)


def _where(file_name: str, index: int | None = None, field: str | None = None) -> str:
    parts = [file_name] if index is None else [f"{file_name} record {index}"]
    if field is not None:
        parts.append(f"field {field!r}")
    return ": ".join(parts)


def _fail(file_name: str, index: int | None, field: str | None, message: str) -> DatasetError:
    return DatasetError(f"{_where(file_name, index, field)}: {message}")


# ------------------------------------------------------------------------------------------- loading


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise _fail(path.name, None, None, f"file not found in {path.parent}")
    size = path.stat().st_size
    if size > MAX_DATA_FILE_BYTES:
        raise _fail(
            path.name,
            None,
            None,
            f"{size / 1e9:.1f} GB is above the {MAX_DATA_FILE_BYTES / 1e9:.1f} GB a dataset file may have",
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(path.name, None, None, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _fail(path.name, None, None, f"cannot be read ({exc.strerror or exc})") from None


def _picture(root: Path, value: str, subdir: str, check_images: bool, file_name: str, index: int, field: str) -> Path:
    """The path of a record's picture, inside the folder; with ``check_images`` a picture within the limits."""
    try:
        path = safe_relative_path(root, value, subdir)
        if check_images:
            check_image_file(path, root)
    except DatasetError as exc:
        raise _fail(file_name, index, field, str(exc)) from None
    return path


def _parse_json(text: str, file_name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(file_name, None, None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _load_json_list(path: Path) -> list:
    data = _parse_json(_read_text(path), path.name)
    if not isinstance(data, list):
        raise _fail(path.name, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _load_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    rows = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise _fail(
                path.name, len(rows), None, f"invalid JSON on line {line_number} column {e.colno}: {e.msg}"
            ) from None
    return rows


def _check_fields(record: Any, required: dict[str, type], file_name: str, index: int) -> dict:
    if not isinstance(record, dict):
        raise _fail(file_name, index, None, f"expected a JSON object, got {type(record).__name__}")
    for name, expected in required.items():
        if name not in record:
            raise _fail(file_name, index, name, "missing field")
        if not isinstance(record[name], expected):
            raise _fail(file_name, index, name, f"expected {expected.__name__}, got {type(record[name]).__name__}")
    return record


def _read_qid2id(root: Path) -> dict[str, int]:
    text = _read_text(root / "qid2id.json")
    # The published loader reads only the first line; accept a pretty-printed file too.
    first_line = text.split("\n", 1)[0]
    try:
        mapping = json.loads(first_line)
    except json.JSONDecodeError:
        mapping = _parse_json(text, "qid2id.json")
    if not isinstance(mapping, dict):
        raise _fail("qid2id.json", None, None, "expected a JSON object {QID: index}")
    for qid, index in mapping.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise _fail("qid2id.json", None, qid, f"expected an integer index, got {index!r}")
    return mapping


# ------------------------------------------------------------------------------------ entity linking


def detect_dataset_name(root: str | Path) -> str:
    """NAME of the single ``NAME_train.json`` in ``root``."""
    root = Path(root)
    names = sorted(p.name[: -len("_train.json")] for p in root.glob("*_train.json"))
    if len(names) != 1:
        found = ", ".join(f"{n}_train.json" for n in names) or "none"
        raise DatasetError(
            f"{root}: expected exactly one *_train.json to name the dataset, found {found}; pass name= explicitly"
        )
    return names[0]


def _read_entities(root: Path, qid2id: dict[str, int], check_images: bool) -> tuple[list[Entity], list[str]]:
    file_name = "kb_entity.json"
    raw = _load_json_list(root / file_name)
    entities, seen = [], set()
    for i, record in enumerate(raw):
        _check_fields(record, ENTITY_FIELDS, file_name, i)
        qid = record["id"]
        if qid in seen:
            raise _fail(file_name, i, "id", f"duplicate QID {qid!r}")
        seen.add(qid)
        if qid not in qid2id:
            raise _fail(file_name, i, "id", f"QID {qid!r} not in qid2id.json")
        images = []
        for image_name in record["image_list"]:
            if not isinstance(image_name, str):
                raise _fail(file_name, i, "image_list", f"expected file names, got {image_name!r}")
            images.append(_picture(root, image_name, "kb_image", check_images, file_name, i, "image_list"))
        entities.append(
            Entity(
                id=qid,
                index=qid2id[qid],
                name=unquote(record["entity_name"]),
                desc=record["desc"],
                images=tuple(images),
            )
        )
    entities.sort(key=lambda e: e.id)  # the published loader's KB order
    warnings = []
    if any(e.index != position for position, e in enumerate(entities)):
        warnings.append("qid2id.json indices do not follow the id-sorted KB order; entity.index follows qid2id.json")
    return entities, warnings


def _mention_image_candidates(root: Path, img_path: str) -> list[str]:
    """The literal ``mention_image/<imgPath>``, then the published loader's ``mention_image/<stem>.jpg``."""
    stem = img_path.split("/")[-1].split(".")[0]
    return [img_path] if img_path == f"{stem}.jpg" else [img_path, f"{stem}.jpg"]


def _resolve_mention_image(root: Path, img_path: str, check_images: bool, file_name: str, index: int) -> Path | None:
    if img_path == "":
        return None
    candidates = _mention_image_candidates(root, img_path)
    for name in candidates:
        path = _picture(root, name, "mention_image", False, file_name, index, "imgPath")
        if path.is_file():
            return _picture(root, name, "mention_image", check_images, file_name, index, "imgPath")
    if check_images:
        tried = " or ".join(f"mention_image/{name}" for name in candidates)
        raise _fail(file_name, index, "imgPath", f"image not found: tried {tried}")
    return _picture(root, candidates[0], "mention_image", False, file_name, index, "imgPath")


def _read_mentions(
    root: Path,
    file_name: str,
    qid2id: dict[str, int],
    by_qid: dict[str, Entity],
    truth: dict | None,
    check_images: bool,
) -> tuple[list[Mention], int]:
    raw = _load_json_list(root / file_name)
    truth_mentions = (truth or {}).get("mentions", {})
    mentions, nil = [], 0
    for i, record in enumerate(raw):
        _check_fields(record, MENTION_FIELDS, file_name, i)
        if "desc" in record and not isinstance(record["desc"], str):
            raise _fail(file_name, i, "desc", f"expected str, got {type(record['desc']).__name__}")
        answer = record["answer"]
        if answer == NIL:
            nil += 1
            continue
        if answer not in qid2id:
            raise _fail(file_name, i, "answer", f"unknown QID {answer!r} (not in qid2id.json)")
        if answer not in by_qid:
            raise _fail(file_name, i, "answer", f"QID {answer!r} is in qid2id.json but not in kb_entity.json")
        # Fields beyond the published ones (a real set's extras), then the demo ground truth if any.
        extras = {k: v for k, v in record.items() if k not in MENTION_FIELDS and k != "desc"}
        truth_entry = truth_mentions.get(record["id"], {})
        meta = {**extras, **truth_entry}  # entries were type-checked by _read_ground_truth
        mentions.append(
            Mention(
                id=record["id"],
                mention=unquote(record["mentions"]),
                entity_name=unquote(record["entities"]),
                sentence=record["sentence"],
                image=_resolve_mention_image(root, record["imgPath"], check_images, file_name, i),
                answer_qid=answer,
                answer_index=qid2id[answer],
                desc=record.get("desc", ""),
                decisive=truth_entry.get("decisive"),
                meta=meta,
            )
        )
    return mentions, nil


def _read_ground_truth(root: Path) -> dict | None:
    path = root / "ground_truth.json"
    if not path.is_file():
        return None
    truth = _parse_json(_read_text(path), path.name)
    if not isinstance(truth, dict) or not isinstance(truth.get("mentions", {}), dict):
        raise _fail(path.name, None, "mentions", "expected an object with a 'mentions' object")
    for mention_id, entry in truth.get("mentions", {}).items():
        if not isinstance(entry, dict):
            raise _fail(path.name, None, f"mentions.{mention_id}", f"expected an object, got {type(entry).__name__}")
        if entry.get("decisive") is not None and entry["decisive"] not in DECISIVE:
            raise _fail(
                path.name, None, f"mentions.{mention_id}.decisive", f"{entry['decisive']!r} is not one of {DECISIVE}"
            )
    entities = truth.get("entities", {})
    if not isinstance(entities, dict):
        raise _fail(path.name, None, "entities", "expected an object {QID: {...}}")
    for qid, entry in entities.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type", ""), str):
            raise _fail(path.name, None, f"entities.{qid}", "expected an object with a string 'type'")
    return truth


def read_entity_dataset(
    root: str | Path,
    name: str | None = None,
    splits: Iterable[str] = ("train", "dev", "test"),
    check_images: bool = True,
) -> EntityDataset:
    """Read a MIMIC / MEL-MMoE folder (real or demo) into typed records.

    ``name`` is the file prefix (``WIKIMEL`` for ``WIKIMEL_train.json``); detected when None.
    ``check_images`` makes every listed image file that is missing an error.
    """
    root = Path(root)
    name = name or detect_dataset_name(root)
    qid2id = _read_qid2id(root)
    entities, warnings = _read_entities(root, qid2id, check_images)
    by_qid = {e.id: e for e in entities}
    truth = _read_ground_truth(root)
    read_splits, nil_skipped = {}, {}
    for split in splits:
        read_splits[split], nil_skipped[split] = _read_mentions(
            root, f"{name}_{split}.json", qid2id, by_qid, truth, check_images
        )
    return EntityDataset(
        root=root,
        name=name,
        entities=entities,
        splits=read_splits,
        nil_skipped=nil_skipped,
        ground_truth=truth,
        warnings=tuple(warnings),
    )


# ------------------------------------------------------------------------------------------ product QA


def _optional(record: dict, field: str, expected: type, file_name: str, index: int) -> Any:
    value = record.get(field)
    if value is not None and not isinstance(value, expected):
        raise _fail(file_name, index, field, f"expected {expected.__name__}, got {type(value).__name__}")
    return value


def _read_products(root: Path) -> dict[str, dict]:
    path = root / "products.jsonl"
    if not path.is_file():
        return {}
    products = {}
    for i, (_, record) in enumerate(_load_jsonl(path)):
        _check_fields(record, {"id": str}, path.name, i)
        products[record["id"]] = record
    return products


def _qa_item(
    record: Any, root: Path, file_name: str, index: int, products: dict[str, dict], check_images: bool
) -> QAItem:
    _check_fields(record, QA_FIELDS, file_name, index)
    source = _optional(record, "answer_source", str, file_name, index)
    if source is not None and source not in ANSWER_SOURCES:
        raise _fail(file_name, index, "answer_source", f"{source!r} is not one of {ANSWER_SOURCES}")
    product_id = _optional(record, "product_id", str, file_name, index)
    if products and product_id is not None and product_id not in products:
        raise _fail(file_name, index, "product_id", f"unknown product {product_id!r} (not in products.jsonl)")
    image = _picture(root, record["image"], "", check_images, file_name, index, "image") if record["image"] else None
    known = set(QA_FIELDS) | {"answer_source", "product_id", "question_type", "category", "context_conflict"}
    return QAItem(
        id=record["id"],
        product_id=product_id,
        question=record["question"],
        answer=record["answer"],
        question_type=_optional(record, "question_type", str, file_name, index),
        answer_source=source,
        context=record["context"],
        image=image,
        category=_optional(record, "category", str, file_name, index),
        context_conflict=_optional(record, "context_conflict", bool, file_name, index),
        meta={k: v for k, v in record.items() if k not in known},
    )


def read_qa_dataset(
    root: str | Path, check_images: bool = True, splits: Iterable[str] = ("train", "dev", "test")
) -> QADataset:
    """Read a QA jsonl folder (``qa_<split>.jsonl`` plus optional products.jsonl and world.json)."""
    root = Path(root)
    products = _read_products(root)
    world_path = root / "world.json"
    world = _parse_json(_read_text(world_path), world_path.name) if world_path.is_file() else None
    if world is not None and not isinstance(world, dict):
        raise _fail(world_path.name, None, None, f"expected a JSON object, got {type(world).__name__}")
    read_splits = {}
    for split in splits:
        file_name = f"qa_{split}.jsonl"
        rows = _load_jsonl(root / file_name)
        read_splits[split] = [
            _qa_item(record, root, file_name, i, products, check_images) for i, (_, record) in enumerate(rows)
        ]
    return QADataset(root=root, splits=read_splits, products=products, world=world)


# -------------------------------------------------------------------------------------------- images


def load_image(
    path: str | Path, size: int | tuple[int, int] | None = None, root: str | Path | None = None
) -> Image.Image:
    """Open an image as RGB (PNG, JPEG or WebP within the pixel cap: :func:`open_image_checked`; ``root``:
    the folder it must lie in), optionally resized (``size`` px square, or (width, height)) with Lanczos."""
    image = open_image_checked(path, root)
    if size is not None:
        image = image.resize((size, size) if isinstance(size, int) else tuple(size), Image.Resampling.LANCZOS)
    return image


# ----------------------------------------------------------------------------- tables for the browser


def entity_type(ds: EntityDataset, qid: str) -> str | None:
    """The entity's type from the demo ground truth; None for real sets."""
    return ((ds.ground_truth or {}).get("entities", {}).get(qid) or {}).get("type")


def candidates_for(ds: EntityDataset, mention: Mention) -> list[Entity]:
    """KB entities sharing the gold entity's name: the ones a mention of that name must be told apart from."""
    gold = ds.by_qid[mention.answer_qid]
    return ds.name_groups.get(gold.name, [gold])


def entity_table(ds: EntityDataset) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "index": e.index,
                "id": e.id,
                "name": e.name,
                "type": entity_type(ds, e.id),
                "name_group_size": len(ds.name_groups[e.name]),
                "n_images": len(e.images),
                "desc": e.desc,
            }
            for e in ds.entities
        ]
    )


def mention_table(ds: EntityDataset) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "split": split,
                "id": m.id,
                "mention": m.mention,
                "sentence": m.sentence,
                "has_image": m.image is not None,
                "answer_qid": m.answer_qid,
                "answer_index": m.answer_index,
                "entity_name": m.entity_name,
                "entity_type": entity_type(ds, m.answer_qid),
                "decisive": m.decisive,
                "n_candidates": len(candidates_for(ds, m)),
            }
            for split, mentions in ds.splits.items()
            for m in mentions
        ]
    )


def qa_table(ds: QADataset) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "split": split,
                "id": q.id,
                "product_id": q.product_id,
                "category": q.category,
                "question_type": q.question_type,
                "answer_source": q.answer_source,
                "context_conflict": q.context_conflict,
                "question": q.question,
                "answer": q.answer,
            }
            for split, items in ds.splits.items()
            for q in items
        ]
    )

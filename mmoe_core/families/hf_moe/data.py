"""Examples for Hugging Face MoE models: a plain JSONL of records, or the product-QA world's files.

JSONL records (one JSON object a line; blank lines skipped)::

    {"id": "optional id", "text": "the prompt text (required)", "question": "optional question",
     "image": "optional picture path, relative to the JSONL's folder, inside it",
     "answer": "optional gold answer", "labels": {"optional": "slice labels", "domain": "code"}}

A folder can be given instead of a file: ``<split>.jsonl`` (or ``corpus_<split>.jsonl``) inside it,
or the product-QA world's ``qa_<split>.jsonl`` + ``images/`` (read with
:func:`mmoe_core.data.readers.read_qa_dataset`). An optional ``labels.json`` beside the records
describes the labels: ``{"domain": {"description": "...", "ground_truth": true, "decides": {...}}}``.

Examples are the adapter contract's plain dicts: ``index``, ``id``, ``labels``, ``text``, and when
given ``question``, ``image_path`` (absolute), ``answer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmoe_core.data.images import check_image_file, safe_relative_path
from mmoe_core.data.readers import MAX_DATA_FILE_BYTES, DatasetError
from mmoe_core.spec import LabelSpec

LABELS_FILE = "labels.json"
RECORD_KEYS = {"id", "text", "question", "image", "answer", "labels"}

# Labels of the product-QA world (generated with it: ground truth).
QA_LABELS = (
    LabelSpec(
        "answer_source",
        "where the answer lives (generated with the world)",
        ground_truth=True,
        decides={"image": ("image",), "context": ("tokens",)},
    ),
    LabelSpec("question_type", "what the question asks (colour, brand, size ...)", ground_truth=True),
    LabelSpec("category", "product category", ground_truth=True),
)


def _fail(path: Path, line: int | None, field: str | None, message: str) -> DatasetError:
    where = path.name + (f", line {line}" if line is not None else "") + (f", field {field!r}" if field else "")
    return DatasetError(f"{where}: {message}")


def _safe_image(root: Path, value: Any, path: Path, line: int, check_images: bool) -> str | None:
    """The absolute path of a record's picture: relative, inside the data folder, no '..'; with
    ``check_images`` a PNG, JPEG or WebP within the pixel cap (mmoe_core.data.images)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(path, line, "image", f"expected a relative path string, got {type(value).__name__}")
    try:
        full = safe_relative_path(root, value)
        if check_images:
            check_image_file(full, root)
    except DatasetError as exc:
        raise _fail(path, line, "image", str(exc)) from None
    return str(full.resolve())


def read_jsonl(path: str | Path, check_images: bool = True, index_offset: int = 0) -> list[dict]:
    """Read a JSONL of records (module docstring) into examples; a DatasetError names file, line, field."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    root = path.parent
    examples: list[dict] = []
    if path.stat().st_size > MAX_DATA_FILE_BYTES:
        raise _fail(
            path,
            None,
            None,
            f"{path.stat().st_size / 1e9:.1f} GB is above the "
            f"{MAX_DATA_FILE_BYTES / 1e9:.1f} GB a dataset file may have",
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise _fail(path, None, None, f"not UTF-8 text ({exc})") from exc
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _fail(path, number, None, f"invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise _fail(path, number, None, f"expected an object, got {type(record).__name__}")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _fail(path, number, "text", "required: a non-empty string")
        for key in ("question", "answer", "id"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise _fail(path, number, key, f"expected a string, got {type(record[key]).__name__}")
        labels = record.get("labels") or {}
        if not isinstance(labels, dict):
            raise _fail(path, number, "labels", f"expected an object, got {type(labels).__name__}")
        for key, value in labels.items():
            if not isinstance(value, (str, int, float, bool)) or value is None:
                raise _fail(path, number, f"labels.{key}", "label values must be strings, numbers or booleans")
        unknown = sorted(set(record) - RECORD_KEYS)
        i = index_offset + len(examples)
        example = {
            "index": i,
            "id": record.get("id") or f"{path.stem}-{number}",
            "text": text,
            "labels": {str(k): str(v) for k, v in labels.items()},
        }
        if record.get("question"):
            example["question"] = record["question"]
        image = _safe_image(root, record.get("image"), path, number, check_images)
        if image is not None:
            example["image_path"] = image
        if record.get("answer") is not None:
            example["answer"] = record["answer"]
        if unknown:
            example["extra"] = {k: record[k] for k in unknown}
        examples.append(example)
    if not examples:
        raise _fail(path, None, None, "no records")
    ids = [e["id"] for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise _fail(path, None, "id", f"duplicate id {dup!r}")
    return examples


def read_label_specs(folder: Path) -> list[LabelSpec]:
    """The optional labels.json beside the records."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path.name}: invalid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DatasetError(f"{path.name}: expected an object of label name -> description")
    specs = []
    for name, value in raw.items():
        value = value if isinstance(value, dict) else {"description": str(value)}
        decides = value.get("decides") or {}
        if not isinstance(decides, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in decides.values()
        ):
            raise DatasetError(
                f"{path.name}: label {name!r}: 'decides' must map label values to lists of input "
                'names, e.g. {"image": ["image"]}'
            )
        decides = {str(k): tuple(v) for k, v in decides.items()}
        specs.append(LabelSpec(str(name), str(value.get("description", "")), bool(value.get("ground_truth")), decides))
    return specs


def is_qa_world(folder: Path, split: str) -> bool:
    return (Path(folder) / f"qa_{split}.jsonl").is_file()


def qa_examples(folder: Path, split: str) -> list[dict]:
    """The product-QA world's questions: the context is the text, the picture its product's."""
    from mmoe_core.data.readers import read_qa_dataset

    dataset = read_qa_dataset(folder, check_images=True, splits=(split,))
    examples = []
    for i, item in enumerate(dataset.splits[split]):
        examples.append(
            {
                "index": i,
                "id": item.id,
                "text": item.context,
                "question": item.question,
                "image_path": str(item.image) if item.image is not None else None,
                "answer": item.answer,
                "product_id": item.product_id,
                "labels": {
                    "answer_source": item.answer_source or "unknown",
                    "question_type": item.question_type or "unknown",
                    "category": item.category or "unknown",
                },
            }
        )
    return examples


def records_file(data: Path, split: str) -> Path:
    """The JSONL a data path names for a split: the file itself, or <split>.jsonl / corpus_<split>.jsonl."""
    data = Path(data)
    if data.is_file():
        return data
    for name in (f"{split}.jsonl", f"corpus_{split}.jsonl"):
        if (data / name).is_file():
            return data / name
    found = sorted(p.name for p in data.glob("*.jsonl")) if data.is_dir() else []
    raise DatasetError(
        f"{data}: no {split}.jsonl, corpus_{split}.jsonl or qa_{split}.jsonl"
        + (f" (found {', '.join(found)})" if found else "")
    )


def load_examples(data: str | Path, split: str = "test") -> tuple[list[dict], list[LabelSpec]]:
    """Examples of ``split`` from a data path, with the label descriptions that come with it."""
    data = Path(data)
    if data.is_dir() and is_qa_world(data, split):
        return qa_examples(data, split), list(QA_LABELS)
    path = records_file(data, split)
    examples = read_jsonl(path)
    specs = read_label_specs(path.parent)
    declared = {s.name for s in specs}
    seen = sorted({k for e in examples for k in e["labels"]} - declared)
    specs += [LabelSpec(name, f"label {name!r} of the records") for name in seen]
    return examples, specs

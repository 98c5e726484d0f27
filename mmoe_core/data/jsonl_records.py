"""JSONL records, the plain dataset format of MoEscope (any family may read it).

One JSON object a line; blank lines skipped::

    {"id": "optional id", "text": "the prompt text (required)", "question": "optional question",
     "image": "optional picture path, relative to the JSONL's folder, inside it",
     "answer": "optional gold answer", "labels": {"optional": "slice labels", "domain": "code"}}

:func:`read_jsonl` turns a file into the adapter contract's plain example dicts (``index``, ``id``,
``labels``, ``text``, and when given ``question``, ``image_path`` (absolute), ``answer``), refusing a bad
record with a :class:`DatasetError` that names file, line and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmoe_core.data.images import check_image_file, safe_relative_path
from mmoe_core.data.readers import MAX_DATA_FILE_BYTES, DatasetError

RECORD_KEYS = {"id", "text", "question", "image", "answer", "labels"}


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

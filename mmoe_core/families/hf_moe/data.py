"""Examples for Hugging Face MoE models: a plain JSONL of records, or the product-QA world's files.

JSONL records (:mod:`mmoe_core.data.jsonl_records`; one JSON object a line; blank lines skipped)::

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

from mmoe_core.data.jsonl_records import read_jsonl
from mmoe_core.data.readers import DatasetError
from mmoe_core.spec import LabelSpec

LABELS_FILE = "labels.json"

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

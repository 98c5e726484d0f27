"""Examples of the QA family and the tensors a model reads from them (BPE ids, pixels, answer ids)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmoe_core.families.moemoe.model import MoEMoEModel
from mmoe_core.families.moemoe.ops import text_copy_targets


def examples_from_dataset(items, split_offset: int = 0) -> list[dict]:
    """QAItems (from :func:`mmoe_core.data.readers.read_qa_dataset`) -> adapter examples."""
    examples = []
    for i, item in enumerate(items):
        examples.append(
            {
                "index": split_offset + i,
                "id": item.id,
                "labels": {
                    "question_type": item.question_type or "unknown",
                    "answer_source": item.answer_source or "unknown",
                    "category": item.category or "unknown",
                },
                "question": item.question,
                "context": item.context,
                "image_path": str(item.image) if item.image is not None else None,
                "answer": item.answer,
                "product_id": item.product_id,
                "context_conflict": bool(item.context_conflict) if item.context_conflict is not None else None,
            }
        )
    return examples


def load_qa_examples(data_dir: Path | str, split: str = "test") -> list[dict]:
    from mmoe_core.data.readers import read_qa_dataset

    dataset = read_qa_dataset(data_dir, check_images=True, splits=(split,))
    return examples_from_dataset(dataset.splits[split])


def source_key(example: dict) -> tuple:
    """What identifies an example's sources: its context and its picture (path, or the object itself)."""
    picture = example.get("image")
    return (example.get("context") or "", id(picture) if picture is not None else example.get("image_path"))


class QAFeaturizer:
    """Turns examples into tensors for a model: BPE ids for Q and C, pixels for I, answer word ids.

    Pictures are read once and cached by path (a product's picture serves all its questions).
    """

    def __init__(self, model: MoEMoEModel):
        self.model = model
        self._pixels: dict[str, Tensor] = {}

    def pixels_of(self, example: dict) -> Tensor:
        towers = self.model.source_encoder
        if example.get("image") is not None:  # a PIL image built by hand (live playground)
            return towers.preprocess([example["image"]])[0]
        path = example.get("image_path")
        if not path:
            return towers.preprocess([None])[0]
        if path not in self._pixels:
            from mmoe_core.data.readers import load_image

            self._pixels[path] = towers.preprocess([load_image(path)])[0]
        return self._pixels[path]

    def answer_ids(self, answers: Sequence[str]) -> Tensor:
        steps = self.model.max_answer_words + 1
        rows = [self.model.vocab.encode(a, self.model.max_answer_words) for a in answers]
        out = torch.full((len(rows), steps), self.model.vocab.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out

    def batch(self, examples: Sequence[dict], with_answers: bool = True) -> dict:
        """Tensors of the examples; each distinct (context, picture) source appears once."""
        rows: dict[tuple, int] = {}
        sources, source_index = [], []
        for e in examples:
            key = source_key(e)
            if key not in rows:
                rows[key] = len(sources)
                sources.append(e)
            source_index.append(rows[key])
        batch = {
            "question_ids": self.model.question_encoder.tokenize([e["question"] for e in examples]),
            "context_ids": self.model.source_encoder.tokenize([e.get("context") or "" for e in sources]),
            "pixels": torch.stack([self.pixels_of(e) for e in sources]),
            "source_index": torch.tensor(source_index, dtype=torch.long),
            "example_ids": [int(e["index"]) for e in examples],
        }
        if self.model.copy:
            batch["copy_ids"] = text_copy_targets(
                [e.get("context") or "" for e in sources], self.model.source_encoder, self.model.vocab
            )
        if with_answers:
            batch["answer_ids"] = self.answer_ids([e.get("answer") or "" for e in examples])
        return batch


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}

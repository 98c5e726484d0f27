"""Training: the MMoE family trainer (plugs into mmoe_core.training) and its hard-negative batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmoe_core.encoders import ClipTowers
from mmoe_core.factory import split_model_options
from mmoe_core.families.mmoe.config import FAMILY, config_from_options
from mmoe_core.families.mmoe.data import entity_text, kb_inputs, mention_text, pixels_for, read_dataset
from mmoe_core.families.mmoe.dme import EmbeddingChooser, choose_descriptions
from mmoe_core.families.mmoe.model import MMoEModel, build_model, matching_loss
from mmoe_core.routing_record import RoutingRecorder


def hard_negative_batches(
    golds: Sequence[int], names: Sequence[str], batch_size: int, per_name: int, rng: np.random.Generator
) -> list[list[int]]:
    """Batches of mention rows in which every gold entity is distinct and entities sharing a name come
    together (up to ``per_name`` of one name per visit): in-batch negatives that are hard. Each mention
    is used at most once per epoch; a last batch smaller than 2 is dropped (it has no negative)."""
    queues: dict[int, list[int]] = {}
    for row in rng.permutation(len(golds)):
        queues.setdefault(int(golds[row]), []).append(int(row))
    by_name: dict[str, list[int]] = {}
    for entity in sorted(queues):
        by_name.setdefault(names[queues[entity][0]], []).append(entity)
    batches: list[list[int]] = []
    current: list[int] = []
    in_batch: set[int] = set()

    def flush() -> None:
        nonlocal current, in_batch
        if len(current) >= 2:
            batches.append(current)
        current, in_batch = [], set()

    while queues:
        added = 0
        name_order = sorted(n for n, es in by_name.items() if any(e in queues for e in es))
        for name_i in rng.permutation(len(name_order)):
            live = [e for e in by_name[name_order[name_i]] if e in queues and e not in in_batch]
            for j in rng.permutation(len(live))[:per_name]:
                entity = live[j]
                current.append(queues[entity].pop())
                in_batch.add(entity)
                added += 1
                if not queues[entity]:
                    del queues[entity]
                if len(current) == batch_size:
                    flush()
                    break
        if not added:  # only entities already in this batch are left: close it
            flush()
    flush()
    return batches


class MMoETrainer:
    """The MMoE :class:`mmoe_core.training.FamilyTrainer`.

    Family options (``TrainOptions.family_options``; CLI ``--opt key=value``): ``model_config`` (a named
    config of ``model_configs/``, the start), any :class:`MMoEConfig` field on top of it (``encoder`` as a
    tiny config name or a dict, ``text_hidden`` ...), and ``per_name`` (hard negatives: entities of one
    name per batch, default 4).
    """

    family = FAMILY

    def __init__(self, options):
        self.options = options
        named, fam = split_model_options(FAMILY, options.family_options or {})
        self.per_name = int(fam.pop("per_name", 4))
        self.cfg = config_from_options({**named, **fam}, options.gate, options.experts, options.top_k, options.dme)
        self.dataset = read_dataset(Path(options.data_dir), splits=("train",))
        self.train_mentions = list(self.dataset.splits["train"])
        self.golds = [int(m.answer_index) for m in self.train_mentions]
        self.names = [m.mention for m in self.train_mentions]
        self.device = torch.device("cpu")
        self.dme_descs: list[str | None] = [None] * len(self.train_mentions)

    # -- protocol ----------------------------------------------------------------------------------
    def model_config(self) -> dict:
        return self.cfg.to_dict()

    def data_config(self) -> dict:
        return {
            "root": str(Path(self.options.data_dir).resolve()),
            "name": self.dataset.name,
            "train_mentions": len(self.train_mentions),
            "entities": len(self.dataset.entities),
        }

    def build_model(self, config: dict) -> MMoEModel:
        return build_model(config)

    def setup(self, model: MMoEModel, device: torch.device) -> None:
        """Tokenise and load every training input once (steps then only index tensors)."""
        self.device = device
        towers = model.towers
        self.kb = kb_inputs(towers, self.dataset.entities, all_images=True)
        self.mention_pixels = pixels_for(towers, [m.image for m in self.train_mentions])
        if self.cfg.mention_desc == "dme":
            self.refresh_dme(model)
        self._tokenise_mentions(towers)

    def _tokenise_mentions(self, towers: ClipTowers) -> None:
        mode = self.cfg.mention_desc
        descs = (
            self.dme_descs if mode == "dme" else [m.desc if mode == "dataset" else None for m in self.train_mentions]
        )
        self.mention_ids = towers.tokenize(
            [mention_text(m.mention, m.sentence, d) for m, d in zip(self.train_mentions, descs)]
        )

    def refresh_dme(self, model: MMoEModel) -> None:
        groups = [self.dataset.name_groups.get(m.mention, []) for m in self.train_mentions]
        cand_texts = [[entity_text(e.name, e.desc) for e in group] for group in groups]
        texts = [mention_text(m.mention, m.sentence) for m in self.train_mentions]
        choice = choose_descriptions(texts, cand_texts, EmbeddingChooser(model, self.device))
        self.dme_descs = [group[i].desc if i is not None else None for group, i in zip(groups, choice)]

    def steps_per_epoch(self) -> int:
        rng = np.random.default_rng(0)
        return len(hard_negative_batches(self.golds, self.names, self.options.batch_size, self.per_name, rng))

    def train_batches(self, rng: np.random.Generator, epoch: int) -> Iterable[dict]:
        for rows in hard_negative_batches(self.golds, self.names, self.options.batch_size, self.per_name, rng):
            rows_t = torch.tensor(rows)
            golds = [self.golds[r] for r in rows]
            # Training picks one entity image at random, evaluation the first one (as published).
            picks = [
                (self.kb.image_rows[g][int(rng.integers(len(self.kb.image_rows[g])))] if self.kb.image_rows[g] else -1)
                for g in golds
            ]
            zero = self.kb.first_pixels[:1].new_zeros(1, *self.kb.first_pixels.shape[1:])
            ent_pixels = torch.cat([self.kb.all_pixels[p : p + 1] if p >= 0 else zero for p in picks])
            yield {
                "mention_ids": self.mention_ids[rows_t],
                "mention_pixels": self.mention_pixels[rows_t],
                "entity_ids": self.kb.ids[torch.tensor(golds)],
                "entity_pixels": ent_pixels,
                "entity_index": golds,
                "example_ids": rows,
            }

    def loss_parts(self, model: MMoEModel, batch: dict, recorder: RoutingRecorder | None) -> dict[str, Tensor]:
        scores = model(
            batch["entity_ids"],
            batch["entity_pixels"],
            batch["mention_ids"],
            batch["mention_pixels"],
            recorder=recorder,
            entity_index=batch["entity_index"],
            example_ids=batch["example_ids"],
        )
        return matching_loss(scores)

    def trainable_parameters(self, model: nn.Module, options) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_epoch_end(self, model: MMoEModel, epoch: int, step: int) -> None:
        if self.cfg.mention_desc == "dme":  # DME reads the model's own text embeddings: refresh them
            self.refresh_dme(model)
            self._tokenise_mentions(model.towers)

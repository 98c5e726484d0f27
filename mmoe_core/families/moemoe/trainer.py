"""Training: the MoEMoE loss, the image warm-up head and the family trainer (plugs into mmoe_core.training)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.data.readers import DatasetError
from mmoe_core.errors import ConfigError
from mmoe_core.factory import split_model_options
from mmoe_core.families.moemoe.config import FAMILY, default_model_config, model_section
from mmoe_core.families.moemoe.data import QAFeaturizer, examples_from_dataset, source_key
from mmoe_core.families.moemoe.model import MoEMoEModel, decoder_meta, encode_batch
from mmoe_core.families.moemoe.ops import augment_pictures, decoder_balance_loss, is_expert_or_router, text_copy_targets
from mmoe_core.families.moemoe.vocab import AnswerVocab
from mmoe_core.routing_record import RoutingRecorder

RUN_DECIDES = ("answer_vocab", "gate", "num_experts", "top_k", "aux_weight", "expert_only")


class ImageReadingHead(nn.Module):
    """Training-only head of the image warm-up: the question attends over the image tokens -> first answer word.

    CLIP's image tower comes pretrained; a tiny tower trained from scratch inside the QA model learns
    to see far too slowly (measured: colour questions at the answer prior after 1,200 steps, while
    the same tower read colour at 0.9 when trained on its own). The warm-up trains the tower (and the
    model's image norm and projection) to answer the picture's questions through this head, then the
    tower is frozen, as a pretrained CLIP tower would be. The head is not part of the model's checkpoint.
    """

    def __init__(self, dim: int, vocab_size: int, heads: int = 2):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, model: MoEMoEModel, batch: dict) -> Tensor:
        image = model.encode_image_tokens(batch["pixels"])[batch["source_index"]]  # [B, 1 + P, D]
        query = model.encode_question(batch["question_ids"])[1].unsqueeze(1)  # the question at EOT
        read, _ = self.attention(query, image, image, need_weights=False)
        return self.out((read + query)[:, 0])


def picture_questions(examples: Sequence[dict], source_groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per source group, its questions the picture answers (answer_source image or both).

    Datasets without answer sources (every label "unknown") use all questions of the group.
    """
    sources = {e["labels"].get("answer_source", "unknown") for e in examples}
    if sources <= {"unknown"}:
        return [list(group) for group in source_groups]
    return [
        [q for q in group if examples[q]["labels"].get("answer_source") in ("image", "both")] for group in source_groups
    ]


def loss_parts(model: MoEMoEModel, batch: dict, recorder: RoutingRecorder | None = None) -> dict[str, Tensor]:
    """CE + L_QCA + L_QIA + lambda * L_aux (balance over decoder MoE layers), as separate parts."""
    config = model.config
    if model.expert_only:  # frozen backbone: no graph through the encoders
        with torch.no_grad():
            encoded = encode_batch(model, batch)
    else:
        encoded = encode_batch(model, batch)
    answer_ids = batch["answer_ids"]
    decoder_input = model.decoder_input_for(answer_ids)
    valid = answer_ids != model.vocab.pad_id
    recorder = recorder if recorder is not None else RoutingRecorder(keep_graph=True)
    meta = decoder_meta(model, batch["example_ids"], decoder_input, valid)
    logits = model.decode(encoded, decoder_input, recorder=recorder, meta=meta)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer_ids.reshape(-1), ignore_index=model.vocab.pad_id)
    moe_calls = RoutingRecorder(keep_graph=True, calls=[c for c in recorder.calls if c.layer.startswith("decoder.")])
    align = float(config.get("align_weight", 1.0))
    return {
        "ce": ce,
        "qca": align * encoded.qca_loss,
        "qia": align * encoded.qia_loss,
        "aux": float(config.get("aux_weight", 0.1)) * decoder_balance_loss(moe_calls, valid),
    }


class MoEMoETrainer:
    """:class:`mmoe_core.training.FamilyTrainer` of the family.

    Batches hold whole products (every question of a product), ``batch_size`` questions on average,
    so that each picture and context is encoded once per step for all its questions.

    ``options.family_options`` (all optional): ``model_config`` (a named config of ``model_configs/``, the
    start); any key of :func:`default_model_config` on top of it (sizes, ``aux_weight`` = lambda,
    ``align_weight``); ``expert_only_after_steps`` (None: never; 0: expert-only
    from the start; N: backbone warm-up for N steps, then only experts and routers train);
    ``init_from`` (a checkpoint directory whose weights start the run, e.g. for an expert-only phase);
    ``qga_warmup_steps`` (QGA held at its neutral start, alpha = beta = 0.5, for the first N steps: the
    decoder first learns to read *both* sources; otherwise whichever source pays off first takes all the
    weight and the other, invisible to the decoder, is never learned).
    ``image_warmup_steps`` (N > 0: the first N steps train only the image tower, with the model's image
    norm and projection and the question encoder, to answer the picture's questions through an
    :class:`ImageReadingHead`, on ``image_warmup_products`` products per step (default 32) with turned and
    mirrored pictures; from step N on the tower is frozen). Step numbers (``qga_warmup_steps``,
    ``expert_only_after_steps``) count from the run's first step, warm-up included.
    lambda defaults to ``options.balance`` when that is set, else the named config's, else 0.1; the loop's
    own balance loss is then switched off (``options.balance = 0``) because it would also count the padding
    steps.
    """

    family = FAMILY

    def __init__(self, options):
        from mmoe_core.data.readers import read_qa_dataset

        self.options = options
        named, family_options = split_model_options(FAMILY, options.family_options or {})
        explicit_aux = family_options.pop("aux_weight", None)
        # A named config starts the model section; the run decides gate, E, k, lambda and expert-only, the data
        # the vocabulary (so those keys of the named config are not read).
        family_options = {**{k: v for k, v in named.items() if k not in RUN_DECIDES}, **family_options}
        self.expert_only_after = family_options.pop("expert_only_after_steps", None)
        self.init_from = family_options.pop("init_from", None)
        self.qga_warmup = int(family_options.pop("qga_warmup_steps", 0) or 0)
        self.image_warmup = int(family_options.pop("image_warmup_steps", 0) or 0)
        self.image_warmup_products = int(family_options.pop("image_warmup_products", 32))
        if self.image_warmup and self.expert_only_after is not None and self.expert_only_after < self.image_warmup:
            raise ConfigError(
                f"image_warmup_steps={self.image_warmup} needs the backbone trainable during the "
                f"warm-up; expert_only_after_steps={self.expert_only_after} freezes it before the "
                "warm-up ends"
            )
        dataset = read_qa_dataset(options.data_dir, check_images=True, splits=("train",))
        self.examples = examples_from_dataset(dataset.splits["train"])
        if not self.examples:
            raise DatasetError(f"{options.data_dir}: no training questions")
        vocab = AnswerVocab.build(e["answer"] for e in self.examples)
        aux_weight = explicit_aux if explicit_aux is not None else options.balance or named.get("aux_weight", 0.1)
        options.balance = 0.0
        unknown = sorted(set(family_options) - set(default_model_config()))
        if unknown:
            raise ConfigError(f"unknown moemoe family options {unknown}; known: {sorted(default_model_config())}")
        self._model_config = default_model_config(
            vocab.words,
            gate=options.gate,
            num_experts=options.experts,
            top_k=min(options.top_k, options.experts),
            aux_weight=float(aux_weight),
            expert_only=self.expert_only_after == 0,
            expert_only_after_steps=self.expert_only_after,
            qga_warmup_steps=self.qga_warmup,
            image_warmup_steps=self.image_warmup,
            **family_options,
        )
        self.by_source: dict[tuple, list[int]] = {}
        for i, e in enumerate(self.examples):
            self.by_source.setdefault(source_key(e), []).append(i)
        self.model: MoEMoEModel | None = None
        self.reading_head: ImageReadingHead | None = None
        self._steps = 0

    # -- protocol --------------------------------------------------------------------------------
    def model_config(self) -> dict:
        return self._model_config

    def data_config(self) -> dict:
        return {
            "root": str(self.options.data_dir),
            "world": "qa",
            "split": "train",
            "questions": len(self.examples),
            "sources": len(self.by_source),
        }

    def build_model(self, config: dict) -> MoEMoEModel:
        model = MoEMoEModel(config)
        if self.init_from:
            from mmoe_core.checkpoint import load_config, load_into, load_state

            if model_section(load_config(self.init_from))["answer_vocab"] != model.vocab.words:
                raise ConfigError(f"{self.init_from}: its answer vocabulary differs from this dataset's")
            load_into(model, load_state(self.init_from), source=str(self.init_from))
        return model

    def setup(self, model: MoEMoEModel, device) -> None:
        """Tokenise every question and source once; the batches then only index tensors."""
        self.model = model
        featurizer = QAFeaturizer(model)
        sources = [self.examples[questions[0]] for questions in self.by_source.values()]
        self.context_ids = model.source_encoder.tokenize([e["context"] for e in sources])
        self.copy_ids = (
            text_copy_targets([e["context"] for e in sources], model.source_encoder, model.vocab)
            if model.copy
            else None
        )
        self.pixels = torch.stack([featurizer.pixels_of(e) for e in sources])
        self.question_ids = model.question_encoder.tokenize([e["question"] for e in self.examples])
        self.answer_ids = featurizer.answer_ids([e["answer"] for e in self.examples])
        self.source_groups = list(self.by_source.values())
        if self.image_warmup:
            self.reading_head = ImageReadingHead(int(model.config["model_dim"]), len(model.vocab)).to(device)
            self.picture_questions = picture_questions(self.examples, self.source_groups)
            if not any(len(q) for q in self.picture_questions):
                raise DatasetError(
                    f"{self.options.data_dir}: image warm-up: no training question is answered by the picture"
                )

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.source_groups) / self._sources_per_batch())

    def _sources_per_batch(self) -> int:
        per_source = len(self.examples) / max(1, len(self.source_groups))
        return max(1, round(self.options.batch_size / per_source))

    def train_batches(self, rng: np.random.Generator, epoch: int):
        while self._steps < self.image_warmup:  # the run's first steps, before any QA batch
            self._apply_phase(self._steps)
            self._steps += 1
            yield self._image_warmup_batch(rng)
        per_batch = self._sources_per_batch()
        order = rng.permutation(len(self.source_groups))
        for start in range(0, len(order), per_batch):
            self._apply_phase(self._steps)
            self._steps += 1
            chosen = order[start : start + per_batch]
            questions, source_index = [], []
            for row, g in enumerate(chosen):
                questions += self.source_groups[g]
                source_index += [row] * len(self.source_groups[g])
            q = torch.as_tensor(questions)
            src = torch.as_tensor(chosen)
            yield {
                "question_ids": self.question_ids[q],
                "context_ids": self.context_ids[src],
                "pixels": self.pixels[src],
                **({"copy_ids": self.copy_ids[src]} if self.copy_ids is not None else {}),
                "source_index": torch.as_tensor(source_index),
                "answer_ids": self.answer_ids[q],
                "example_ids": questions,
            }

    def _image_warmup_batch(self, rng: np.random.Generator) -> dict:
        """Pictures of ``image_warmup_products`` products (turned and mirrored) with their picture questions."""
        candidates = [g for g, questions in enumerate(self.picture_questions) if len(questions)]
        chosen = rng.choice(candidates, min(self.image_warmup_products, len(candidates)), replace=False)
        questions, source_index = [], []
        for row, g in enumerate(chosen):
            questions += self.picture_questions[g]
            source_index += [row] * len(self.picture_questions[g])
        q = torch.as_tensor(questions)
        return {
            "phase": "image_warmup",
            "pixels": augment_pictures(self.pixels[torch.as_tensor(chosen)], rng),
            "question_ids": self.question_ids[q],
            "source_index": torch.as_tensor(source_index),
            "first_answer_ids": self.answer_ids[q, 0],
        }

    def _apply_phase(self, step: int) -> None:
        """Switch the training phase before the batch of ``step`` (0-based) is trained."""
        model = self.model
        if self.image_warmup and step >= self.image_warmup:
            model.source_encoder.clip.visual.requires_grad_(False)  # as a pretrained CLIP tower
        if self.expert_only_after is not None and step >= self.expert_only_after:
            if not model.expert_only:
                model.set_expert_only(True)
        elif not model.expert_only:
            model.qga.requires_grad_(step >= self.qga_warmup)

    def loss_parts(self, model: MoEMoEModel, batch: dict, recorder: RoutingRecorder | None) -> dict[str, Tensor]:
        if batch.get("phase") == "image_warmup":
            logits = self.reading_head(model, batch)
            return {"image_reading": F.cross_entropy(logits, batch["first_answer_ids"])}
        return loss_parts(model, batch, recorder)

    def trainable_parameters(self, model: MoEMoEModel, options) -> list[tuple[str, nn.Parameter]]:
        """Every parameter that may train in this run (the experts and routers alone if expert-only
        from the start); a later expert-only switch freezes the rest through ``requires_grad``."""
        if self.expert_only_after == 0:
            return [(n, p) for n, p in model.named_parameters() if is_expert_or_router(n)]
        head = (
            []
            if self.reading_head is None
            else [(f"image_reading_head.{n}", p) for n, p in self.reading_head.named_parameters()]
        )
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad] + head

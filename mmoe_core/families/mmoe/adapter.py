"""The MMoE adapter: what the dashboard sees of an MMoE checkpoint (mmoe_core.adapter's contract)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.encoders import ClipTowers
from mmoe_core.families.mmoe.config import FAMILY, IMAGE_TO_TEXT, MODALITIES, TEXT_TO_IMAGE
from mmoe_core.families.mmoe.data import (
    KBInputs,
    examples_from_dataset,
    kb_inputs,
    mention_text,
    pixels_for,
    read_dataset,
)
from mmoe_core.families.mmoe.dme import choose_for_examples
from mmoe_core.families.mmoe.features import EntityFeatures, UnitScores
from mmoe_core.families.mmoe.model import MMoEModel
from mmoe_core.families.mmoe.ranking import gold_ranks, summarize_ranks, top_k
from mmoe_core.routing_record import RoutingRecorder
from mmoe_core.spec import (
    AttributionTarget,
    ExampleField,
    GateSpec,
    ImageGrid,
    InputSpec,
    LabelSpec,
    OutputSpec,
    PredictionSpec,
    RoutedLayerSpec,
)

KB_CACHE_ENTRIES = 3  # whole-KB encodings kept per adapter: the first (trained) state and the latest two


def _remember(cache: dict, key, value) -> None:
    """Insert ``key``; beyond :data:`KB_CACHE_ENTRIES` drop the oldest entry after the first one (the first
    is the trained model's, the one every page and the base run ask for)."""
    cache[key] = value
    while len(cache) > KB_CACHE_ENTRIES:
        del cache[list(cache)[1]]


class MMoEAdapter(ModelAdapter):
    """MMoE for the dashboard: ranks each mention against the whole KB.

    The KB comes from :meth:`load_examples` (or :meth:`set_dataset`; else the checkpoint's training
    data folder). ``modalities`` is an eval-time ablation: ("text",) scores with the text unit only.
    """

    family = FAMILY

    def __init__(self, model: MMoEModel, config: dict, device="cpu"):
        super().__init__(model, config, device)
        self.model: MMoEModel
        self.modalities: tuple[str, ...] = MODALITIES
        self.dataset = None
        self._kb: KBInputs | None = None
        # per knockout state, bounded: a run-wide knockout visits every (layer, expert) once, so only the
        # trained model's entry and the latest few are worth a whole-KB copy each
        self._entity_cache: dict[tuple, EntityFeatures] = {}
        self._entity_calls: dict[tuple, list] = {}
        self.dme_chooser = None  # optional chooser(mention_text, candidate_descs) -> index (e.g. an LLM)

    @property
    def towers(self) -> ClipTowers:
        return self.model.towers

    # ---- declarations ----------------------------------------------------------------------------
    title = "MMoE: multimodal entity linking"

    def fields(self) -> list[ExampleField]:
        return [
            ExampleField("sentence", "Mention sentence", "text", editable=True, role="title", max_chars=300),
            ExampleField("mention", "Mention", "text"),
            ExampleField("image", "Mention picture", "image", editable=True),
            ExampleField("gold_name", "Gold entity", "text", role="gold"),
            ExampleField("gold_qid", "Gold entity id", "id"),
        ]

    def _gate(self) -> GateSpec:
        cfg = self.model.cfg
        if cfg.gate == "mmoe_reference":
            return GateSpec(
                "mmoe_reference",
                "softmax",
                "batch_column",
                batch_dependent=True,
                capacity=cfg.capacity_factor,
                note="published SwitchGate: top-k mask scattered along the sequence axis, columns "
                "normalised over the batch and multiplied by int(capacity x batch size); only "
                f"positions 0..{cfg.num_experts - 1} and expert columns 0..{cfg.top_k - 1} "
                "can get weight",
            )
        return GateSpec("topk_softmax", "softmax", "topk_renormalised")

    def input_spec(self) -> list[InputSpec]:
        side = int(round(math.sqrt(self.towers.num_patches)))
        return [
            InputSpec("mention_text", "text_tokens", "mention [SEP] sentence (token embeddings)", field="sentence"),
            InputSpec(
                "mention_image",
                "image_patches",
                "mention picture (patch embeddings)",
                field="image",
                grid=ImageGrid(side, side, 0),
            ),
        ]

    def routed_layers(self) -> list[RoutedLayerSpec]:
        cfg = self.model.cfg
        e, k, g = cfg.num_experts, cfg.top_k, self._gate()
        return [
            RoutedLayerSpec(
                "text_intra", e, k, g, "[text CLS; text tokens]", "the same sequence", ("entity", "mention")
            ),
            RoutedLayerSpec(
                "image_intra", e, k, g, "[image CLS; ViT CLS; patches]", "the same sequence", ("entity", "mention")
            ),
            RoutedLayerSpec(
                "cross_inter",
                e,
                k,
                g,
                "[text CLS; image tokens] and [image CLS; text tokens]",
                "the other modality: [image CLS; text tokens] and [text CLS; image tokens]",
                tuple(f"{s}:{d}" for s in ("entity", "mention") for d in (TEXT_TO_IMAGE, IMAGE_TO_TEXT)),
            ),
        ]

    def prediction_spec(self) -> PredictionSpec:
        return PredictionSpec(
            "ranking",
            "rank of the gold entity among all KB entities (1 = best)",
            headline=("Hits@1", "MRR", "Hits@5", "MR"),
            item="entity",
        )

    def attribution_targets(self) -> list[AttributionTarget]:
        return [
            AttributionTarget(
                "score",
                "matching score of the gold entity (the predicted one when there is "
                "no gold; example['target_entity'] overrides)",
            ),
            AttributionTarget(
                "router_logit", "router logit of (layer, expert, position) on the mention side", needs_layer=True
            ),
        ]

    def output_spec(self) -> list[OutputSpec]:
        return [
            OutputSpec(
                "unit_scores", "named_scores", "text, image and cross unit scores of the top-1 entity per example"
            )
        ]

    def label_spec(self) -> list[LabelSpec]:
        return [
            LabelSpec(
                "decisive",
                "which modality decides the mention (generated with the world)",
                ground_truth=True,
                decides={"text": ("mention_text",), "image": ("mention_image",)},
            ),
            LabelSpec("entity_type", "type of the gold entity", ground_truth=True),
            LabelSpec("has_image", "whether the mention has a picture"),
        ]

    def model_card(self) -> dict[str, str]:
        cfg = self.model.cfg
        return {
            "encoder": str(cfg.encoder.get("name", cfg.encoder.get("kind", ""))),
            "experts": f"{cfg.num_experts} per layer, top-{cfg.top_k}",
            "gate": cfg.gate,
            "mention text": cfg.mention_desc,
            "dispatch": cfg.dispatch,
        }

    def notes(self) -> list[str]:
        if self.model.cfg.gate != "mmoe_reference":
            return []
        return [
            'This run uses the published MEL-MMoE `SwitchGate` (`gate="mmoe_reference"`): it normalises '
            "each expert column over the batch and scatters its top-k mask along the sequence axis, so most "
            "positions get no expert weight and one example's routing depends on its batch."
        ]

    # ---- data ------------------------------------------------------------------------------------
    def set_dataset(self, dataset) -> None:
        if dataset is not self.dataset:
            self.dataset = dataset
            self._kb = None
            self._entity_cache.clear()
            self._entity_calls.clear()

    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        self.set_dataset(read_dataset(data_dir, splits=(split,)))
        return examples_from_dataset(self.dataset, split)

    def _ensure_dataset(self):
        if self.dataset is None:
            root = self.config.get("data", {}).get("root")
            if not root or not Path(root).exists():
                raise RuntimeError("no knowledge base: call load_examples(data_dir) or set_dataset(dataset) first")
            self.set_dataset(read_dataset(Path(root), splits=()))
        return self.dataset

    def kb(self) -> KBInputs:
        if self._kb is None:
            self._kb = kb_inputs(self.towers, self._ensure_dataset().entities)
        return self._kb

    def _knockout_key(self) -> tuple:
        return self.knockout_state()

    def entity_features(self) -> EntityFeatures:
        """Entity side of the whole KB, computed once per (KB, knockout state)."""
        key = self._knockout_key()
        if key not in self._entity_cache:
            kb = self.kb()
            with torch.no_grad():
                features = self.model.encode_entities(
                    kb.ids.to(self.device), kb.first_pixels.to(self.device), recorder=None
                )
            _remember(self._entity_cache, key, features)
        return self._entity_cache[key]

    def entity_routing_calls(self) -> list:
        """The KB side's routing records, recorded once per (KB, knockout state) on first request.

        Kept apart from :meth:`entity_features` because most callers never ask for them (they grow with
        the KB); a live example that records its routing then costs one mention forward, not a KB's.
        """
        key = self._knockout_key()
        if key not in self._entity_calls:
            kb, recorder = self.kb(), RoutingRecorder()
            with torch.no_grad():
                features = self.model.encode_entities(
                    kb.ids.to(self.device), kb.first_pixels.to(self.device), recorder=recorder
                )
            if key not in self._entity_cache:
                _remember(self._entity_cache, key, features)
            _remember(self._entity_calls, key, list(recorder.calls))
        return self._entity_calls[key]

    def example_texts(self, examples: Sequence[dict]) -> list[str]:
        """What the model reads for each example (``text`` when given, else built per ``mention_desc``)."""
        mode = self.model.cfg.mention_desc
        todo = [i for i, ex in enumerate(examples) if not ex.get("text")]
        descs: dict[int, str | None] = {i: None for i in todo}
        if mode == "dataset":
            descs = {i: examples[i].get("dataset_desc") for i in todo}
        elif mode == "dme" and todo:
            descs = dict(zip(todo, choose_for_examples(self, [examples[i] for i in todo], self.dme_chooser)))
        return [
            ex.get("text") or mention_text(ex["mention"], ex["sentence"], descs[i]) for i, ex in enumerate(examples)
        ]

    def _inputs(self, examples: Sequence[dict], texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = self.towers.tokenize(texts)
        images = [ex.get("image") if ex.get("image") is not None else ex.get("image_path") for ex in examples]
        return ids.to(self.device), pixels_for(self.towers, images).to(self.device)

    # ---- running ---------------------------------------------------------------------------------
    def run(
        self, examples: Sequence[dict], record: bool = True, batch_size: int = 32, progress: bool = False
    ) -> RunOutput:
        from tqdm import tqdm

        recorder = RoutingRecorder() if record else None
        kb = self.kb()
        if recorder is not None:
            recorder.calls.extend(self.entity_routing_calls())
        entities = self.entity_features()
        texts = self.example_texts(examples)
        predictions, reps = [], []
        bar = tqdm(total=len(examples), desc="mmoe run", unit="ex", disable=not progress, file=sys.stderr)
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                ids, pixels = self._inputs(batch, texts[start : start + batch_size])
                mentions = self.model.encode_mentions(ids, pixels, [ex["index"] for ex in batch], recorder)
                scores = self.model.match(entities, mentions, self.modalities)
                predictions += self._predictions(batch, scores, kb)
                reps.append(mentions.representation.float().cpu())
                bar.update(len(batch))
        bar.close()
        representations = torch.cat(reps) if reps else None
        return RunOutput(predictions, recorder, {"modalities": list(self.modalities)}, representations)

    def route(self, examples: Sequence[dict], batch_size: int = 32) -> RoutingRecorder:
        """The mentions' routing alone: the mention side is encoded as :meth:`run` does, without matching
        it against the knowledge base (most of a run's time) and without the KB side's own calls."""
        recorder = RoutingRecorder()
        texts = self.example_texts(examples)
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                ids, pixels = self._inputs(batch, texts[start : start + batch_size])
                self.model.encode_mentions(ids, pixels, [ex["index"] for ex in batch], recorder)
        return recorder

    def _predictions(self, batch: Sequence[dict], scores: UnitScores, kb: KBInputs) -> list[dict]:
        overall = scores.overall.float()
        top_ids, top_scores = top_k(overall, min(5, overall.shape[1]))
        golds = [ex.get("gold_index") for ex in batch]
        has_gold = [g is not None for g in golds]
        ranks = gold_ranks(overall, [g if g is not None else 0 for g in golds]).cpu().tolist()
        out = []
        for row, ex in enumerate(batch):
            pred = int(top_ids[row, 0])
            gold = golds[row]
            units = {u: float(getattr(scores, u)[row, pred]) for u in scores.modalities}
            top = [int(i) for i in top_ids[row]]
            out.append(
                {
                    "index": ex["index"],
                    "id": ex.get("id", str(ex["index"])),
                    "prediction": kb.names[pred],
                    "prediction_id": pred,
                    "prediction_qid": kb.qids[pred],
                    "score": float(top_scores[row, 0]),
                    "gold": kb.names[gold] if has_gold[row] else None,
                    "gold_id": gold,
                    "gold_score": float(overall[row, gold]) if has_gold[row] else None,
                    "rank": int(ranks[row]) if has_gold[row] else None,
                    "correct": (int(ranks[row]) == 1) if has_gold[row] else None,
                    "top_ids": top,
                    "top_names": [kb.names[i] for i in top],
                    "top_qids": [kb.qids[i] for i in top],
                    "top_scores": [float(s) for s in top_scores[row]],
                    "unit_scores": units,
                }
            )
        return out

    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        by_index = {ex["index"]: ex for ex in examples}
        ranked = [p for p in predictions if p.get("rank") is not None]
        ranks = [p["rank"] for p in ranked]
        slices = {
            label: [by_index[p["index"]].get("labels", {}).get(label, "unknown") for p in ranked]
            for label in ("decisive", "has_image")
        }
        summary = summarize_ranks(ranks, slices)
        summary["modalities"] = list(self.modalities)
        summary["num_entities"] = len(self.kb().names) if self.dataset is not None else None
        return summary

    # ---- attribution -----------------------------------------------------------------------------
    def _example_inputs(self, example: dict) -> tuple[Tensor, Tensor]:
        return self._inputs([example], self.example_texts([example]))

    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        ids, pixels = self._example_inputs(example)
        with torch.no_grad():
            return {
                "mention_text": self.towers.embed_text_tokens(ids),
                "mention_image": self.towers.embed_image_patches(pixels),
            }

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        ids, _ = self._example_inputs(example)
        grid = int(round(math.sqrt(self.towers.num_patches)))
        return {
            "mention_text": self.towers.token_strings(ids.cpu())[0],
            "mention_image": [f"patch {r},{c}" for r in range(grid) for c in range(grid)],
        }

    def target_entity(self, example: dict) -> int:
        """The entity whose score is attributed: example['target_entity'], else the gold, else the top-1."""
        for key in ("target_entity", "gold_index"):
            if example.get(key) is not None:
                return int(example[key])
        return int(self.run([example], record=False).predictions[0]["prediction_id"])

    def attribution_forward(
        self,
        example: dict,
        target: str,
        layer: str | None = None,
        expert: int | None = None,
        position: int | None = None,
        call: str | None = None,
    ) -> Callable[..., Tensor]:
        ids, pixels = self._example_inputs(example)
        model = self.model
        if target == "score":
            entity = self.entity_features().rows(slice(t := self.target_entity(example), t + 1))
            modalities = self.modalities

            def one(text_emb: Tensor, patch_emb: Tensor) -> Tensor:
                n = text_emb.shape[0]
                men = model.encode_mentions(
                    ids.expand(n, -1), pixels.expand(n, -1, -1, -1), token_embeds=text_emb, patch_embeds=patch_emb
                )
                return model.match(entity, men, modalities).overall[:, 0]
        elif target == "router_logit":
            if layer is None or expert is None or position is None:
                raise ValueError("router_logit needs layer, expert and position")
            call = call or "mention"
            if not call.startswith("mention"):
                raise ValueError("attribution inputs are the mention's: pick a mention-side call")

            def one(text_emb: Tensor, patch_emb: Tensor) -> Tensor:
                n = text_emb.shape[0]
                rec = RoutingRecorder(keep_graph=True)
                model.encode_mentions(
                    ids.expand(n, -1),
                    pixels.expand(n, -1, -1, -1),
                    recorder=rec,
                    token_embeds=text_emb,
                    patch_embeds=patch_emb,
                )
                hits = [c for c in rec.calls if c.layer == layer and c.meta is not None and c.meta.call == call]
                if not hits:
                    raise KeyError(f"no call {call!r} of layer {layer!r}")
                return hits[0].router.logits[:, position, expert]
        else:
            raise ValueError(f"unknown attribution target {target!r}")

        if model.cfg.gate != "mmoe_reference":
            return one

        def row_by_row(text_emb: Tensor, patch_emb: Tensor) -> Tensor:
            # The reference gate normalises over the batch: evaluate each row alone so that the
            # attribution of one input never depends on the other rows (e.g. IG's interpolation steps).
            return torch.cat([one(text_emb[i : i + 1], patch_emb[i : i + 1]) for i in range(text_emb.shape[0])])

        return row_by_row

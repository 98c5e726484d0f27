"""The MoEMoE adapter: what the dashboard sees of a MoEMoE checkpoint (mmoe_core.adapter's contract)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.families.moemoe.config import DECODER_CALL, FAMILY, SLICE_LABELS, SOURCES, model_section
from mmoe_core.families.moemoe.data import QAFeaturizer, batch_to, load_qa_examples
from mmoe_core.families.moemoe.model import Encoded, MoEMoEModel, decoder_meta, encode_batch
from mmoe_core.families.moemoe.ops import dominant_source, valid_steps
from mmoe_core.qa_text import exact_match
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
    SourceSpec,
    TrainingPhase,
)


def exact_match_summary(rows: Sequence[tuple[bool, dict]], slice_labels: Sequence[str] = SLICE_LABELS) -> dict:
    """{"overall": {exact_match, n}, "by_<label>": {value: {exact_match, n}}} from (correct, labels) rows."""

    def block(flags: list[bool]) -> dict:
        return {"exact_match": float(np.mean(flags)) if flags else float("nan"), "n": len(flags)}

    summary = {"overall": block([c for c, _ in rows])}
    for label in slice_labels:
        groups: dict[str, list[bool]] = {}
        for correct, labels in rows:
            groups.setdefault(str(labels.get(label, "unknown")), []).append(correct)
        summary[f"by_{label}"] = {value: block(flags) for value, flags in sorted(groups.items())}
    return summary


def qga_agreement(qga_rows: Sequence[dict], examples: Sequence[dict]) -> dict:
    """Share of single-source questions (image or context) whose dominant QGA source is the gold one."""
    by_index = {int(e["index"]): e for e in examples}
    hits: dict[str, list[bool]] = {s: [] for s in SOURCES}
    for row in qga_rows:
        source = by_index[int(row["index"])]["labels"].get("answer_source")
        if source in hits:
            hits[source].append(dominant_source(row["alpha"], row["beta"]) == source)
    flags = hits["image"] + hits["context"]
    return {
        "agreement": float(np.mean(flags)) if flags else float("nan"),
        "n": len(flags),
        **{f"agreement_{s}": float(np.mean(v)) if v else float("nan") for s, v in hits.items()},
    }


class MoEMoEAdapter(ModelAdapter):
    family = FAMILY
    model: MoEMoEModel

    def __init__(self, model: nn.Module, config: dict, device: torch.device | str = "cpu"):
        super().__init__(model, config, device)
        self.featurizer = QAFeaturizer(self.model)

    # ---- declarations --------------------------------------------------------------------------
    title = "MoEMoE: multi-source multimodal QA"

    def fields(self) -> list[ExampleField]:
        return [
            ExampleField("question", "Question", "text", editable=True, role="title", max_chars=200),
            ExampleField("context", "Context", "long_text", editable=True, max_chars=1500),
            ExampleField("image", "Product picture", "image", editable=True),
            ExampleField("answer", "Gold answer", "text", role="gold"),
            ExampleField("product_id", "Product", "id"),
        ]

    def input_spec(self) -> list[InputSpec]:
        side = self.model.source_encoder.clip.visual.grid_size[0]
        return [
            InputSpec("question", "text_tokens", "question BPE tokens (question encoder Q)", field="question"),
            InputSpec("context", "text_tokens", "product context BPE tokens (context encoder C)", field="context"),
            InputSpec(
                "image",
                "image_patches",
                "product picture patches (image encoder I)",
                field="image",
                grid=ImageGrid(side, side, 0),
            ),
        ]

    def routed_layers(self) -> list[RoutedLayerSpec]:
        gate = GateSpec("topk_softmax", "softmax", "topk_renormalised")
        return [
            RoutedLayerSpec(
                moe.name,
                moe.num_experts,
                moe.top_k,
                gate,
                routed="decoder hidden state at each answer step",
                gate_sees="the same decoder hidden state",
                calls=(DECODER_CALL,),
            )
            for moe in self.model.moe_layers()
        ]

    def prediction_spec(self) -> PredictionSpec:
        return PredictionSpec(
            "answer", "greedy answer words; exact match after normalisation", headline=("exact_match",), item="answer"
        )

    def attribution_targets(self) -> list[AttributionTarget]:
        return [
            AttributionTarget(
                "answer_logit",
                "logit of the first answer word (gold if in the vocabulary, else predicted) at decoder step 0",
            ),
            AttributionTarget("router_logit", "router logit of (layer, expert, decoder step)", needs_layer=True),
        ]

    def output_spec(self) -> list[OutputSpec]:
        return [
            OutputSpec(
                "qga",
                "source_weights",
                "question-guided attention: per question token (SOT..EOT), a weight alpha on the image "
                "and beta on the context (alpha + beta = 1); the joint input is e = alpha I + beta C",
                sources=(
                    SourceSpec("image", "alpha", "alpha (image)", "#1f77b4"),
                    SourceSpec("context", "beta", "beta (context)", "#ff7f0e"),
                ),
                truth_label="answer_source",
                positions="tokens",
            )
        ]

    def label_spec(self) -> list[LabelSpec]:
        return [
            LabelSpec("question_type", "what the question asks (colour, brand, size ...)", ground_truth=True),
            LabelSpec(
                "answer_source",
                "where the answer lives (generated with the world)",
                ground_truth=True,
                decides={"image": ("image",), "context": ("context",)},
            ),
            LabelSpec("category", "product category", ground_truth=True),
        ]

    def training_phases(self) -> list[TrainingPhase]:
        """Phase switches of the schedule; each option holds the (absolute) step its phase starts."""
        cfg = model_section(self.config)
        last = (self.config.get("training") or {}).get("steps_done") or (self.config.get("training") or {}).get("steps")
        phases = []
        for option, label in (
            ("image_warmup_steps", "image tower frozen"),
            ("qga_warmup_steps", "QGA free"),
            ("expert_only_after_steps", "expert-only"),
        ):
            step = cfg.get(option)
            if isinstance(step, (int, float)) and step > 0 and (last is None or step < last):
                phases.append(TrainingPhase(option, int(step), label))
        return sorted(phases, key=lambda p: p.step)

    def model_card(self) -> dict[str, str]:
        cfg = model_section(self.config)
        return {
            "decoder": f"{cfg.get('decoder_layers')} layers, width {cfg.get('model_dim')}",
            "experts": f"{cfg.get('num_experts')} per MoE layer, top-{cfg.get('top_k')}",
            "lambda (aux weight)": str(cfg.get("aux_weight")),
            "copy pointer": str(cfg.get("copy")),
            "image warm-up steps": str(cfg.get("image_warmup_steps")),
            "QGA warm-up steps": str(cfg.get("qga_warmup_steps")),
        }

    # ---- data ----------------------------------------------------------------------------------
    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        return load_qa_examples(data_dir, split)

    # ---- running -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self, examples: Sequence[dict], record: bool = True, batch_size: int = 32, progress: bool = False
    ) -> RunOutput:
        model = self.model.eval()
        recorder = RoutingRecorder(keep_graph=False) if record else None
        predictions, qga_rows, representations = [], [], []
        starts = range(0, len(examples), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="moemoe run", unit="batch")
        first_moe = model.moe_layers()[0].name if model.moe_layers() else None
        for start in starts:
            chunk = list(examples[start : start + batch_size])
            batch = batch_to(self.featurizer.batch(chunk, with_answers=False), self.device)
            encoded = encode_batch(model, batch)
            answer_ids, step_scores = model.greedy(encoded)
            # One more teacher-forced pass over the chosen words: same states as the greedy steps
            # (causal decoder), so each step is recorded exactly once.
            decoder_input = model.decoder_input_for(answer_ids)
            valid = valid_steps(answer_ids, model.vocab.eos_id)
            capture: dict = {}
            meta = decoder_meta(model, batch["example_ids"], decoder_input, valid)
            model.decode(encoded, decoder_input, recorder=recorder, meta=meta, capture=capture)
            if first_moe is not None:
                representations.append(capture[first_moe][:, 0].float().cpu())
            question_tokens = model.question_encoder.token_strings(batch["question_ids"].cpu())
            for row, example in enumerate(chunk):
                answer = model.vocab.decode(answer_ids[row].tolist())
                gold = example.get("answer")
                predictions.append(
                    {
                        "index": int(example["index"]),
                        "id": example.get("id"),
                        "prediction": answer,
                        "answer": answer,
                        "gold": gold,
                        "correct": bool(exact_match(answer, gold)) if gold is not None else None,
                        "score": float(step_scores[row].sum()),
                    }
                )
                keep = encoded.question_valid[row].cpu()
                qga_rows.append(
                    {
                        "index": int(example["index"]),
                        "tokens": [t for t, k in zip(question_tokens[row], keep.tolist()) if k],
                        "alpha": encoded.alpha[row].cpu()[keep].float().tolist(),
                        "beta": encoded.beta[row].cpu()[keep].float().tolist(),
                    }
                )
        reps = torch.cat(representations) if representations else None
        return RunOutput(predictions, recorder, {"qga": qga_rows}, reps)

    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        """Exact match overall and by question type, answer source and category."""
        by_index = {int(e["index"]): e for e in examples}
        rows = []
        for p in predictions:
            example = by_index.get(int(p["index"]), {})
            gold = example.get("answer", p.get("gold"))
            rows.append((bool(exact_match(p.get("prediction"), gold)), example.get("labels", {})))
        return exact_match_summary(rows)

    # ---- attribution ---------------------------------------------------------------------------
    def _single_batch(self, example: dict) -> dict:
        return batch_to(self.featurizer.batch([example], with_answers=False), self.device)

    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        batch = self._single_batch(example)
        model = self.model
        with torch.no_grad():
            return {
                "question": model.question_encoder.embed_text_tokens(batch["question_ids"]).detach(),
                "context": model.source_encoder.embed_text_tokens(batch["context_ids"]).detach(),
                "image": model.source_encoder.embed_image_patches(batch["pixels"]).detach(),
            }

    def attribution_forward(
        self,
        example: dict,
        target: str,
        layer: str | None = None,
        expert: int | None = None,
        position: int | None = None,
        call: str | None = None,
    ) -> Callable[..., Tensor]:
        model = self.model.eval()
        batch = self._single_batch(example)
        with torch.no_grad():
            predicted, _ = model.greedy(encode_batch(model, batch))

        def encode(question_embeds: Tensor, context_embeds: Tensor, patch_embeds: Tensor) -> Encoded:
            n = question_embeds.shape[0]
            copy_ids = batch.get("copy_ids")
            return model.encode(
                batch["question_ids"].expand(n, -1),
                batch["context_ids"].expand(n, -1),
                batch["pixels"].expand(n, -1, -1, -1),
                None,
                question_embeds,
                context_embeds,
                patch_embeds,
                copy_ids=None if copy_ids is None else copy_ids.expand(n, -1),
            )

        if target == "answer_logit":
            gold_first = model.vocab.encode(example.get("answer") or "", 1)[0]
            first_word = (
                gold_first if gold_first not in (model.vocab.unk_id, model.vocab.eos_id) else int(predicted[0, 0])
            )

            def answer_logit(question_embeds, context_embeds, patch_embeds):
                encoded = encode(question_embeds, context_embeds, patch_embeds)
                bos = torch.full((question_embeds.shape[0], 1), model.vocab.bos_id, device=question_embeds.device)
                return model.decode(encoded, bos)[:, 0, first_word]

            return answer_logit

        if target == "router_logit":
            layers = {moe.name: moe for moe in model.moe_layers()}
            if layer not in layers:
                raise KeyError(f"unknown routed layer {layer!r}; layers: {sorted(layers)}")
            if call not in (None, DECODER_CALL):
                raise ValueError(f"{layer} is only called as {DECODER_CALL!r}, not {call!r}")
            decoder_input = model.decoder_input_for(predicted)
            steps = int(valid_steps(predicted, model.vocab.eos_id)[0].sum())
            if position is None or not 0 <= position < steps:
                raise ValueError(f"position must be a decoder step in 0..{steps - 1}, got {position}")
            if expert is None or not 0 <= expert < layers[layer].num_experts:
                raise ValueError(f"expert must be in 0..{layers[layer].num_experts - 1}, got {expert}")

            def router_logit(question_embeds, context_embeds, patch_embeds):
                encoded = encode(question_embeds, context_embeds, patch_embeds)
                recorder = RoutingRecorder(keep_graph=True)
                rows = decoder_input.expand(question_embeds.shape[0], -1)
                model.decode(encoded, rows, recorder=recorder)
                logits = next(c.router.logits for c in recorder.calls if c.layer == layer)
                return logits[:, position, expert]

            return router_logit

        raise ValueError(f"unknown attribution target {target!r}; choose answer_logit or router_logit")

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        batch = self._single_batch(example)
        side = self.model.source_encoder.clip.visual.grid_size[0]
        return {
            "question": self.model.question_encoder.token_strings(batch["question_ids"].cpu())[0],
            "context": self.model.source_encoder.token_strings(batch["context_ids"].cpu())[0],
            "image": [f"patch {r},{c}" for r in range(side) for c in range(side)],
        }

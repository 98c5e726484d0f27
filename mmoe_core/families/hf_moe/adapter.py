"""The Hugging Face MoE adapter: any local ``transformers`` MoE model through the MoEscope contract.

* Text language models (``AutoModelForCausalLM``): prediction kind ``lm_loss`` (per-token loss of the
  text, next-token top-5 at its end; headline mean loss and perplexity).
* Vision-language models (``AutoModelForImageTextToText``, e.g. Qwen3-VL-MoE): kind ``answer`` (greedy
  ``generate`` after the prompt, exact match against the gold answer).

Routing is recorded from the model's own router modules (see :mod:`.routing`) in one forward over
the prompt (and, for answers, the generated answer tokens: a causal model routes them exactly as
during generation), with each position's kind and modality (see :mod:`.encoding`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.qa_text import exact_match, normalise_answer
from mmoe_core.routing_record import RouterOutput, RoutingRecorder
from mmoe_core.spec import (
    AttributionTarget,
    ExampleField,
    ImageGrid,
    InputSpec,
    LabelSpec,
    PredictionSpec,
    RoutedLayerSpec,
)

from . import data as hf_data
from . import encoding as enc
from .routing import RoutingCapture, find_routers, install_knockout

FAMILY = "hf_moe"


class HFMoEAdapter(ModelAdapter):
    family = FAMILY
    title = "Hugging Face MoE model (transformers)"

    def __init__(
        self,
        model: nn.Module,
        config: dict,
        device: torch.device | str = "cpu",
        tokenizer=None,
        processor=None,
        path: Path | None = None,
        sidecar: dict | None = None,
    ):
        # No .to(device) here: the model is already placed (a device-mapped model must not be moved).
        self.model = model.eval()
        self.config = config
        self.device = torch.device(device)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.processor = processor
        self.path = Path(path) if path is not None else None
        self.sidecar = dict(sidecar or {})
        self.vision = processor is not None
        self.handles = find_routers(model)
        for handle in self.handles:
            install_knockout(handle)
        self.capture = RoutingCapture(self.handles)
        self.max_answer_tokens = int(self.sidecar.get("max_answer_tokens", 8))
        self.max_length = int(self.sidecar.get("max_length", 1024))
        self.prompt_order = str(self.sidecar.get("prompt_order", enc.QUESTION_FIRST))
        self._labels: list[LabelSpec] = [LabelSpec(**lab) for lab in self.sidecar.get("labels", [])]
        self._prepared: dict = {}

    @property
    def hf_config(self):
        return self.model.config

    def _text_config(self):
        return getattr(self.hf_config, "text_config", None) or self.hf_config

    # ---- declarations --------------------------------------------------------------------------
    def fields(self) -> list[ExampleField]:
        if self.vision:
            return [
                ExampleField("question", "Question", "text", editable=True, role="title", max_chars=300),
                ExampleField("text", "Context / prompt text", "long_text", editable=True, max_chars=4000),
                ExampleField("image", "Picture", "image", editable=True),
                ExampleField("answer", "Gold answer", "text", role="gold"),
            ]
        return [ExampleField("text", "Text", "long_text", editable=True, role="title", max_chars=4000)]

    def input_spec(self) -> list[InputSpec]:
        specs = [
            InputSpec(
                "tokens",
                "text_tokens",
                "input token embeddings (inputs_embeds) of every position, "
                "image placeholders included (the picture's features replace those)",
                field="text",
            )
        ]
        if self.vision:
            specs.append(
                InputSpec(
                    "image",
                    "image_patches",
                    "the vision tower's patch embeddings (after its patch "
                    "convolution), row-major over the picture's patch grid",
                    field="image",
                )
            )
        return specs

    def routed_layers(self) -> list[RoutedLayerSpec]:
        what = "the hidden state of every token (text and image placeholders) entering the MoE block"
        return [
            RoutedLayerSpec(
                h.name,
                h.num_experts,
                h.top_k,
                h.gate,
                routed=f"{what} ({h.path})",
                gate_sees="the same hidden state",
                calls=(enc.CALL,),
            )
            for h in self.handles
        ]

    def prediction_spec(self) -> PredictionSpec:
        if self.vision:
            return PredictionSpec(
                "answer",
                "greedy answer generated after the prompt (transformers generate); exact match after normalisation",
                headline=("exact_match",),
                item="answer",
            )
        return PredictionSpec(
            "lm_loss",
            "per-token cross-entropy of the text; next-token top-5 at its end",
            headline=("loss", "perplexity"),
            item="next token",
        )

    def attribution_targets(self) -> list[AttributionTarget]:
        first = (
            AttributionTarget(
                "answer_logit",
                "logit of the first answer token (gold if the tokenizer knows "
                "it, else predicted) at the last prompt position",
            )
            if self.vision
            else AttributionTarget("next_token_logit", "logit of the predicted next token at the text's end")
        )
        return [first, AttributionTarget("router_logit", "router logit of (layer, expert, position)", needs_layer=True)]

    def label_spec(self) -> list[LabelSpec]:
        return list(self._labels)

    def model_card(self) -> dict[str, str]:
        cfg = self._text_config()
        params = sum(p.numel() for p in self.model.parameters())
        handle = self.handles[0] if self.handles else None
        card = {
            "architecture": type(self.model).__name__,
            "model_type": str(getattr(self.hf_config, "model_type", "")),
            "layers": str(getattr(cfg, "num_hidden_layers", "?")),
            "hidden size": str(getattr(cfg, "hidden_size", "?")),
            "routed layers": str(len(self.handles)),
            "experts": f"{handle.num_experts} per routed layer, top-{handle.top_k}" if handle else "none",
            "gate": handle.gate.kind if handle else "",
            "parameters": f"{params / 1e6:.2f} M",
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
        }
        if handle and handle.gate.shared_experts:
            card["shared experts"] = str(handle.gate.shared_experts)
        if getattr(self.model, "hf_device_map", None):
            card["device map"] = ", ".join(sorted({str(v) for v in self.model.hf_device_map.values()}))
        if self.path is not None:
            card["folder"] = str(self.path)
        return card

    def notes(self) -> list[str]:
        out = []
        gates = {h.gate.kind: h.gate for h in self.handles}
        for gate in gates.values():
            if gate.score == "sigmoid":
                out.append(
                    f"{gate.kind}: the gate's scores are sigmoids (they do not sum to 1 over the experts); "
                    "entropy and importance use them normalised."
                )
            if gate.note and "not one of the routers" in gate.note:
                out.append(gate.note)
        if self.vision:
            out.append("Image positions are the picture's placeholder tokens, one per merged patch cell.")
        return out

    # ---- data ----------------------------------------------------------------------------------
    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        examples, labels = hf_data.load_examples(data_dir, split)
        self._labels = labels
        return examples

    def routed_modules(self) -> dict:
        return {h.name: h for h in self.handles}

    # ---- running -------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    def _record(self, captured, b: int, length: int, meta, recorder: RoutingRecorder) -> None:
        for cap in captured:
            if cap.logits.shape[0] != b * length:
                raise RuntimeError(
                    f"{cap.handle.name}: router saw {cap.logits.shape[0]} positions, expected {b}x{length}"
                )
            shape = (b, length, -1)
            recorder.add(
                cap.handle.name,
                RouterOutput(
                    cap.logits.reshape(shape),
                    cap.probs.reshape(shape),
                    cap.topk_ids.reshape(shape),
                    cap.combine().reshape(shape),
                ),
                meta,
            )

    def _pooled(self, captured, valid: Tensor, mid: str | None) -> Tensor | None:
        cap = next((c for c in captured if c.handle.name == mid and c.hidden is not None), None)
        if cap is None:
            return None
        b, length = valid.shape
        hidden = cap.hidden.reshape(b, length, -1)
        w = valid.float().unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1)

    @torch.no_grad()
    def run(
        self, examples: Sequence[dict], record: bool = True, batch_size: int = 32, progress: bool = False
    ) -> RunOutput:
        recorder = RoutingRecorder(keep_graph=False) if record else None
        predictions, reps = [], []
        starts = range(0, len(examples), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="hf_moe run", unit="batch")
        mid = self.handles[len(self.handles) // 2].name if self.handles else None
        for start in starts:
            chunk = list(examples[start : start + batch_size])
            step = self._run_answers if self.vision else self._run_lm
            rows, rep = step(chunk, recorder, mid)
            predictions += rows
            if rep is not None:
                reps.append(rep)
        return RunOutput(predictions, recorder, {}, torch.cat(reps) if reps else None)

    def _run_lm(self, chunk: list[dict], recorder, mid):
        batch = enc.encode_texts(self.tokenizer, [e["text"] for e in chunk], self.max_length)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        meta = enc.position_meta(self.tokenizer, self._text_config(), ids, mask, [e["index"] for e in chunk])
        with self.capture.recording(hidden_of=(mid,) if mid else ()) as captured:
            out = self.model(**self._to_device(batch), use_cache=False)
        if recorder is not None:
            self._record(captured, ids.shape[0], ids.shape[1], meta, recorder)
        logits = out.logits.float().cpu()
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        scored = (mask[:, 1:] * mask[:, :-1]).bool()
        top = logits[:, -1].log_softmax(-1).topk(5, dim=-1)
        rows = []
        for b, example in enumerate(chunk):
            token_losses = losses[b][scored[b]].tolist()
            mean = float(np.mean(token_losses)) if token_losses else float("nan")
            nexts = [self.tokenizer.decode([int(t)]) for t in top.indices[b]]
            rows.append(
                {
                    "index": int(example["index"]),
                    "id": example.get("id"),
                    "prediction": nexts[0],
                    "prediction_id": int(top.indices[b, 0]),
                    "gold": None,
                    "gold_id": None,
                    "correct": None,
                    "score": -mean,
                    "loss": mean,
                    "token_losses": token_losses,
                    "next_tokens": nexts,
                    "next_token_logprobs": [float(v) for v in top.values[b]],
                }
            )
        return rows, self._pooled(captured, mask, mid)

    def _generate(self, chunk: list[dict]):
        """Greedy answers: (full sequences [B, P+T], prompt length P, answer lengths, answers, scores, batch)."""
        batch = enc.encode_vl(self.processor, chunk, self.prompt_order)
        prompt_len = batch["input_ids"].shape[1]
        tok = self.tokenizer
        out = self.model.generate(
            **self._to_device(batch),
            max_new_tokens=self.max_answer_tokens,
            do_sample=False,
            pad_token_id=enc.pad_id(tok),
            eos_token_id=tok.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        seqs = out.sequences.cpu()
        new = seqs[:, prompt_len:]
        stops = [tok.eos_token_id, tok.pad_token_id]
        lengths, answers, scores = [], [], []
        logp = torch.stack([s.float().log_softmax(-1).cpu() for s in out.scores], 1) if out.scores else None
        for b in range(new.shape[0]):
            row = new[b].tolist()
            n = next((i for i, t in enumerate(row) if t in stops), len(row))
            lengths.append(n)
            answers.append(tok.decode(row[:n], skip_special_tokens=True).strip())
            scores.append(float(sum(logp[b, i, row[i]] for i in range(n))) if logp is not None and n else 0.0)
        return seqs, prompt_len, lengths, answers, scores, batch

    def _full_batch(self, batch: dict, seqs: Tensor, prompt_len: int, lengths: list[int]) -> dict:
        """The prompt plus the generated answer tokens (not their end token) as one forward's inputs."""
        b, total = seqs.shape
        answer_mask = torch.zeros((b, total - prompt_len), dtype=torch.long)
        for i, n in enumerate(lengths):
            answer_mask[i, :n] = 1
        full = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        full["input_ids"] = seqs
        full["attention_mask"] = torch.cat([batch["attention_mask"].cpu(), answer_mask], 1)
        if "mm_token_type_ids" in batch:
            mm = batch["mm_token_type_ids"].cpu()
            full["mm_token_type_ids"] = torch.cat([mm, torch.zeros((b, total - prompt_len), dtype=mm.dtype)], 1)
        return full

    def _run_answers(self, chunk: list[dict], recorder, mid):
        seqs, prompt_len, lengths, answers, scores, batch = self._generate(chunk)
        full = self._full_batch(batch, seqs, prompt_len, lengths)
        rows = []
        for b, example in enumerate(chunk):
            gold = example.get("answer")
            rows.append(
                {
                    "index": int(example["index"]),
                    "id": example.get("id"),
                    "prediction": answers[b],
                    "answer": answers[b],
                    "gold": gold,
                    "gold_id": None,
                    "correct": bool(exact_match(answers[b], gold)) if gold is not None else None,
                    "score": scores[b],
                }
            )
        mask = full["attention_mask"]
        layout = enc.image_layout(self.hf_config, full, len(chunk))
        meta = enc.position_meta(
            self.tokenizer,
            self.hf_config,
            seqs,
            mask,
            [e["index"] for e in chunk],
            answer_start=[prompt_len] * len(chunk),
            layout=layout,
        )
        with self.capture.recording(hidden_of=(mid,) if mid else ()) as captured:
            self.model(**self._to_device(full), use_cache=False)
        if recorder is not None:
            self._record(captured, seqs.shape[0], seqs.shape[1], meta, recorder)
        prompt_valid = mask.clone()
        prompt_valid[:, prompt_len:] = 0
        return rows, self._pooled(captured, prompt_valid, mid)

    # ---- metrics -------------------------------------------------------------------------------
    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        by_index = {int(e["index"]): e for e in examples}
        labels = sorted({k for e in examples for k in (e.get("labels") or {})})
        groups: dict[str, dict[str, list[dict]]] = {lab: {} for lab in labels}
        for p in predictions:
            example = by_index.get(int(p["index"]), {})
            for lab in labels:
                groups[lab].setdefault(str((example.get("labels") or {}).get(lab, "unknown")), []).append(p)
        block = self._answer_block if self.vision else self._loss_block
        summary = {"overall": block(list(predictions), by_index)}
        for lab in labels:
            summary[f"by_{lab}"] = {value: block(rows, by_index) for value, rows in sorted(groups[lab].items())}
        return summary

    @staticmethod
    def _answer_block(rows: list[dict], by_index: dict) -> dict:
        flags = [
            bool(exact_match(p.get("prediction"), by_index.get(int(p["index"]), {}).get("answer", p.get("gold"))))
            for p in rows
            if by_index.get(int(p["index"]), {}).get("answer", p.get("gold")) is not None
        ]
        return {"exact_match": float(np.mean(flags)) if flags else float("nan"), "n": len(rows)}

    @staticmethod
    def _loss_block(rows: list[dict], by_index: dict) -> dict:
        losses = [v for p in rows for v in (p.get("token_losses") or [])]
        mean = float(np.mean(losses)) if losses else float("nan")
        return {
            "loss": mean,
            "perplexity": float(math.exp(mean)) if losses and mean < 50 else float("nan"),
            "tokens": len(losses),
            "n": len(rows),
        }

    # ---- attribution ---------------------------------------------------------------------------
    def _prepare(self, example: dict) -> dict:
        """The one example's forward inputs (VL: prompt + predicted answer), cached per knockout state."""
        image = example.get("image")
        key = (
            example.get("id"),
            example.get("text"),
            example.get("question"),
            example.get("image_path"),
            id(image) if image is not None else None,
            self.knockout_state(),
        )
        if key in self._prepared:
            return self._prepared[key]
        if len(self._prepared) > 32:
            self._prepared.clear()
        with torch.no_grad():
            if self.vision:
                seqs, prompt_len, lengths, answers, _, batch = self._generate([example])
                full = self._full_batch(batch, seqs, prompt_len, lengths)
                full["input_ids"] = full["input_ids"][:, : prompt_len + lengths[0]]
                full["attention_mask"] = full["attention_mask"][:, : prompt_len + lengths[0]]
                if "mm_token_type_ids" in full:
                    full["mm_token_type_ids"] = full["mm_token_type_ids"][:, : prompt_len + lengths[0]]
                state = {"batch": full, "prompt_len": prompt_len, "answer": answers[0]}
            else:
                batch = enc.encode_texts(self.tokenizer, [example["text"]], self.max_length)
                state = {"batch": batch, "prompt_len": batch["input_ids"].shape[1], "answer": None}
        if self.vision and state["batch"].get("image_grid_thw") is not None:
            thw = tuple(int(x) for x in state["batch"]["image_grid_thw"][0])
            state["thw"] = thw
            state["order"] = enc.patch_order(thw, enc.image_layout(self.hf_config, state["batch"], 1).merge)
        self._prepared[key] = state
        return state

    def _patch_embed(self) -> nn.Module | None:
        visual = getattr(getattr(self.model, "model", self.model), "visual", None)
        return getattr(visual, "patch_embed", None) if visual is not None else None

    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        state = self._prepare(example)
        batch = self._to_device(state["batch"])
        with torch.no_grad():
            out = {"tokens": self.model.get_input_embeddings()(batch["input_ids"]).detach()}
            patch = self._patch_embed()
            if self.vision and "order" in state and patch is not None:
                embeds = patch(batch["pixel_values"]).detach()
                out["image"] = embeds[state["order"].to(embeds.device)].unsqueeze(0)
        return out

    @contextlib.contextmanager
    def _injected(self, tokens: Tensor, patches: Tensor | None, order: Tensor | None) -> Iterator[None]:
        """The embedding layer (and the patch embedding) return the given tensors instead."""
        hooks = [self.model.get_input_embeddings().register_forward_hook(lambda m, a, o: tokens.to(o.dtype))]
        if patches is not None:
            inverse = torch.argsort(order).to(patches.device)

            def patch_hook(module, args, output):
                return patches[:, inverse].reshape(-1, patches.shape[-1]).to(output.dtype)

            hooks.append(self._patch_embed().register_forward_hook(patch_hook))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def _forward_rows(self, state: dict, tokens: Tensor, patches: Tensor | None):
        n = tokens.shape[0]
        batch = self._to_device(state["batch"])
        rows = {
            k: (
                v.expand(n, *v.shape[1:])
                if k in ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids")
                else v
            )
            for k, v in batch.items()
        }
        if "pixel_values" in rows:
            rows["pixel_values"] = batch["pixel_values"].repeat(n, 1)
            rows["image_grid_thw"] = batch["image_grid_thw"].repeat(n, 1)
        with self._injected(tokens, patches, state.get("order")):
            return self.model(**rows, use_cache=False)

    def attribution_forward(
        self,
        example: dict,
        target: str,
        layer: str | None = None,
        expert: int | None = None,
        position: int | None = None,
        call: str | None = None,
    ) -> Callable[..., Tensor]:
        state = self._prepare(example)
        prompt_last = state["prompt_len"] - 1
        if target in ("answer_logit", "next_token_logit"):
            if target == "answer_logit" and not self.vision or target == "next_token_logit" and self.vision:
                raise ValueError(
                    f"target {target!r} is not this model's; declared: {[t.name for t in self.attribution_targets()]}"
                )
            token = self._target_token(example, state)

            def logit(*tensors: Tensor) -> Tensor:
                out = self._forward_rows(state, tensors[0], tensors[1] if len(tensors) > 1 else None)
                return out.logits[:, prompt_last, token].float()

            return logit
        if target == "router_logit":
            names = [h.name for h in self.handles]
            if layer not in names:
                raise KeyError(f"unknown routed layer {layer!r}; layers: {names}")
            length = state["batch"]["input_ids"].shape[1]
            handle = self.handles[names.index(layer)]
            if position is None or not 0 <= position < length:
                raise ValueError(f"position must be in 0..{length - 1}, got {position}")
            if expert is None or not 0 <= expert < handle.num_experts:
                raise ValueError(f"expert must be in 0..{handle.num_experts - 1}, got {expert}")

            def router_logit(*tensors: Tensor) -> Tensor:
                with self.capture.recording(keep_graph=True) as captured:
                    self._forward_rows(state, tensors[0], tensors[1] if len(tensors) > 1 else None)
                cap = next(c for c in captured if c.handle.name == layer)
                return cap.logits.reshape(tensors[0].shape[0], length, -1)[:, position, expert].float()

            return router_logit
        raise ValueError(
            f"unknown attribution target {target!r}; declared: {[t.name for t in self.attribution_targets()]}"
        )

    def _target_token(self, example: dict, state: dict) -> int:
        ids = state["batch"]["input_ids"]
        if self.vision:
            gold = normalise_answer(example.get("answer")) if example.get("answer") else ""
            if gold:
                first = self.tokenizer(gold, add_special_tokens=False)["input_ids"]
                if first and first[0] != self.tokenizer.unk_token_id:
                    return int(first[0])
            if ids.shape[1] > state["prompt_len"]:
                return int(ids[0, state["prompt_len"]])
            return int(self.tokenizer.eos_token_id or 0)
        with torch.no_grad():
            out = self.model(**self._to_device(state["batch"]), use_cache=False)
        return int(out.logits[0, -1].argmax())

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        state = self._prepare(example)
        batch = state["batch"]
        layout = enc.image_layout(self.hf_config, batch, 1) if self.vision else None
        meta = enc.position_meta(
            self.tokenizer,
            self.hf_config if self.vision else self._text_config(),
            batch["input_ids"],
            batch["attention_mask"],
            [0],
            answer_start=[state["prompt_len"]] if self.vision else None,
            layout=layout,
        )
        out = {"tokens": list(meta.tokens[0])}
        if "thw" in state:
            _, h, w = state["thw"]
            out["image"] = [f"patch {r},{c}" for r in range(h) for c in range(w)]
        return out

    def input_grids(self, example: dict) -> dict[str, ImageGrid]:
        if not self.vision:
            return {}
        state = self._prepare(example)
        if "thw" not in state:
            return {}
        _, h, w = state["thw"]
        return {"image": ImageGrid(h, w, 0)}

"""Training the family's demo models from scratch on the CPU: real ``transformers`` classes, their
own losses (cross-entropy plus the model's load-balancing loss, ``output_router_logits=True``), saved
with ``save_pretrained`` (the layout a user's checkpoint has), plus MoEscope's extras beside them:
``snapshots/step_<N>.safetensors``, ``train_log.parquet`` and ``moescope.json`` (task, data, recipe).

Two tasks:

* ``lm``: a text MoE language model on JSONL records (:func:`train_lm`);
* ``vl_qa``: a vision-language MoE answering product-QA questions (:func:`train_vl_qa`): the prompt is
  [picture; context; question] as the processor renders it, the target the answer tokens and the end
  token (the prompt is not scored).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as hf_data
from . import encoding as enc
from .build import build_vl_processor, build_word_tokenizer, text_moe_config, vl_moe_config
from .loading import SIDECAR


@dataclass
class Recipe:
    """What a demo run trains; JSON-able (also the run's fingerprint)."""
    task: str                                  # "lm" | "vl_qa"
    arch: str = "olmoe"                        # lm: a text MoE model_type
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01                # the config's router_aux_loss_coef
    snapshot_every: int = 100
    log_every: int = 10
    seed: int = 0
    threads: int = 1
    model: dict = field(default_factory=dict)  # build.text_moe_config / vl_moe_config keyword arguments
    max_length: int = 256
    image_size: int = 64
    patch_size: int = 8
    prompt_lm_weight: float = 0.0              # vl_qa: weight of a language-model loss on the prompt's text
    curriculum_steps: int = 0                  # vl_qa: contexts grow from the answer's sentence to the whole


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - recipe.warmup_steps) / span)))


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))


def _route_row(model, router_logits, valid: torch.Tensor, top_k: int) -> dict:
    """Per routed layer: normalised token entropy and max load (x E) over the valid positions."""
    row = {}
    if not router_logits:
        return row
    keep = valid.reshape(-1).bool()
    for i, logits in enumerate(router_logits):
        logits = logits.detach().float()
        if logits.shape[0] != keep.shape[0]:
            continue
        probs = logits[keep].softmax(-1)
        e = probs.shape[-1]
        ent = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / math.log(e))
        load = torch.bincount(probs.topk(min(top_k, e), -1).indices.reshape(-1), minlength=e).float()
        row[f"route.layers.{i}.token_entropy_norm"] = ent
        row[f"route.layers.{i}.max_load"] = float(load.max() / load.sum() * e)
    return row


def _train_loop(model, batches, recipe: Recipe, ckpt_dir: Path, progress: bool, top_k: int) -> list[dict]:
    from mmoe_core.checkpoint import save_snapshot
    opt = _optimizer(model, recipe)
    model.train()
    log, started = [], time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=recipe.steps, desc=f"hf_moe {recipe.task}", unit="step")
    for step in range(recipe.steps):
        batch = next(batches)
        lr = _lr_at(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        prompt_labels = batch.pop("prompt_labels", None)
        out = model(**batch, output_router_logits=True, use_cache=False)
        loss = out.loss
        if prompt_labels is not None and recipe.prompt_lm_weight:
            logits = out.logits[:, :-1]
            loss = loss + recipe.prompt_lm_weight * torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), prompt_labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else float("nan")
            row = {"step": step, "epoch": 0, "time_s": round(time.perf_counter() - started, 3), "lr": lr,
                   "loss": loss.item(), "loss.balance": aux,
                   "loss.task": out.loss.item() - recipe.aux_loss_coef * aux if aux == aux else out.loss.item()}
            row.update(_route_row(model, getattr(out, "router_logits", None), batch["attention_mask"], top_k))
            log.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}")
        if recipe.snapshot_every and (step + 1) % recipe.snapshot_every == 0 and step + 1 < recipe.steps:
            save_snapshot(model, ckpt_dir, step + 1)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return log


def _finish(model, saver, ckpt_dir: Path, recipe: Recipe, log: list[dict], sidecar: dict, started: float) -> None:
    import pandas as pd
    model.save_pretrained(ckpt_dir)
    saver.save_pretrained(ckpt_dir)
    pd.DataFrame(log).to_parquet(ckpt_dir / "train_log.parquet", index=False)
    sidecar = {**sidecar, "recipe": asdict(recipe), "train_seconds": round(time.perf_counter() - started, 1),
               "final_loss": log[-1]["loss"] if log else None}
    (ckpt_dir / SIDECAR).write_text(json.dumps(sidecar, indent=1))


def _fresh_dir(ckpt_dir: Path) -> Path:
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    return ckpt_dir


def _seed(recipe: Recipe) -> np.random.Generator:
    torch.manual_seed(recipe.seed)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    return np.random.default_rng(recipe.seed)


# ------------------------------------------------------------------------------------------------
# Text MoE language model
# ------------------------------------------------------------------------------------------------

def train_lm(data_dir: Path, ckpt_dir: Path, recipe: Recipe, progress: bool = False) -> Path:
    from transformers import AutoModelForCausalLM
    started = time.perf_counter()
    rng = _seed(recipe)
    examples, labels = hf_data.load_examples(data_dir, "train")
    tokenizer = build_word_tokenizer(e["text"] for e in examples)
    ids = [enc.encode_texts(tokenizer, [e["text"]], recipe.max_length)["input_ids"][0].tolist() for e in examples]
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    config = text_moe_config(recipe.arch, len(tokenizer), special_ids=special, max_positions=recipe.max_length,
                             router_aux_loss_coef=recipe.aux_loss_coef, **recipe.model)
    model = AutoModelForCausalLM.from_config(config)
    ckpt_dir = _fresh_dir(ckpt_dir)
    pad = enc.pad_id(tokenizer)

    def batches():
        while True:
            order = rng.permutation(len(ids))
            for start in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
                rows = [ids[int(i)] + [tokenizer.eos_token_id] for i in order[start:start + recipe.batch_size]]
                batch = enc.pad_left(rows, pad)
                yield {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}
    log = _train_loop(model, batches(), recipe, ckpt_dir, progress, config.num_experts_per_tok)
    _finish(model, tokenizer, ckpt_dir, recipe, log,
            {"task": "lm", "data_dir": str(data_dir), "labels": [_label_dict(lab) for lab in labels]}, started)
    return ckpt_dir


def _label_dict(label) -> dict:
    d = asdict(label)
    d["decides"] = {k: list(v) for k, v in d["decides"].items()}
    return d


# ------------------------------------------------------------------------------------------------
# Vision-language MoE answering product-QA questions
# ------------------------------------------------------------------------------------------------

def _qa_texts(examples: list[dict]) -> list[str]:
    return [enc.prompt_text(e) + " answer : " + (e.get("answer") or "") for e in examples]


def encode_qa_training(processor, examples: list[dict], answer_eos: int) -> list[dict]:
    """Per question: the processor's prompt ids (with its picture's placeholders), the answer ids
    (then the end token), and the picture's pixel values and grid; each picture processed once."""
    tok = processor.tokenizer
    by_image: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_image.setdefault(e.get("image_path") or "", []).append(i)
    rows: list[dict | None] = [None] * len(examples)
    for path, members in by_image.items():
        batch = enc.encode_vl(processor, [examples[members[0]]])
        pixels, thw = batch.get("pixel_values"), batch.get("image_grid_thw")
        for i in members:
            e = examples[i]
            prompt = enc.encode_vl(processor, [e]) if i != members[0] else batch
            answer = tok(" " + (e.get("answer") or ""), add_special_tokens=False)["input_ids"] + [answer_eos]
            rows[i] = {"prompt": prompt["input_ids"][0].tolist(), "mm": prompt["mm_token_type_ids"][0].tolist()
                       if "mm_token_type_ids" in prompt else None, "answer": answer, "pixels": pixels, "thw": thw}
    return rows  # type: ignore[return-value]


def qa_batch(rows: list[dict], pad: int, prompt_labels: bool = False) -> dict:
    """Right-padded prompt + answer sequences; labels only on the answer tokens (``prompt_labels``:
    also the prompt's text tokens as separate labels, for a language-model loss on the prompt)."""
    seqs = [r["prompt"] + r["answer"] for r in rows]
    length = max(len(s) for s in seqs)
    n = len(rows)
    ids = torch.full((n, length), pad, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mm = torch.zeros((n, length), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        ids[i, :len(s)] = torch.as_tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(r["prompt"]):len(s)] = torch.as_tensor(r["answer"])
        if r["mm"] is not None:
            mm[i, :len(r["mm"])] = torch.as_tensor(r["mm"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": mm}
    if prompt_labels:
        text = (mask == 1) & (mm == 0) & (labels == -100)
        batch["prompt_labels"] = ids.masked_fill(~text, -100)
    pictures = [r for r in rows if r["pixels"] is not None]
    if pictures:
        batch["pixel_values"] = torch.cat([r["pixels"] for r in pictures])
        batch["image_grid_thw"] = torch.cat([r["thw"] for r in pictures])
    return batch


def _sentences(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", " ").split(". ") if part.strip()]


def _short_context_row(processor, example: dict, row: dict, share: float, rng: np.random.Generator) -> dict:
    """Curriculum: the context cut to the sentences that hold the answer plus a ``share`` of the others
    (in their order), re-encoded by the processor; answers and pictures unchanged."""
    sentences = _sentences(str(example.get("text") or ""))
    answer = str(example.get("answer") or "").lower()
    holds = [answer and answer in f" {s.lower()} " for s in sentences]
    others = [i for i, h in enumerate(holds) if not h]
    keep = set(i for i, h in enumerate(holds) if h)
    n = int(round(share * len(others)))
    keep |= set(int(i) for i in rng.choice(others, size=n, replace=False)) if n and others else set()
    text = ". ".join(sentences[i].rstrip(".") for i in sorted(keep)) + "."
    prompt = enc.encode_vl(processor, [{**example, "text": text}])
    return {**row, "prompt": prompt["input_ids"][0].tolist(),
            "mm": prompt["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in prompt else None}


def train_vl_qa(data_dir: Path, ckpt_dir: Path, recipe: Recipe, progress: bool = False) -> Path:
    from transformers import AutoModelForImageTextToText
    started = time.perf_counter()
    rng = _seed(recipe)
    examples, labels = hf_data.load_examples(data_dir, "train")
    tokenizer = build_word_tokenizer(_qa_texts(examples), vision=True)
    processor = build_vl_processor(tokenizer, image_size=recipe.image_size, patch_size=recipe.patch_size)
    config = vl_moe_config(tokenizer, image_size=recipe.image_size, patch_size=recipe.patch_size,
                           router_aux_loss_coef=recipe.aux_loss_coef, **recipe.model)
    model = AutoModelForImageTextToText.from_config(config)
    model.config.router_aux_loss_coef = recipe.aux_loss_coef
    ckpt_dir = _fresh_dir(ckpt_dir)
    rows = encode_qa_training(processor, examples, tokenizer.eos_token_id)
    pad = enc.pad_id(tokenizer)

    def batches():
        step = 0
        while True:
            order = rng.permutation(len(rows))
            for start in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
                picked = [int(i) for i in order[start:start + recipe.batch_size]]
                chosen = [rows[i] for i in picked]
                if step < recipe.curriculum_steps:
                    share = (step + 1) / recipe.curriculum_steps
                    chosen = [_short_context_row(processor, examples[i], rows[i], share, rng) for i in picked]
                step += 1
                yield qa_batch(chosen, pad, prompt_labels=recipe.prompt_lm_weight > 0)
    top_k = config.text_config.num_experts_per_tok
    log = _train_loop(model, batches(), recipe, ckpt_dir, progress, top_k)
    _finish(model, processor, ckpt_dir, recipe, log,
            {"task": "vl_qa", "data_dir": str(data_dir), "max_answer_tokens": 6,
             "labels": [_label_dict(lab) for lab in labels]}, started)
    return ckpt_dir

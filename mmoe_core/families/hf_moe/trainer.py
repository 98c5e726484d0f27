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

    task: str  # "lm" | "vl_qa"
    arch: str = "olmoe"  # lm: a text MoE model_type
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # the config's router_aux_loss_coef
    snapshot_every: int = 100
    log_every: int = 10
    seed: int = 0
    threads: int = 1
    model: dict = field(default_factory=dict)  # build.text_moe_config / vl_moe_config keyword arguments
    max_length: int = 256
    image_size: int = 64
    patch_size: int = 8
    prompt_lm_weight: float = 0.0  # vl_qa: weight of a language-model loss on the prompt's text
    curriculum_steps: int = 0  # vl_qa: contexts grow from the answer's sentence to the whole
    prompt_order: str = "question_first"  # vl_qa: question_first | question_last (see encoding.vl_prompt)
    pack_questions: bool = False  # vl_qa: all of a product's questions in one sequence (question
    # last); batch_size then counts products


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - recipe.warmup_steps) / span)))


def _optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )


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
                logits.reshape(-1, logits.shape[-1]), prompt_labels[:, 1:].reshape(-1), ignore_index=-100
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else float("nan")
            row = {
                "step": step,
                "epoch": 0,
                "time_s": round(time.perf_counter() - started, 3),
                "lr": lr,
                "loss": loss.item(),
                "loss.balance": aux,
                "loss.task": out.loss.item() - recipe.aux_loss_coef * aux if aux == aux else out.loss.item(),
            }
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(ckpt_dir)
    saver.save_pretrained(ckpt_dir)
    pd.DataFrame(log).to_parquet(ckpt_dir / "train_log.parquet", index=False)
    sidecar = {
        **sidecar,
        "recipe": asdict(recipe),
        "train_seconds": round(time.perf_counter() - started, 1),
        "final_loss": log[-1]["loss"] if log else None,
    }
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
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = text_moe_config(
        recipe.arch,
        len(tokenizer),
        special_ids=special,
        max_positions=recipe.max_length,
        router_aux_loss_coef=recipe.aux_loss_coef,
        **recipe.model,
    )
    model = AutoModelForCausalLM.from_config(config)
    ckpt_dir = _fresh_dir(ckpt_dir)
    pad = enc.pad_id(tokenizer)

    def batches():
        while True:
            order = rng.permutation(len(ids))
            for start in range(0, len(order) - recipe.batch_size + 1, recipe.batch_size):
                rows = [ids[int(i)] + [tokenizer.eos_token_id] for i in order[start : start + recipe.batch_size]]
                batch = enc.pad_left(rows, pad)
                yield {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}

    log = _train_loop(model, batches(), recipe, ckpt_dir, progress, config.num_experts_per_tok)
    _finish(
        model,
        tokenizer,
        ckpt_dir,
        recipe,
        log,
        {"task": "lm", "data_dir": str(data_dir), "labels": [_label_dict(lab) for lab in labels]},
        started,
    )
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


def _sentences(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", " ").split(". ") if part.strip()]


def short_context(text: str, answers: list[str], share: float, rng: np.random.Generator) -> str:
    """Curriculum: ``text`` cut to the sentences that hold one of the answers plus a ``share`` of the
    other sentences, in their order."""
    sentences = _sentences(text)
    wanted = [a.lower() for a in answers if a]
    holds = [any(f" {a} " in f" {s.lower().rstrip('.')} " for a in wanted) for s in sentences]
    others = [i for i, h in enumerate(holds) if not h]
    keep = {i for i, h in enumerate(holds) if h}
    n = int(round(share * len(others)))
    if n and others:
        keep |= {int(i) for i in rng.choice(others, size=n, replace=False)}
    return ". ".join(sentences[i].rstrip(".") for i in sorted(keep)) + "."


def qa_row(processor, group: list[dict], order: str, text: str | None = None) -> dict:
    """One training sequence: the processor's prompt for the group's first question (its picture's
    placeholders expanded), that answer and the end token; with more questions of the same product
    (packing, ``question_last`` order), each next one as " question: ... answer :" + answer + end."""
    tok = processor.tokenizer
    first = group[0] if text is None else {**group[0], "text": text}
    prompt = enc.encode_vl(processor, [first], order)
    ids = prompt["input_ids"][0].tolist()
    mm = prompt["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in prompt else [0] * len(ids)
    label = [0] * len(ids)
    for k, e in enumerate(group):
        if k:
            more = tok(f" {enc.question_text(e)} answer :", add_special_tokens=False)["input_ids"]
            ids, label = ids + more, label + [0] * len(more)
        answer = tok(" " + (e.get("answer") or ""), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids, label = ids + answer, label + [1] * len(answer)
    mm = mm + [0] * (len(ids) - len(mm))
    return {
        "ids": ids,
        "label": label,
        "mm": mm,
        "pixels": prompt.get("pixel_values"),
        "thw": prompt.get("image_grid_thw"),
    }


def _find(seq: list[int], part: list[int]) -> int:
    """Index of the first occurrence of ``part`` in ``seq`` (-1 if none)."""
    n = len(part)
    if not n:
        return -1
    first = part[0]
    for i in range(len(seq) - n + 1):
        if seq[i] == first and seq[i : i + n] == part:
            return i
    return -1


def with_context(row: dict, tokenizer, full_text: str, text: str) -> dict | None:
    """``row`` (from :func:`qa_row`) with its context ``full_text`` replaced by ``text``, by splicing the
    tokens: the processor (chat template, picture preprocessing, placeholder expansion) is not run again
    for the curriculum's shortened contexts, whose picture and question stay the same. None when the
    context's tokens are not found as one run in the row (then the caller runs the processor)."""
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    short = tokenizer(text, add_special_tokens=False)["input_ids"]
    at = _find(row["ids"], full)
    if at < 0 or any(row["label"][at : at + len(full)]) or any(row["mm"][at : at + len(full)]):
        return None
    end = at + len(full)

    def splice(values: list[int], middle: list[int]) -> list[int]:
        return values[:at] + middle + values[end:]

    text_only = [0] * len(short)  # the context is text and carries no answer label
    return {
        **row,
        "ids": splice(row["ids"], short),
        "label": splice(row["label"], text_only),
        "mm": splice(row["mm"], text_only),
    }


def qa_groups(examples: list[dict], pack: bool, rng: np.random.Generator) -> list[list[int]]:
    """Questions grouped by product (same picture and text) when packing, else one question a group."""
    if not pack:
        return [[i] for i in range(len(examples))]
    by_source: dict[tuple, list[int]] = {}
    for i, e in enumerate(examples):
        by_source.setdefault((e.get("image_path") or "", e.get("text") or ""), []).append(i)
    return [list(rng.permutation(members)) for members in by_source.values()]


def qa_batch(rows: list[dict], pad: int, prompt_labels: bool = False) -> dict:
    """Right-padded sequences; labels on the answer tokens only (``prompt_labels``: the other text
    tokens as separate labels, for a language-model loss on the prompt)."""
    length = max(len(r["ids"]) for r in rows)
    n = len(rows)
    ids = torch.full((n, length), pad, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    mm = torch.zeros((n, length), dtype=torch.long)
    for i, r in enumerate(rows):
        m = len(r["ids"])
        row = torch.as_tensor(r["ids"])
        ids[i, :m], mask[i, :m], mm[i, :m] = row, 1, torch.as_tensor(r["mm"])
        labels[i, :m] = row.masked_fill(torch.as_tensor(r["label"]) == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": mm}
    if prompt_labels:
        text = (mask == 1) & (mm == 0) & (labels == -100)
        batch["prompt_labels"] = ids.masked_fill(~text, -100)
    pictures = [r for r in rows if r["pixels"] is not None]
    if pictures:
        batch["pixel_values"] = torch.cat([r["pixels"] for r in pictures])
        batch["image_grid_thw"] = torch.cat([r["thw"] for r in pictures])
    return batch


def train_vl_qa(data_dir: Path, ckpt_dir: Path, recipe: Recipe, progress: bool = False) -> Path:
    from transformers import AutoModelForImageTextToText

    started = time.perf_counter()
    rng = _seed(recipe)
    examples, labels = hf_data.load_examples(data_dir, "train")
    tokenizer = build_word_tokenizer(_qa_texts(examples), vision=True)
    processor = build_vl_processor(tokenizer, image_size=recipe.image_size, patch_size=recipe.patch_size)
    config = vl_moe_config(
        tokenizer,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        router_aux_loss_coef=recipe.aux_loss_coef,
        **recipe.model,
    )
    model = AutoModelForImageTextToText.from_config(config)
    model.config.router_aux_loss_coef = recipe.aux_loss_coef
    ckpt_dir = _fresh_dir(ckpt_dir)
    order = enc.QUESTION_LAST if recipe.pack_questions else recipe.prompt_order
    groups = qa_groups(examples, recipe.pack_questions, rng)
    rows = [qa_row(processor, [examples[i] for i in g], order) for g in groups]
    pad = enc.pad_id(tokenizer)

    def batches():
        step = 0
        while True:
            for start in range(0, len(groups) - recipe.batch_size + 1, recipe.batch_size):
                picked = [int(i) for i in perm[start : start + recipe.batch_size]]
                if step < recipe.curriculum_steps:
                    share = (step + 1) / recipe.curriculum_steps
                    chosen = []
                    for g in picked:
                        group = [examples[i] for i in groups[g]]
                        text = short_context(
                            group[0].get("text") or "", [e.get("answer") or "" for e in group], share, rng
                        )
                        spliced = with_context(rows[g], tokenizer, group[0].get("text") or "", text)
                        chosen.append(spliced or qa_row(processor, group, order, text))
                else:
                    chosen = [rows[g] for g in picked]
                step += 1
                yield qa_batch(chosen, pad, prompt_labels=recipe.prompt_lm_weight > 0)
            perm[:] = rng.permutation(len(groups))

    perm = rng.permutation(len(groups))
    top_k = config.text_config.num_experts_per_tok
    log = _train_loop(model, batches(), recipe, ckpt_dir, progress, top_k)
    _finish(
        model,
        processor,
        ckpt_dir,
        recipe,
        log,
        {
            "task": "vl_qa",
            "data_dir": str(data_dir),
            "max_answer_tokens": 6,
            "prompt_order": order,
            "labels": [_label_dict(lab) for lab in labels],
        },
        started,
    )
    return ckpt_dir

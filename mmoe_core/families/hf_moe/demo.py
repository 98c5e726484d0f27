"""The family's two demo runs, trained from scratch on the CPU by the demo build.

* ``hf-qwen3vl-qa``: a Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, tiny config) trained on the
  product-QA world to generate answers; ``answer_source`` (image / context / both) is the ground truth
  for per-modality routing.
* ``hf-olmoe-corpus``: an OLMoE language model (``OlmoeForCausalLM``, tiny config) on the corpus world
  (entity, product, arithmetic, code documents); ``domain`` is the ground truth for specialisation.

Recipes are data (:data:`RECIPES`); ``tiny`` trains in seconds (the test fixture), ``default`` is sized
for about two to three minutes each on one CPU thread (numbers in BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from mmoe_core.registry import DemoRun

from .trainer import Recipe, train_lm, train_vl_qa

VL_RUN, LM_RUN = "hf-qwen3vl-qa", "hf-olmoe-corpus"

_VL_MODEL = {"hidden": 64, "layers": 2, "heads": 4, "experts": 8, "top_k": 2, "expert_hidden": 64,
             "vision_hidden": 64, "vision_depth": 2}
_LM_MODEL = {"hidden": 64, "layers": 4, "heads": 4, "experts": 8, "top_k": 2, "expert_hidden": 64}

RECIPES: dict[str, dict[str, Recipe]] = {
    VL_RUN: {
        "default": Recipe(task="vl_qa", steps=400, batch_size=32, lr=5e-3, warmup_steps=20, snapshot_every=100,
                          log_every=10, model=_VL_MODEL),
        "tiny": Recipe(task="vl_qa", steps=6, batch_size=8, lr=5e-3, warmup_steps=2, snapshot_every=3, log_every=2,
                       model={**_VL_MODEL, "hidden": 32, "expert_hidden": 32, "vision_hidden": 32, "vision_depth": 1,
                              "experts": 4}),
    },
    LM_RUN: {
        "default": Recipe(task="lm", arch="olmoe", steps=400, batch_size=32, lr=5e-3, warmup_steps=20,
                          snapshot_every=100, log_every=10, model=_LM_MODEL),
        "tiny": Recipe(task="lm", arch="olmoe", steps=6, batch_size=8, lr=5e-3, warmup_steps=2, snapshot_every=3,
                       log_every=2, model={**_LM_MODEL, "hidden": 32, "layers": 2, "expert_hidden": 32, "experts": 4}),
    },
}


def recipe(run: str, scale: str) -> Recipe:
    scales = RECIPES[run]
    if scale not in scales:
        raise ValueError(f"{run}: unknown scale {scale!r}; choose one of {sorted(scales)}")
    return replace(scales[scale])


def _trainer(run: str):
    def train(data_dir: Path, ckpt_dir: Path, scale: str, progress: bool = False) -> None:
        r = recipe(run, scale)
        (train_vl_qa if r.task == "vl_qa" else train_lm)(Path(data_dir), Path(ckpt_dir), r, progress)
    return train


def demo_runs(scale: str) -> list[DemoRun]:
    out = []
    for run, world, description in (
            (VL_RUN, "qa", "Qwen3-VL-MoE (transformers) trained from scratch on the product-QA world to generate "
                           "answers; answer source is the ground truth for per-modality routing"),
            (LM_RUN, "corpus", "OLMoE language model (transformers) trained from scratch on four known domains "
                               "(entity, product, arithmetic, code); domain is the ground truth for specialisation")):
        r = recipe(run, scale)
        fingerprint = {"run": run, "world": world, "scale": scale, "recipe": asdict(r), "family": "hf_moe"}
        out.append(DemoRun(run, "hf_moe", world, fingerprint, _trainer(run),
                           precompute={"split": "test"}, description=description))
    return out

"""The family's two demo runs, trained from scratch on the CPU by the demo build.

* ``hf-qwen3vl-qa``: a Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``, tiny config) trained on the
  product-QA world to generate answers; ``answer_source`` (image / context / both) is the ground truth
  for per-modality routing.
* ``hf-olmoe-corpus``: an OLMoE language model (``OlmoeForCausalLM``, tiny config) on the corpus world
  (entity, product, arithmetic, code documents); ``domain`` is the ground truth for specialisation.

Recipes are JSON data (``recipes/<run>.json``, read by :mod:`mmoe_core.factory` like every family's,
``options`` being :class:`.trainer.Recipe` fields); ``tiny`` trains in seconds (the test fixture),
``default`` is sized for a few minutes each on one CPU thread (numbers in BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmoe_core.registry import DemoRun

from .trainer import Recipe, train_lm, train_vl_qa

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
_RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}


def _recipes():
    from mmoe_core.factory import load_recipes

    return load_recipes(RECIPES_DIR)


def trainer_recipe(recipe, scale: str) -> Recipe:
    """The trainer's :class:`Recipe` from a factory recipe's resolved options (``family`` dropped)."""
    options = {k: v for k, v in recipe.resolved(scale).items() if k != "family"}
    if not options.get("family_options"):  # the factory's TrainOptions section; unused here
        options.pop("family_options", None)
    unknown = sorted(set(options) - _RECIPE_FIELDS)
    if unknown:
        raise ValueError(
            f"recipe {recipe.run} ({recipe.source}): unknown options {unknown}; known: {sorted(_RECIPE_FIELDS)}"
        )
    return Recipe(**options)


def _train(recipe, data_dir: Path, ckpt_dir: Path, scale: str, progress: bool = False) -> None:
    """Train into a staging folder beside ``ckpt_dir``, swapped in once complete (the previous model stays
    loadable if the training fails or is killed: mmoe_core.checkpoint.replacing_dir)."""
    from mmoe_core.checkpoint import replacing_dir

    r = trainer_recipe(recipe, scale)
    with replacing_dir(Path(ckpt_dir)) as staged:
        (train_vl_qa if r.task == "vl_qa" else train_lm)(Path(data_dir), staged, r, progress)


class _Train:
    """A picklable train callable (the demo build may spawn worker processes)."""

    def __init__(self, run: str):
        self.run = run

    def __call__(self, data_dir: Path, ckpt_dir: Path, scale: str, progress: bool = False) -> None:
        recipe = next(r for r in _recipes() if r.run == self.run)
        _train(recipe, data_dir, ckpt_dir, scale, progress)


def demo_runs(scale: str) -> list[DemoRun]:
    out = []
    for recipe in _recipes():
        trainer_recipe(recipe, scale)  # refuses a recipe with options the trainer does not know, here
        out.append(
            DemoRun(
                recipe.run,
                "hf_moe",
                recipe.world,
                recipe.fingerprint(scale),
                _Train(recipe.run),
                precompute=recipe.precompute_options(scale),
                description=recipe.description,
                cost=recipe.cost(scale),
            )
        )
    return out

"""Build the demo: both generated worlds and the demo runs, skipping what is already built.

    python -m mmoe_core.demo [--only RUN] [--force] [--scale default|tiny] [--jobs N]

* worlds: ``<artifacts>/data/entity/`` and ``<artifacts>/data/qa/`` (via mmoe_core.data.generate); a world
  is rebuilt only when missing or generated with another seed / scale;
* runs: ``<artifacts>/checkpoints/<run>/``; a run is skipped when it has config.json + model.safetensors
  and its stored recipe equals the current one (``--force`` retrains).

Recipes live in :data:`MMOE_RECIPES`; the MoEMoE recipe comes from ``mmoe_core.moemoe.demo_recipe(scale)``
(imported lazily; skipped with a message when that module is not importable or has no recipe).
``--scale tiny`` builds tiny worlds and a few dozen steps per run (seconds; for tests).

:func:`after_training` is the hook for what follows a run (e.g. precomputing its artifacts).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmoe_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_config
from mmoe_core.paths import artifacts_root
from mmoe_core.training import TrainOptions

WORLD_SEED = 0
SCALES = ("default", "tiny")


@dataclass(frozen=True)
class Recipe:
    """One demo run: a checkpoint name, the world it trains on and its TrainOptions fields."""
    run: str
    world: str                                    # "entity" | "qa"
    options: dict                                 # TrainOptions fields (family, steps, lr, gate, ...)
    tiny: dict = field(default_factory=dict)      # overrides for --scale tiny
    description: str = ""

    def resolved(self, scale: str) -> dict:
        """The options actually used at ``scale`` (without paths): also the fingerprint stored in config.json."""
        opts = {**self.options, **(self.tiny if scale == "tiny" else {})}
        family_options = {**self.options.get("family_options", {}),
                          **(self.tiny.get("family_options", {}) if scale == "tiny" else {})}
        opts["family_options"] = family_options
        return opts

    def fingerprint(self, scale: str) -> dict:
        return {"run": self.run, "world": self.world, "scale": scale, "world_seed": WORLD_SEED,
                "options": self.resolved(scale)}


# Shared by the three MMoE runs: tiny-64 towers trained from scratch together with the matcher. The
# learning rate (2e-3, warm-up then cosine decay) is far above the published 5e-6, which fine-tunes a
# pretrained CLIP: here nothing is pretrained. Batches carry hard negatives (4 entities of a name each).
# 200 steps of 32 mentions (~2.9 epochs). One CPU thread: ~0.4 s a step whatever else runs, where two
# threads take ~0.27 s on 2 idle cores but 5-20x longer when the cores are shared (OpenMP threads wait
# on each other's barriers), so the demo build stays predictable (BENCHMARKS.md, "Demo model quality").
_MMOE_BASE = dict(
    family="mmoe", steps=200, batch_size=32, lr=2e-3, lr_schedule="cosine", warmup_steps=20, threads=1,
    weight_decay=1e-4, grad_clip=1.0, experts=4, top_k=3, snapshot_every=50, log_every=10, seed=0,
    family_options={"encoder": "tiny-64", "image_dim": 32, "text_hidden": 32, "image_hidden": 32,
                    "cross_hidden": 32, "expert_mult": 2, "per_name": 4},
)
# --scale tiny (tests): smaller towers and a few dozen steps, seconds on 2 cores.
_MMOE_TINY = dict(steps=24, batch_size=16, warmup_steps=3, snapshot_every=8, log_every=4,
                  family_options={"encoder": "tiny-32", "image_dim": 16, "text_hidden": 16, "image_hidden": 16,
                                  "cross_hidden": 16, "expert_mult": 1})

MMOE_RECIPES: list[Recipe] = [
    # Balance weight 0.3: at 0.1 one IntraMoE layer stayed just past the top-3-of-4 warning line (busiest
    # expert chosen by 88-89% of positions instead of 75%); at 0.3 every layer is healthy and Hits@1 holds.
    Recipe("mmoe-balanced", "entity", {**_MMOE_BASE, "gate": "topk_softmax", "balance": 0.3},
           _MMOE_TINY, "standard gate (softmax, top-3 of 4, renormalised) with the switch balance loss"),
    # What it takes to collapse honestly: top-1 (the renormalised top-1 weight is always 1, so the task
    # never pulls the routers back), no balance loss, a specialisation-only entropy penalty from step 0
    # (MAGNET's second stage without its coverage stage), routers at 30x the learning rate and no warm-up,
    # so that they commit while the token features are still alike at initialisation.
    Recipe("mmoe-collapsing", "entity",
           {**_MMOE_BASE, "gate": "topk_softmax", "top_k": 1, "balance": 0.0, "router_lr_mult": 30.0,
            "warmup_steps": 0, "two_stage": True, "trigger_step": 0, "two_stage_weight": 1.0},
           {**_MMOE_TINY, "warmup_steps": 0},
           "top-1, no balance loss, specialisation-only entropy penalty, routers at 30x learning rate: "
           "the routers collapse"),
    Recipe("mmoe-reference-gate", "entity", {**_MMOE_BASE, "gate": "mmoe_reference", "balance": 0.0},
           _MMOE_TINY, "the published MEL-MMoE SwitchGate behaviour, no auxiliary loss (as published)"),
]


def family_recipes(scale: str) -> list[Recipe]:
    """Recipes other families supply (MoEMoE: ``mmoe_core.moemoe.demo_recipe(scale)``)."""
    try:
        from mmoe_core import moemoe
    except Exception as exc:  # noqa: BLE001 -- any import problem: skip that family, say why
        print(f"[demo] MoEMoE skipped: mmoe_core.moemoe is not importable ({exc})", file=sys.stderr)
        return []
    supply = getattr(moemoe, "demo_recipe", None)
    if not callable(supply):
        print("[demo] MoEMoE skipped: mmoe_core.moemoe has no demo_recipe(scale)", file=sys.stderr)
        return []
    recipe = supply(scale)
    recipes = recipe if isinstance(recipe, (list, tuple)) else [recipe]
    return [_as_recipe(r) for r in recipes if r is not None]


def _as_recipe(r) -> Recipe:
    """A Recipe from a Recipe, a dict, or a Recipe of another copy of this module (``python -m``)."""
    if isinstance(r, Recipe):
        return r
    if dataclasses.is_dataclass(r):
        r = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    return Recipe(**r)


def all_recipes(scale: str) -> list[Recipe]:
    return MMOE_RECIPES + family_recipes(scale)


# ---------------------------------------------------------------------------------------------
# Worlds
# ---------------------------------------------------------------------------------------------

def world_dir(world: str) -> Path:
    return artifacts_root() / "data" / world


def checkpoint_dir(run: str) -> Path:
    return artifacts_root() / "checkpoints" / run


def world_is_built(path: Path, scale: str, seed: int = WORLD_SEED) -> bool:
    info = path / "world.json"
    if not info.is_file():
        return False
    try:
        meta = json.loads(info.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("scale") == scale and meta.get("seed") == seed


def ensure_world(world: str, scale: str, force: bool = False) -> Path:
    from mmoe_core.data import generate
    path = world_dir(world)
    if not force and world_is_built(path, scale):
        print(f"[demo] world {world}: up to date at {path}", file=sys.stderr)
        return path
    make = {"entity": generate.generate_entity_world, "qa": generate.generate_qa_world}[world]
    started = time.perf_counter()
    make(path, seed=WORLD_SEED, scale=scale, progress=False)
    print(f"[demo] world {world}: generated at {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

def run_is_built(ckpt: Path, recipe: Recipe, scale: str) -> bool:
    if not (ckpt / CONFIG_NAME).is_file() or not (ckpt / WEIGHTS_NAME).is_file():
        return False
    try:
        config = load_config(ckpt)
    except ValueError:
        return False
    return config.get("recipe") == recipe.fingerprint(scale)


def train_options(recipe: Recipe, scale: str, data_dir: Path, out_dir: Path, progress: bool = True) -> TrainOptions:
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    opts = recipe.resolved(scale)
    unknown = sorted(set(opts) - fields)
    if unknown:
        raise ValueError(f"recipe {recipe.run}: unknown training options {unknown}")
    return TrainOptions(**{**opts, "data_dir": str(data_dir), "out_dir": str(out_dir), "progress": progress})


def train_run(recipe: Recipe, scale: str, data_dir: Path, progress: bool = True):
    from mmoe_core.training import get_trainer, train
    ckpt = checkpoint_dir(recipe.run)
    options = train_options(recipe, scale, data_dir, ckpt, progress)
    return train(get_trainer(options.family)(options), options, ckpt,
                 extra_config={"recipe": recipe.fingerprint(scale), "description": recipe.description})


def after_training(recipe: Recipe, ckpt: Path, data_dir: Path, scale: str, progress: bool = True) -> None:
    """Precompute the run's artifacts (analysis.precompute skips them when nothing changed).

    Imported lazily: analysis sits above mmoe_core, and training alone must not need it."""
    from analysis.precompute import precompute
    small = dict(attribution_sample=4, dynamics_sample=48, batch_dependence_sample=4) if scale == "tiny" else {}
    precompute(recipe.run, checkpoint=str(ckpt), data=str(data_dir), progress=progress, **small)


def build_run(recipe: Recipe, scale: str, data_dir: Path, force: bool = False, progress: bool = True,
              threads: int = 0) -> dict:
    """Train one run unless up to date, then precompute it; ``threads`` > 0 caps torch's threads."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    ckpt = checkpoint_dir(recipe.run)
    if not force and run_is_built(ckpt, recipe, scale):
        print(f"[demo] run {recipe.run}: up to date at {ckpt}", file=sys.stderr)
        info = {"checkpoint": str(ckpt), "trained": False, "seconds": 0.0}
    else:
        print(f"[demo] run {recipe.run}: training ({recipe.description})", file=sys.stderr)
        result = train_run(recipe, scale, data_dir, progress)
        print(f"[demo] run {recipe.run}: {result.steps} steps in {result.seconds:.1f} s -> {ckpt}", file=sys.stderr)
        info = {"checkpoint": str(ckpt), "trained": True, "seconds": round(result.seconds, 1)}
    started = time.perf_counter()
    after_training(recipe, ckpt, data_dir, scale, progress)
    info["precompute_seconds"] = round(time.perf_counter() - started, 1)
    return info


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def build(only: str | None = None, force: bool = False, scale: str = "default", progress: bool = True,
          jobs: int | None = None) -> dict:
    """Build worlds and runs; returns {run: {"checkpoint", "trained", "seconds", "precompute_seconds"}}.

    Runs are independent, so ``jobs`` > 1 builds that many at once in separate processes, one torch
    thread each (on a shared CPU, one thread per process beats two processes fighting over OpenMP
    barriers). The longest recipes start first.
    """
    recipes = all_recipes(scale)
    if only is not None:
        recipes = [r for r in recipes if r.run == only]
        if not recipes:
            raise SystemExit(f"unknown run {only!r}; demo runs: {[r.run for r in all_recipes(scale)]}")
    worlds = {r.world for r in recipes} if only else {"entity", "qa"}
    data = {w: ensure_world(w, scale) for w in sorted(worlds)}
    jobs = min(jobs or default_jobs(), len(recipes))
    report: dict[str, dict] = {}
    if jobs <= 1:
        for recipe in recipes:
            report[recipe.run] = build_run(recipe, scale, data[recipe.world], force, progress)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from tqdm import tqdm
        ordered = sorted(recipes, key=lambda r: -int(r.resolved(scale).get("steps", 0)))
        # spawn: a forked child would inherit the parent's torch/OpenMP state
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(build_run, r, scale, data[r.world], force, False, 1): r.run for r in ordered}
            with tqdm(total=len(futures), desc=f"demo runs ({jobs} at a time)", unit="run", disable=not progress,
                      file=sys.stderr) as bar:
                for future in as_completed(futures):
                    report[futures[future]] = future.result()
                    bar.update(1)
        report = {r.run: report[r.run] for r in recipes}
    return {"worlds": {w: str(p) for w, p in data.items()}, "runs": report}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmoe_core.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="build only this run (and its world)")
    p.add_argument("--force", action="store_true", help="retrain even when up to date")
    p.add_argument("--scale", choices=SCALES, default="default")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs built at once, one process and one torch thread each (default: CPU cores)")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be at least 1")
    out = build(args.only, args.force, args.scale, progress=not args.no_progress, jobs=args.jobs)
    for world, path in out["worlds"].items():
        print(f"world {world}: {path}")
    for run, info in out["runs"].items():
        state = f"trained in {info['seconds']} s" if info["trained"] else "up to date"
        state += f", precomputed in {info['precompute_seconds']} s"
        print(f"run {run}: {info['checkpoint']} ({state})")
    return 0


if __name__ == "__main__":
    # Run the importable module's main, so that family modules importing mmoe_core.demo (for Recipe)
    # share its classes with this run instead of a second copy living in __main__.
    from mmoe_core.demo import main as _main
    sys.exit(_main())

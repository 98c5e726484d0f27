"""Build the demo: the registered worlds and every family's demo runs, then their artifacts.

    python -m demo_build [--only RUN] [--force] [--scale default|tiny] [--jobs N] [--no-progress]

It sits above both layers because it needs both: it trains through ``mmoe_core`` (the registry's
``DemoRun`` entries, made by each family from its JSON recipes) and then precomputes through
``analysis``. No family is named here: what is built is what the registry lists.

* worlds: ``<artifacts>/data/<world>/`` for every registered :class:`mmoe_core.registry.World` (only the
  selected runs' worlds with ``--only``); one is rebuilt only when missing or of another seed / scale;
* runs: ``<artifacts>/checkpoints/<run>/``; a run is skipped when it holds config.json + model.safetensors
  and a ``demo_run.json`` whose fingerprint equals the run's current one (``--force`` retrains);
* artifacts: ``<artifacts>/runs/<run>/`` by ``analysis.precompute`` (which skips what has not changed).

``--scale tiny`` builds tiny worlds and a few dozen steps per run (seconds; for tests). ``--jobs N``
builds N runs at once in spawned processes, one torch thread each, the costliest first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mmoe_core import registry
from mmoe_core.allocator import keep_freed_memory
from mmoe_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from mmoe_core.errors import ConfigError, cli_entry
from mmoe_core.factory import SCALES
from mmoe_core.paths import artifacts_root

WORLD_SEED = 0
STAMP_NAME = "demo_run.json"  # what the demo build trained a checkpoint from (its skip test)


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr)


def world_dir(world: str) -> Path:
    return artifacts_root() / "data" / world


def checkpoint_dir(run: str) -> Path:
    return artifacts_root() / "checkpoints" / run


# ---------------------------------------------------------------------------------------------
# Worlds
# ---------------------------------------------------------------------------------------------


def ensure_world(name: str, scale: str, force: bool = False) -> Path:
    world = registry.worlds().get(name)
    if world is None:
        raise ConfigError(f"unknown world {name!r}; registered worlds: {sorted(registry.worlds())}")
    path = world_dir(name)
    if not force and world.is_built(path, scale, WORLD_SEED):
        log(f"world {name}: up to date at {path}")
        return path
    started = time.perf_counter()
    world.build(path, scale, WORLD_SEED)
    log(f"world {name}: generated at {path} in {time.perf_counter() - started:.1f} s")
    return path


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def stamp(run: registry.DemoRun, scale: str) -> dict:
    """What a built checkpoint must have been made from to count as up to date."""
    return {
        "run": run.name,
        "family": run.family,
        "world": run.world,
        "world_seed": WORLD_SEED,
        "scale": scale,
        "fingerprint": json.loads(json.dumps(run.fingerprint)),
    }


def run_is_built(ckpt: Path, run: registry.DemoRun, scale: str) -> bool:
    if not (ckpt / CONFIG_NAME).is_file() or not (ckpt / WEIGHTS_NAME).is_file():
        return False
    try:
        return json.loads((ckpt / STAMP_NAME).read_text()) == stamp(run, scale)
    except (OSError, ValueError):
        return False


def find_run(name: str, scale: str) -> registry.DemoRun:
    runs = {run.name: run for run in registry.demo_runs(scale)}
    if name not in runs:
        raise ConfigError(f"unknown run {name!r}; demo runs: {sorted(runs)}")
    return runs[name]


def train_run(run: registry.DemoRun, scale: str, data_dir: Path, progress: bool) -> float:
    """Train ``run`` into its checkpoint folder; the stamp is written only once training succeeded."""
    ckpt = checkpoint_dir(run.name)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / STAMP_NAME).unlink(missing_ok=True)
    started = time.perf_counter()
    run.train(data_dir, ckpt, scale, progress)
    (ckpt / STAMP_NAME).write_text(json.dumps(stamp(run, scale), indent=2, sort_keys=True))
    return time.perf_counter() - started


def precompute_run(run: registry.DemoRun, data_dir: Path, progress: bool) -> float:
    from analysis.precompute import precompute

    started = time.perf_counter()
    precompute(
        run.name,
        checkpoint=str(checkpoint_dir(run.name)),
        data=str(data_dir),
        progress=progress,
        **dict(run.precompute),
    )
    return time.perf_counter() - started


def build_run(
    name: str, scale: str, data_dir: Path, force: bool = False, progress: bool = True, threads: int = 0
) -> dict:
    """Train one run unless up to date, then precompute it; ``threads`` > 0 caps torch's threads.

    Takes the run's name (not the DemoRun) so that a spawned worker looks it up in its own registry."""
    keep_freed_memory()  # large tensors freed and allocated again: no page faults each time
    if threads:
        import torch

        torch.set_num_threads(threads)
    run = find_run(name, scale)
    ckpt = checkpoint_dir(run.name)
    if not force and run_is_built(ckpt, run, scale):
        log(f"run {run.name}: up to date at {ckpt}")
        info = {"checkpoint": str(ckpt), "trained": False, "seconds": 0.0}
    else:
        log(f"run {run.name}: training ({run.description or run.family})")
        seconds = train_run(run, scale, data_dir, progress)
        log(f"run {run.name}: trained in {seconds:.1f} s -> {ckpt}")
        info = {"checkpoint": str(ckpt), "trained": True, "seconds": round(seconds, 1)}
    info["precompute_seconds"] = round(precompute_run(run, data_dir, progress), 1)
    return info


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def select_runs(only: str | None, scale: str) -> list[registry.DemoRun]:
    runs = registry.demo_runs(scale)
    if only is None:
        return runs
    chosen = [r for r in runs if r.name == only]
    if not chosen:
        raise ConfigError(f"unknown run {only!r}; demo runs: {[r.name for r in runs]}")
    return chosen


def build_parallel(
    runs: list[registry.DemoRun], scale: str, data: dict[str, Path], force: bool, progress: bool, jobs: int
) -> dict[str, dict]:
    """``jobs`` runs at once, each in a spawned process with one torch thread (on a shared CPU, one thread
    per process beats processes fighting over OpenMP barriers); the costliest start first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    ordered = sorted(runs, key=lambda r: -r.cost)
    report: dict[str, dict] = {}
    # spawn: a forked child would inherit the parent's torch / OpenMP state
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(build_run, r.name, scale, data[r.world], force, False, 1): r.name for r in ordered}
        with tqdm(
            total=len(futures), desc=f"demo runs ({jobs} at a time)", unit="run", disable=not progress, file=sys.stderr
        ) as bar:
            for future in as_completed(futures):
                report[futures[future]] = future.result()
                bar.update(1)
    return {r.name: report[r.name] for r in runs}


def build(
    only: str | None = None, force: bool = False, scale: str = "default", progress: bool = True, jobs: int | None = None
) -> dict:
    """Build worlds and runs; returns {"worlds": {world: path}, "runs": {run: {"checkpoint", "trained",
    "seconds", "precompute_seconds"}}}."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    runs = select_runs(only, scale)
    worlds = {r.world for r in runs} | (set() if only else set(registry.worlds()))
    data = {w: ensure_world(w, scale) for w in sorted(worlds)}
    jobs = min(jobs or default_jobs(), max(1, len(runs)))
    if jobs <= 1:
        report = {r.name: build_run(r.name, scale, data[r.world], force, progress) for r in runs}
    else:
        report = build_parallel(runs, scale, data, force, progress, jobs)
    return {"worlds": {w: str(p) for w, p in data.items()}, "runs": report}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m demo_build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", help="build only this run (and its world)")
    p.add_argument("--force", action="store_true", help="retrain even when up to date")
    p.add_argument("--scale", choices=SCALES, default="default")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs built at once, one process and one torch thread each (default: CPU cores)",
    )
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
    # Run the importable module's main, so that spawned workers and this process share one copy of it
    # (a worker unpickles demo_build.build_run, not __main__'s).
    from demo_build import main as _main

    sys.exit(_main())

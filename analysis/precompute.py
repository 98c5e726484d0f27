"""Precompute: checkpoint + dataset -> artifacts/runs/<run>/ (what the app reads instantly).

    python -m analysis.precompute --run NAME [--checkpoint DIR] [--data DIR] [--split test]
    torchrun --nproc_per_node 2 -m analysis.precompute --run-name NAME ...   # same artifacts, split work

Everything goes through the family's model adapter and its declaration (``adapter.spec()``, stored in
the manifest as ``"spec"``); nothing here knows one family from another. Tables written (see
:mod:`analysis.store` for the publish protocol), each keyed by ``example_index`` where it has per-example rows:

    examples, predictions (:mod:`analysis.run_tables`), routing (one row per routed position per layer,
    :mod:`analysis.routing_table`), kb_routing (positions of knowledge-base items routed on the other side,
    if any), layer_metrics (indicators + verdict + reason per layer), slice_metrics (per layer and slice),
    specialisation (MI of chosen expert with each label vs shuffled), coselection
    (:mod:`analysis.indicator_tables`), dynamics (indicators per training snapshot), one table per declared
    output (``<output.name>``, by kind), attributions (stratified sample), projection (+ projection_model),
    metrics.json (headline metrics), config.json, train_log; and, unless ``--no-checks``, the explanation
    checks of :mod:`analysis.explanation_checks`: explanation_checks (ground-truth agreement, sanity checks),
    knockout_effects (every expert and whole layer disabled: metric deltas), detector_suite (injected
    pathologies judged on the run's own routing) and explanation_checks.json (their headline numbers).

The steps that need the model are in :mod:`analysis.precompute_steps`, the torchrun split in
:mod:`analysis.sharding`.

Under torchrun the examples are cut into the same batches one process would use and whole batches
are dealt to the ranks (so batch-dependent gates see identical batches); rank 0 gathers, sorts by
example index, and computes and writes everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.indicator_tables import coselection_frame, layer_metrics_frame, slice_metrics_frame, specialisation_frame
from analysis.precompute_steps import (
    attribution_label,
    batch_dependence_by_layer,
    measures_batch_dependence,
    merge_parts,
    run_examples,
    sampled_extras,
    slice_label,
    stratified_sample,
    trigger_step,
)
from analysis.routing_measure_tables import routing_measures_frame
from analysis.run_tables import KEY, examples_frame, predictions_frame
from analysis.sharding import distributed, gather_to_main
from analysis.stage_timer import StageTimer
from analysis.store import RunWriter, inputs_manifest, needs_rebuild, rebuild_reasons, write_routing
from analysis.store.layout import _RUN_RE as RUN_NAME
from analysis.store.publish import precompute_lock
from analysis.store.status import check_inputs_unchanged
from mmoe_core.adapter import load_adapter
from mmoe_core.allocator import keep_freed_memory
from mmoe_core.checkpoint import CheckpointError, load_config, load_train_log
from mmoe_core.data.readers import DatasetError
from mmoe_core.errors import cli_entry
from mmoe_core.paths import artifacts_root

DEFAULT_PARAMS = dict(
    split="test",
    batch_size=32,
    attribution_sample=48,
    projection="umap",
    dynamics_sample=256,
    batch_dependence_sample=16,
    max_examples=None,
    seed=0,
    # explanation checks (analysis.explanation_checks.check_samples: the knockout sample is
    # capped at dynamics_sample, the sanity sample at half the attribution sample)
    checks=True,
    knockout_sample=200,
    sanity_sample=8,
)


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def demo_command() -> str:
    """The command that builds the demo runs (demo_build.py, above analysis and mmoe_core)."""
    return "python -m demo_build"


def resolve_inputs(run: str, checkpoint: str | None, data: str | None, root: Path) -> tuple[Path, Path]:
    ckpt = Path(checkpoint) if checkpoint else root / "checkpoints" / run
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(
            f"no checkpoint at {ckpt} (expected config.json + model.safetensors). Train one "
            f"with `python -m mmoe_core.train ...` or build the demo runs with `{demo_command()}`."
        )
    config = load_config(ckpt)
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    recorded = config.get("data_dir") or training.get("data_dir")
    if data is None and not recorded:
        raise DatasetError(f"{ckpt}/config.json names no dataset; pass --data DIR")
    data_dir = Path(data or str(recorded))
    if not data_dir.is_absolute() and not data_dir.exists():  # recorded relative to the repo root
        data_dir = root.parent / data_dir
    if not data_dir.is_dir():
        raise DatasetError(f"dataset folder {data_dir} does not exist; pass --data DIR")
    return ckpt, data_dir


def hashed_inputs(ckpt: Path, data_dir: Path, params: dict) -> dict:
    """The manifest's inputs (checkpoint and dataset hashes), taken before anything is read: the run
    records what it read, and :func:`analysis.store.status.check_inputs_unchanged` compares at the end."""
    try:
        return inputs_manifest(ckpt, data_dir, params)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{ckpt} is incomplete ({exc}); retrain it or give another --checkpoint") from exc


def precompute(
    run: str,
    checkpoint: str | None = None,
    data: str | None = None,
    root: Path | None = None,
    force: bool = False,
    device: str | None = None,
    progress: bool = True,
    wait: bool = False,
    **overrides,
) -> Path | None:
    """Build (or skip, when unchanged) artifacts/runs/<run>/. Returns the published run dir on rank 0.

    The inputs' hashes are taken first and compared again just before publishing (a change meanwhile
    refuses the run); a second precompute of the same run refuses, or with ``wait`` waits its turn."""
    keep_freed_memory()  # large tensors freed and allocated again: no page faults each time
    root = Path(root) if root else artifacts_root()
    params = {**DEFAULT_PARAMS, **{k: v for k, v in overrides.items() if v is not None}}
    ckpt, data_dir = resolve_inputs(run, checkpoint, data, root)
    inputs = hashed_inputs(ckpt, data_dir, params)
    with distributed() as d, contextlib.ExitStack() as held:
        if not force and not needs_rebuild(run, ckpt, data_dir, params, root=root):
            if d.is_main:
                print(f"{run}: up to date (same checkpoint, dataset and parameters); nothing to do", file=sys.stderr)
            return None
        if d.is_main and progress:
            reasons = rebuild_reasons(run, ckpt, data_dir, params, root=root)
            print(f"{run}: building ({'; '.join(reasons) or 'forced'})", file=sys.stderr)
        if device is None and d.world > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        adapter = load_adapter(ckpt, device=device)
        spec = adapter.spec()
        examples = adapter.load_examples(data_dir, params["split"])
        if not examples:
            raise DatasetError(f"{data_dir}: split {params['split']!r} has no examples; pass another --split")
        if d.is_main:  # one precompute of a run at a time (taken once the inputs proved readable)
            held.enter_context(precompute_lock(run, root, wait, on_wait=lambda m: print(m, file=sys.stderr)))
            if wait and not force and d.world == 1 and not needs_rebuild(run, ckpt, data_dir, params, root=root):
                print(f"{run}: the other precompute built it; nothing to do", file=sys.stderr)
                return None
        if params["max_examples"]:
            examples = stratified_sample(examples, int(params["max_examples"]), slice_label(spec), params["seed"])
        timer = StageTimer(log=(lambda m: print(f"{run}: {m}", file=sys.stderr)) if progress and d.is_main else None)
        with timer("forward and routing"):
            part = run_examples(adapter, spec, examples, int(params["batch_size"]), d, progress)
        part.update(sampled_extras(adapter, spec, ckpt, examples, params, d, progress, timer))
        parts = gather_to_main(part, d)
        if not d.is_main:
            return None
        return write_run(run, root, adapter, ckpt, data_dir, examples, merge_parts(parts), params, inputs, timer)


def projection_table(merged: dict, examples_df: pd.DataFrame, label: str | None, params: dict):
    """(projection table, fitted projection) of the routed representations; (None, None) with too few."""
    from analysis.embedding import fit_projection

    reps = merged["representations"]
    if reps is None or len(reps) < 5:
        return None, None
    index = merged["example_indices"]
    strata = None
    if label and label in examples_df:
        strata = examples_df.set_index(KEY)[label].reindex(index).astype(str).to_numpy()
    projection = fit_projection(reps, method=params["projection"], seed=int(params["seed"]), strata=strata)
    xy = projection.coords
    frame = pd.DataFrame(
        {KEY: index, "x": xy[:, 0], "y": xy[:, 1], "in_fit": np.isin(np.arange(len(xy)), projection.fit_index)}
    )
    return frame, projection


def write_run(run, root, adapter, ckpt, data_dir, examples, merged, params, inputs=None, timer=None) -> Path:
    """Rank 0: everything computed from the merged parts, written and published as one run version.
    ``inputs``: the input hashes taken before the run (:func:`hashed_inputs`; taken now when None);
    ``timer``: the :class:`StageTimer` of the stages so far (their seconds are stored as timings.json)."""
    timer = timer if timer is not None else StageTimer()
    spec = adapter.spec()
    labels = spec.slice_labels()
    seed = int(params["seed"])
    examples_df = examples_frame(examples)
    routing = merged["routing"]
    batch_dep = {}
    if measures_batch_dependence(spec):
        sample = stratified_sample(examples, int(params["batch_dependence_sample"]), slice_label(spec), seed)
        with timer("batch dependence"):
            batch_dep = batch_dependence_by_layer(adapter, sample, int(params["batch_size"]))
    with timer("projection"):
        projection_df, projection = projection_table(merged, examples_df, slice_label(spec), params)
    summary = adapter.summarize(merged["predictions"], examples)
    checks = None
    if params.get("checks", True):
        from analysis.explanation_checks import explanation_checks_step

        checks = explanation_checks_step(
            adapter,
            spec,
            examples,
            routing=routing,
            examples_df=examples_df,
            attributions=merged["attributions"],
            extras=merged["extras"],
            params=params,
            timer=timer,
        )
    inputs = inputs if inputs is not None else hashed_inputs(ckpt, data_dir, params)
    manifest = {
        **inputs,
        **inputs_manifest(
            None,
            None,
            params,
            spec=spec,
            family=spec.family,
            split=params["split"],
            trigger_step=trigger_step(ckpt),
            num_examples=len(examples),
            attribution_label=attribution_label(spec),
        ),
    }
    with (
        timer("tables and publish"),
        RunWriter(
            run,
            root=root,
            manifest_base=manifest,
            before_publish=lambda: check_inputs_unchanged(inputs, ckpt, data_dir),
        ) as w,
    ):
        w.write_table("examples", examples_df)
        w.write_table("predictions", predictions_frame(merged["predictions"]))
        write_routing(w, routing)  # wide, or split above 16 experts per layer (analysis.store.sink)
        if len(merged["kb_routing"]):
            w.write_table("kb_routing", merged["kb_routing"])
        w.write_table("layer_metrics", layer_metrics_frame(routing, batch_dep))
        w.write_table("slice_metrics", slice_metrics_frame(routing, examples_df, labels))
        w.write_table("specialisation", specialisation_frame(routing, examples_df, labels, seed))
        w.write_table("coselection", coselection_frame(routing))
        w.write_table("routing_measures", routing_measures_frame(routing, [x.name for x in spec.routed_layers]))
        if len(merged["dynamics"]):
            w.write_table("dynamics", merged["dynamics"])
        for name, frame in merged["extras"].items():
            w.write_table(name, frame)
        if len(merged["attributions"]):
            w.write_table("attributions", merged["attributions"])
        if projection_df is not None:
            w.write_table("projection", projection_df)
            projection.save(w.file_path("projection_model.npz"))
        train_log = load_train_log(ckpt)
        if train_log is not None:
            w.write_table("train_log", train_log)
        w.write_json("metrics", summary)
        w.write_json("config", load_config(ckpt))
        if checks is not None:
            for name, frame in checks["tables"].items():
                if len(frame):
                    w.write_table(name, frame)
            w.write_json("explanation_checks", checks["json"])
        # the stages up to here (publishing itself is in the log line only)
        w.write_json("timings", {"stage_seconds": timer.rounded()})
    print(
        f"{run}: published {root / 'runs' / run} ({len(routing)} routed positions, {len(examples)} examples)",
        file=sys.stderr,
    )
    return root / "runs" / run


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _check_cli(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse a bad run name or device at once, not after the whole run has been computed."""
    if not RUN_NAME.match(a.run):
        p.error(f"--run {a.run!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit")
    if a.device is not None:
        try:
            device = torch.device(a.device)
        except (RuntimeError, ValueError):
            p.error(f"--device {a.device!r} is not a device name; use cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {a.device}: this machine has no CUDA device; use --device cpu")


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.precompute", description=__doc__.split("\n\n")[0])
    # --run-name is the spelling to use under torchrun, whose own parser takes --run for --run-path.
    p.add_argument(
        "--run",
        "--run-name",
        dest="run",
        required=True,
        help="run name: artifacts/runs/<run>/ (and default checkpoint)",
    )
    p.add_argument("--checkpoint", help="checkpoint dir (default artifacts/checkpoints/<run>)")
    p.add_argument("--data", help="dataset dir (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=_count(1))
    p.add_argument("--attribution-sample", type=_count(0), help="examples in the attribution sample (stratified)")
    p.add_argument("--projection", choices=["umap", "pca"])
    p.add_argument("--dynamics-sample", type=_count(0))
    p.add_argument("--max-examples", type=_count(1), help="cap the split (stratified sample) for quick runs")
    p.add_argument("--device", help="cpu / cuda (default: CUDA when present)")
    p.add_argument(
        "--no-checks",
        dest="checks",
        action="store_false",
        help="skip the explanation checks (agreement, sanity checks, expert knockout, detector suite)",
    )
    p.add_argument("--knockout-sample", type=_count(0), help="examples re-run per knocked-out expert (default 200)")
    p.add_argument("--sanity-sample", type=_count(0), help="examples of the sanity checks (default 8)")
    p.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    p.add_argument("--root", help="artifacts root (default artifacts/ or $MOESCOPE_ARTIFACTS)")
    p.add_argument(
        "--wait",
        action="store_true",
        help="when another precompute of the run is running, wait for it (default: refuse)",
    )
    a = p.parse_args(argv)
    _check_cli(p, a)
    precompute(
        a.run,
        a.checkpoint,
        a.data,
        Path(a.root) if a.root else None,
        a.force,
        a.device,
        wait=a.wait,
        split=a.split,
        batch_size=a.batch_size,
        attribution_sample=a.attribution_sample,
        projection=a.projection,
        dynamics_sample=a.dynamics_sample,
        max_examples=a.max_examples,
        checks=a.checks,
        knockout_sample=a.knockout_sample,
        sanity_sample=a.sanity_sample,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

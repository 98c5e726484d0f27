"""The steps of a precompute that need the model: forward the examples, measure batch dependence, replay
the training snapshots, attribute a sample; and merging the ranks' parts under torchrun.

Everything goes through the family's adapter and its declaration (:class:`mmoe_core.spec.ModelSpec`):
which label stratifies a sample, whether a gate's batch dependence is measured, which extra outputs are
stored, all come from the spec, never from a family's name or field names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from analysis.indicator_tables import batch_dependence_of, summarise
from analysis.routing import verdict
from analysis.routing_measure_tables import saturation_by_layer
from analysis.routing_table import routing_frame
from analysis.run_tables import KEY, output_frames
from analysis.sampling import stratified_indices
from analysis.sharding import Dist, contiguous_share, shard_batches
from analysis.stage_timer import StageTimer
from mmoe_core.adapter import ModelAdapter
from mmoe_core.checkpoint import list_snapshots, load_config, load_state, load_train_log
from mmoe_core.spec import ModelSpec

# --------------------------------------------------------------------------------------------
# What the spec decides
# --------------------------------------------------------------------------------------------


def slice_label(spec: ModelSpec) -> str | None:
    """The first declared label: stratifies the example cap, the dynamics and batch-dependence samples
    and the projection's fit sample."""
    labels = spec.slice_labels()
    return labels[0] if labels else None


def attribution_label(spec: ModelSpec) -> str | None:
    """The label that stratifies the attribution sample: the ground-truth label naming which input
    decides each example (so every value is explained and the explanation checks can be scored), else
    the first declared label."""
    deciding = spec.deciding_label()
    return deciding.name if deciding is not None else slice_label(spec)


def measures_batch_dependence(spec: ModelSpec) -> bool:
    """True when some routed layer declares a gate whose weights depend on the rest of the batch."""
    return any(layer.gate.batch_dependent for layer in spec.routed_layers)


def stratified_sample(examples: Sequence[dict], size: int, label: str | None, seed: int = 0) -> list[dict]:
    """Up to ``size`` examples spread over the values of ``label`` (seeded; never the head)."""
    strata = [str(ex.get("labels", {}).get(label)) for ex in examples] if label else None
    return [examples[i] for i in stratified_indices(len(examples), size, strata, seed)]


# --------------------------------------------------------------------------------------------
# Forward the examples (this rank's batches) and merge the ranks' parts
# --------------------------------------------------------------------------------------------


def run_examples(
    adapter: ModelAdapter, spec: ModelSpec, examples: list[dict], batch_size: int, d: Dist, progress: bool
) -> dict:
    """Forward this rank's share; return the pieces rank 0 merges."""
    mine = [examples[i] for i in shard_batches(len(examples), batch_size, d.rank, d.world)]
    out = adapter.run(mine, record=True, batch_size=batch_size, progress=progress and d.is_main)
    ids = {int(ex["index"]): str(ex.get("id", ex["index"])) for ex in mine}
    calls = out.recorder.calls if out.recorder is not None else []
    return {
        "routing": routing_frame(calls, "example", ids),
        "kb_routing": routing_frame(calls, "kb") if d.is_main else pd.DataFrame(),
        "predictions": out.predictions,
        "extras": output_frames(spec, out.extras, out.predictions),
        "indices": [int(ex["index"]) for ex in mine],
        "representations": None
        if out.representations is None or not mine
        else out.representations.detach().cpu().numpy(),
    }


def _sorted_by_example(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in (KEY, "layer", "call", "position", "name") if c in frame]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True) if keys else frame


def concat_nonempty(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def merge_parts(parts: list[dict]) -> dict:
    """One process's view of the ranks' parts: tables sorted by example, representations in example order
    (``example_indices`` names their rows)."""
    indices = np.concatenate([p["indices"] for p in parts]).astype(np.int64)
    order = np.argsort(indices, kind="stable")
    names = sorted({name for p in parts for name in p["extras"]})
    reps = [p["representations"] for p in parts if p["representations"] is not None]
    return {
        "routing": _sorted_by_example(concat_nonempty([p["routing"] for p in parts])),
        "kb_routing": parts[0]["kb_routing"],
        "predictions": sorted((p for part in parts for p in part["predictions"]), key=lambda p: p["index"]),
        "extras": {
            name: _sorted_by_example(concat_nonempty([p["extras"].get(name, pd.DataFrame()) for p in parts]))
            for name in names
        },
        "example_indices": indices[order],
        "representations": np.concatenate(reps)[order] if reps else None,
        **{
            name: concat_nonempty([p.get(name, pd.DataFrame()) for p in parts]) for name in ("dynamics", "attributions")
        },
    }


# --------------------------------------------------------------------------------------------
# Sampled, model-heavy steps
# --------------------------------------------------------------------------------------------


def batch_dependence_by_layer(adapter: ModelAdapter, examples: Sequence[dict], batch_size: int) -> dict[str, float]:
    """Mean |change| of combine weights when each example runs alone vs in its batch (per layer)."""
    if not examples:
        return {}
    in_batch = routing_frame(adapter.route(list(examples), batch_size=batch_size))
    alone = pd.concat([routing_frame(adapter.route([ex], batch_size=1)) for ex in examples], ignore_index=True)
    return batch_dependence_of(in_batch, alone)


def dynamics_frame(
    adapter: ModelAdapter,
    ckpt: Path,
    examples: Sequence[dict],
    batch_size: int,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> pd.DataFrame:
    """Routing indicators of a fixed example sample at every training snapshot (and the final model).

    Besides the indicators, each row carries the router saturation of the snapshot against the final
    model on the same positions (:func:`analysis.routing_measure_tables.saturation_by_layer`, OLMoE):
    ``router_saturation``, ``router_saturation_top1`` and ``saturation_positions``.

    ``shard`` = (rank, world): this rank's contiguous block of the snapshots only."""
    steps = contiguous_share(list_snapshots(ckpt), *shard)
    if not steps or not examples:
        return pd.DataFrame()
    final_state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    final_routing = routing_frame(adapter.route(list(examples), batch_size=batch_size))
    rows = []
    try:
        for step in tqdm(steps, desc="dynamics", disable=not progress, file=sys.stderr):
            adapter.model.load_state_dict(load_state(ckpt, snapshot=step))
            routing = routing_frame(adapter.route(list(examples), batch_size=batch_size))
            saturation = saturation_by_layer(routing, final_routing)
            for layer in sorted(routing["layer"].unique()):
                summary = summarise(routing[routing["layer"] == layer])
                label, reason = verdict(summary)
                rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "verdict": label,
                        "reason": reason,
                        **{k: v for k, v in summary.items() if not isinstance(v, list)},
                        "dead_experts": len(summary["dead_experts"]),
                        "load": summary["load"],
                        **saturation[layer],
                    }
                )
    finally:
        adapter.model.load_state_dict(final_state)
    return pd.DataFrame(rows)


def sampled_extras(
    adapter: ModelAdapter,
    spec: ModelSpec,
    ckpt: Path,
    examples: list[dict],
    params: dict,
    d: Dist,
    progress: bool,
    timer: StageTimer | None = None,
) -> dict:
    """This rank's share of the sampled, model-heavy tables: training dynamics (a block of the snapshots)
    and attributions (a block of the attribution sample). Blocks are contiguous, so rank 0 rebuilds
    the one-process tables by concatenating them in rank order."""
    from analysis.attribution import attribution_table

    timer = timer if timer is not None else StageTimer()
    seed, batch_size = int(params["seed"]), int(params["batch_size"])
    show = progress and d.is_main
    dyn_sample = stratified_sample(examples, int(params["dynamics_sample"]), slice_label(spec), seed)
    with timer("training dynamics"):
        dynamics = dynamics_frame(adapter, ckpt, dyn_sample, batch_size, show, shard=(d.rank, d.world))
    attributions = pd.DataFrame()
    if int(params["attribution_sample"]) > 0:
        with timer("attributions"):
            attributions = attribution_table(
                adapter,
                examples,
                sample_size=int(params["attribution_sample"]),
                stratify_by=attribution_label(spec),
                seed=seed,
                progress=show,
                shard=(d.rank, d.world),
            )
    return {"dynamics": dynamics, "attributions": attributions}


def trigger_step(ckpt: Path) -> int | None:
    """The step the entropy two-stage schedule (a MoEscope training option) switched phase, if training
    recorded one."""
    training = load_config(ckpt).get("training", {})
    if training.get("two_stage_trigger_step") is not None:
        return int(training["two_stage_trigger_step"])
    log = load_train_log(ckpt)
    if log is not None and "two_stage_phase" in log:
        switched = log.loc[log["two_stage_phase"] == "specialisation", "step"]
        return int(switched.min()) if len(switched) else None
    return None

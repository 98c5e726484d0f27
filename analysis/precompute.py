"""Precompute: checkpoint + dataset -> artifacts/runs/<run>/ (what the app reads instantly).

    python -m analysis.precompute --run NAME [--checkpoint DIR] [--data DIR] [--split test]
    torchrun --nproc_per_node 2 -m analysis.precompute --run-name NAME ...   # same artifacts, split work

Everything goes through the family's model adapter; nothing here knows MMoE from MoEMoE. Tables
written (see analysis/store.py for the publish protocol):

    examples, predictions, routing (one row per routed position per layer), kb_routing (positions of
    knowledge-base items routed on the other side, if any), layer_metrics (indicators + verdict +
    reason per layer), slice_metrics (indicators per layer and slice), specialisation (MI of chosen
    expert with each label vs shuffled), coselection, dynamics (indicators per training snapshot),
    <declared outputs> (e.g. qga), attributions (stratified sample), projection (+ projection_model),
    metrics.json (headline metrics).

Under torchrun the examples are cut into the same batches one process would use and whole batches
are dealt to the ranks (so batch-dependent gates see identical batches); rank 0 gathers, sorts by
example index, and computes and writes everything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import routing as R
from analysis.routing_table import layer_arrays, routing_frame
from analysis.routing_table import stack as _stack
from analysis.sampling import stratified_indices
from analysis.store import RunWriter, inputs_manifest, needs_rebuild, rebuild_reasons
from mmoe_core.adapter import ModelAdapter, load_adapter
from mmoe_core.checkpoint import list_snapshots, load_config, load_state, load_train_log
from mmoe_core.paths import artifacts_root

DEFAULT_PARAMS = dict(split="test", batch_size=32, attribution_sample=48, projection="umap",
                      dynamics_sample=256, batch_dependence_sample=16, max_examples=None, seed=0)


# --------------------------------------------------------------------------------------------
# Pure table builders
# --------------------------------------------------------------------------------------------

def _summary(rows: pd.DataFrame) -> dict:
    """layer_summary of routing rows, from the gate's recorded probabilities."""
    a = layer_arrays(rows)
    return R.layer_summary(a["probs"], a["topk_ids"], a["combine"], a["logits"])


def layer_metrics_frame(routing: pd.DataFrame, batch_dependence: dict[str, float] | None = None) -> pd.DataFrame:
    """Indicators, verdict and reason per layer (over the examples' routed positions)."""
    rows = []
    for layer in sorted(routing["layer"].unique()):
        summary = _summary(routing[routing["layer"] == layer])
        label, reason = R.verdict(summary)
        row = {"layer": layer, "verdict": label, "reason": reason, **summary,
               "dead_experts": len(summary["dead_experts"]), "dead_expert_ids": summary["dead_experts"]}
        if batch_dependence and layer in batch_dependence:
            row["batch_dependence"] = batch_dependence[layer]
        rows.append(row)
    return pd.DataFrame(rows)


def attach_labels(routing: pd.DataFrame, examples: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    cols = ["index", *[c for c in labels if c in examples.columns]]
    return routing.merge(examples[cols].rename(columns={"index": "example_index"}), on="example_index", how="left")


def slice_metrics_frame(routing: pd.DataFrame, examples: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Indicators per layer and per slice (position kind, modalities and every example label)."""
    joined = attach_labels(routing, examples, labels)
    slice_columns = ["position_kind", "routed_modality", "gate_modality", *[c for c in labels if c in joined]]
    rows = []
    for layer, part in joined.groupby("layer", sort=True):
        a = layer_arrays(part)
        for column in slice_columns:
            values = part[column].astype(str).to_numpy()
            for value, summary in R.summaries_by_slice(a["probs"], a["topk_ids"], a["combine"], values,
                                                       a["logits"]).items():
                label, reason = R.verdict(summary)
                rows.append({"layer": layer, "slice": column, "value": value, "verdict": label, "reason": reason,
                             **{k: v for k, v in summary.items() if not isinstance(v, list)},
                             "load": summary["load"], "weight_share": summary["weight_share"]})
    return pd.DataFrame(rows)


def specialisation_frame(routing: pd.DataFrame, examples: pd.DataFrame, labels: Sequence[str],
                         seed: int = 0) -> pd.DataFrame:
    """Mutual information between the chosen (top-1) expert and each label, against shuffled labels."""
    joined = attach_labels(routing, examples, labels)
    rows = []
    for layer, part in joined.groupby("layer", sort=True):
        chosen = part["top1"].to_numpy()
        for column in ["position_kind", "routed_modality", *[c for c in labels if c in part]]:
            values = part[column].astype(str).to_numpy()
            if len(set(values)) < 2:
                continue
            stats = R.specialisation_vs_shuffled(chosen, values, n_shuffles=20, seed=seed)
            nmi = R.specialisation(chosen, values)["nmi"]
            rows.append({"layer": layer, "label": column, "nmi": nmi, **stats,
                         "above_shuffled": stats["mi"] > stats["shuffled_max"]})
    return pd.DataFrame(rows)


def coselection_frame(routing: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for layer, part in routing.groupby("layer", sort=True):
        topk = _stack(part["topk_ids"]).astype(np.int64)
        e = len(part["logits"].iloc[0])
        counts = R.co_selection(topk, e)
        rows += [{"layer": layer, "expert_a": a, "expert_b": b, "count": int(counts[a, b])}
                 for a in range(e) for b in range(e)]
    return pd.DataFrame(rows)


def examples_frame(examples: Sequence[dict]) -> pd.DataFrame:
    """Scalar display fields and labels of each example (labels become columns of their own)."""
    rows = []
    for ex in examples:
        row = {k: v for k, v in ex.items() if k != "labels" and _is_scalar(v)}
        row.update({k: (None if v is None else str(v)) for k, v in ex.get("labels", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def predictions_frame(predictions: Sequence[dict]) -> pd.DataFrame:
    rows = []
    for p in predictions:
        rows.append({k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in p.items()})
    return pd.DataFrame(rows)


def declared_output_frame(name: str, payload) -> pd.DataFrame:
    """A declared extra output (e.g. "qga") as a long table: the adapter gives rows or a DataFrame."""
    if isinstance(payload, pd.DataFrame):
        return payload
    return pd.DataFrame(list(payload))


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.integer, np.floating))


# --------------------------------------------------------------------------------------------
# Distributed helpers (torchrun): deal whole batches to ranks, gather on rank 0.
# --------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed() -> Iterator[Dist]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist()
        return
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        yield Dist(dist.get_rank(), dist.get_world_size())
    finally:
        dist.barrier()
        dist.destroy_process_group()


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices of the examples rank ``rank`` runs: whole batches dealt round-robin (partial last)."""
    starts = range(0, n, batch_size)
    return [i for b, s in enumerate(starts) if b % world == rank for i in range(s, min(s + batch_size, n))]


def gather_to_main(obj, d: Dist) -> list | None:
    if d.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * d.world if d.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


# --------------------------------------------------------------------------------------------
# Steps that need the model
# --------------------------------------------------------------------------------------------

def run_examples(adapter: ModelAdapter, examples: list[dict], batch_size: int, d: Dist, progress: bool) -> dict:
    """Forward this rank's share; return the pieces rank 0 merges."""
    mine = [examples[i] for i in shard_batches(len(examples), batch_size, d.rank, d.world)]
    out = adapter.run(mine, record=True, batch_size=batch_size, progress=progress and d.is_main)
    ids = {int(ex["index"]): str(ex.get("id", ex["index"])) for ex in mine}
    return {
        "routing": routing_frame(out.recorder.calls, "example", ids),
        "kb_routing": routing_frame(out.recorder.calls, "kb") if d.is_main else pd.DataFrame(),
        "predictions": out.predictions,
        "extras": {k: declared_output_frame(k, v) for k, v in out.extras.items()},
        "indices": [int(ex["index"]) for ex in mine],
        "representations": None if out.representations is None or not mine
        else out.representations.detach().cpu().numpy(),
    }


def merge_parts(parts: list[dict]) -> dict:
    order = np.argsort(np.concatenate([p["indices"] for p in parts]), kind="stable")
    merged = {
        "routing": pd.concat([p["routing"] for p in parts], ignore_index=True).sort_values(
            ["example_index", "layer", "call", "position"], kind="stable").reset_index(drop=True),
        "kb_routing": parts[0]["kb_routing"],
        "predictions": sorted((p for part in parts for p in part["predictions"]), key=lambda p: p["index"]),
        "extras": {},
        "representations": None,
        **{name: _concat_nonempty([p.get(name, pd.DataFrame()) for p in parts])
           for name in ("dynamics", "attributions")},
    }
    for name in parts[0]["extras"]:
        frame = pd.concat([p["extras"][name] for p in parts], ignore_index=True)
        sort_cols = [c for c in ("example_index", "position") if c in frame]
        merged["extras"][name] = frame.sort_values(sort_cols, kind="stable").reset_index(drop=True) if sort_cols else frame
    reps = [p["representations"] for p in parts if p["representations"] is not None]
    if reps:
        merged["representations"] = np.concatenate(reps)[order]
    return merged


def _concat_nonempty(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def stratified_sample(examples: Sequence[dict], size: int, label: str | None, seed: int = 0) -> list[dict]:
    """Up to ``size`` examples spread over the values of ``label`` (seeded; never the head)."""
    strata = [str(ex.get("labels", {}).get(label)) for ex in examples] if label else None
    return [examples[i] for i in stratified_indices(len(examples), size, strata, seed)]


def batch_dependence_by_layer(adapter: ModelAdapter, examples: Sequence[dict], batch_size: int) -> dict[str, float]:
    """Mean |change| of combine weights when each example runs alone vs in its batch (per layer)."""
    if not examples:
        return {}
    in_batch = routing_frame(adapter.run(list(examples), record=True, batch_size=batch_size).recorder)
    alone = pd.concat([routing_frame(adapter.run([ex], record=True, batch_size=1).recorder) for ex in examples],
                      ignore_index=True)
    keys = ["layer", "call", "example_index", "position"]
    joined = in_batch.merge(alone, on=keys, suffixes=("_batch", "_alone"))
    out = {}
    for layer, part in joined.groupby("layer"):
        stats = R.batch_dependence(_stack(part["combine_alone"]), _stack(part["combine_batch"]))
        out[layer] = float(stats["mean_abs_change"])
    return out


def contiguous_share(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous block of ``items``: concatenating the blocks in rank order gives ``items``."""
    n = len(items)
    return list(items[rank * n // world:(rank + 1) * n // world])


def dynamics_frame(adapter: ModelAdapter, ckpt: Path, examples: Sequence[dict], batch_size: int,
                   progress: bool = True, shard: tuple[int, int] = (0, 1)) -> pd.DataFrame:
    """Routing indicators of a fixed example sample at every training snapshot (and the final model).

    ``shard`` = (rank, world): this rank's contiguous block of the snapshots only."""
    steps = contiguous_share(list_snapshots(ckpt), *shard)
    if not steps or not examples:
        return pd.DataFrame()
    final_state = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    rows = []
    try:
        for step in tqdm(steps, desc="dynamics", disable=not progress, file=sys.stderr):
            adapter.model.load_state_dict(load_state(ckpt, snapshot=step))
            routing = routing_frame(adapter.run(list(examples), record=True, batch_size=batch_size).recorder)
            for layer in sorted(routing["layer"].unique()):
                summary = _summary(routing[routing["layer"] == layer])
                label, reason = R.verdict(summary)
                rows.append({"step": step, "layer": layer, "verdict": label, "reason": reason,
                             **{k: v for k, v in summary.items() if not isinstance(v, list)},
                             "dead_experts": len(summary["dead_experts"]), "load": summary["load"]})
    finally:
        adapter.model.load_state_dict(final_state)
    return pd.DataFrame(rows)


def trigger_step(ckpt: Path) -> int | None:
    """The step the entropy two-stage schedule switched phase, if training recorded one."""
    training = load_config(ckpt).get("training", {})
    if training.get("two_stage_trigger_step") is not None:
        return int(training["two_stage_trigger_step"])
    log = load_train_log(ckpt)
    if log is not None and "two_stage_phase" in log:
        switched = log.loc[log["two_stage_phase"] == "specialisation", "step"]
        return int(switched.min()) if len(switched) else None
    return None


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------

def resolve_inputs(run: str, checkpoint: str | None, data: str | None, root: Path) -> tuple[Path, Path]:
    ckpt = Path(checkpoint) if checkpoint else root / "checkpoints" / run
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"error: no checkpoint at {ckpt} (expected config.json + model.safetensors). Train one "
                         f"with `python -m mmoe_core.train ...` or build the demo runs with `python -m mmoe_core.demo`.")
    config = load_config(ckpt)
    recorded = config.get("data_dir") or config.get("training", {}).get("data_dir")
    if data is None and not recorded:
        raise SystemExit(f"error: {ckpt}/config.json names no dataset; pass --data DIR")
    data_dir = Path(data or recorded)
    if not data_dir.is_absolute() and not data_dir.exists():  # recorded relative to the repo root
        data_dir = root.parent / data_dir
    if not data_dir.is_dir():
        raise SystemExit(f"error: dataset folder {data_dir} does not exist; pass --data DIR")
    return ckpt, data_dir


def precompute(run: str, checkpoint: str | None = None, data: str | None = None, root: Path | None = None,
               force: bool = False, device: str | None = None, progress: bool = True, **overrides) -> Path | None:
    """Build (or skip, when unchanged) artifacts/runs/<run>/. Returns the published run dir on rank 0."""
    root = Path(root) if root else artifacts_root()
    params = {**DEFAULT_PARAMS, **{k: v for k, v in overrides.items() if v is not None}}
    ckpt, data_dir = resolve_inputs(run, checkpoint, data, root)
    with distributed() as d:
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
        examples = adapter.load_examples(data_dir, params["split"])
        if params["max_examples"]:
            examples = stratified_sample(examples, int(params["max_examples"]), _first(adapter.slice_labels()),
                                         params["seed"])
        part = run_examples(adapter, examples, int(params["batch_size"]), d, progress)
        part.update(sampled_extras(adapter, ckpt, examples, params, d, progress))
        parts = gather_to_main(part, d)
        if not d.is_main:
            return None
        return _write_run(run, root, adapter, ckpt, data_dir, examples, merge_parts(parts), params, progress)


def sampled_extras(adapter: ModelAdapter, ckpt: Path, examples: list[dict], params: dict, d: Dist,
                   progress: bool) -> dict:
    """This rank's share of the sampled, model-heavy tables: training dynamics (a block of the snapshots)
    and attributions (a block of the attribution sample). Blocks are contiguous, so rank 0 rebuilds
    the one-process tables by concatenating them in rank order."""
    from analysis.attribution import attribution_table
    label, seed, batch_size = _first(adapter.slice_labels()), int(params["seed"]), int(params["batch_size"])
    show = progress and d.is_main
    dyn_sample = stratified_sample(examples, int(params["dynamics_sample"]), label, seed)
    dynamics = dynamics_frame(adapter, ckpt, dyn_sample, batch_size, show, shard=(d.rank, d.world))
    attributions = pd.DataFrame()
    if int(params["attribution_sample"]) > 0:
        attributions = attribution_table(adapter, examples, sample_size=int(params["attribution_sample"]),
                                         stratify_by=label, seed=seed, progress=show, shard=(d.rank, d.world))
    return {"dynamics": dynamics, "attributions": attributions}


def _first(items: Sequence[str]) -> str | None:
    return items[0] if items else None


def _write_run(run, root, adapter, ckpt, data_dir, examples, merged, params, progress) -> Path:
    from analysis.embedding import fit_projection

    labels = adapter.slice_labels()
    seed = int(params["seed"])
    examples_df = examples_frame(examples)
    routing = merged["routing"]
    bd_sample = stratified_sample(examples, int(params["batch_dependence_sample"]), _first(labels), seed)
    needs_bd = any(spec.gate_kind == "mmoe_reference" for spec in adapter.routed_layers())
    batch_dep = batch_dependence_by_layer(adapter, bd_sample, int(params["batch_size"])) if needs_bd else {}
    dynamics, attributions = merged["dynamics"], merged["attributions"]
    reps = merged["representations"]
    projection_df, projection = None, None
    if reps is not None and len(reps) >= 5:
        strata = examples_df[labels[0]].astype(str).to_numpy() if labels and labels[0] in examples_df else None
        projection = fit_projection(reps, method=params["projection"], seed=seed, strata=strata)
        xy = projection.coords
        projection_df = pd.DataFrame({"example_index": examples_df["index"].to_numpy(), "x": xy[:, 0], "y": xy[:, 1],
                                      "in_fit": np.isin(np.arange(len(xy)), projection.fit_index)})
    summary = adapter.summarize(merged["predictions"], examples)
    manifest = inputs_manifest(ckpt, data_dir, params, family=adapter.family, split=params["split"],
                               layers=[spec.__dict__ for spec in adapter.routed_layers()],
                               prediction=adapter.prediction_spec().__dict__,
                               outputs=adapter.output_spec(), slice_labels=labels,
                               trigger_step=trigger_step(ckpt), num_examples=len(examples))
    with RunWriter(run, root=root, manifest_base=manifest) as w:
        w.write_table("examples", examples_df)
        w.write_table("predictions", predictions_frame(merged["predictions"]))
        w.write_table("routing", routing)
        if len(merged["kb_routing"]):
            w.write_table("kb_routing", merged["kb_routing"])
        w.write_table("layer_metrics", layer_metrics_frame(routing, batch_dep))
        w.write_table("slice_metrics", slice_metrics_frame(routing, examples_df, labels))
        w.write_table("specialisation", specialisation_frame(routing, examples_df, labels, seed))
        w.write_table("coselection", coselection_frame(routing))
        if len(dynamics):
            w.write_table("dynamics", dynamics)
        for name, frame in merged["extras"].items():
            w.write_table(name, frame)
        if len(attributions):
            w.write_table("attributions", attributions)
        if projection_df is not None:
            w.write_table("projection", projection_df)
            projection.save(w.file_path("projection_model.npz"))
        train_log = load_train_log(ckpt)
        if train_log is not None:
            w.write_table("train_log", train_log)
        w.write_json("metrics", summary)
        w.write_json("config", load_config(ckpt))
    print(f"{run}: published {root / 'runs' / run} ({len(routing)} routed positions, {len(examples)} examples)",
          file=sys.stderr)
    return root / "runs" / run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.precompute", description=__doc__.split("\n\n")[0])
    # --run-name is the spelling to use under torchrun, whose own parser takes --run for --run-path.
    p.add_argument("--run", "--run-name", dest="run", required=True,
                   help="run name: artifacts/runs/<run>/ (and default checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint dir (default artifacts/checkpoints/<run>)")
    p.add_argument("--data", help="dataset dir (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--attribution-sample", type=int, help="examples in the attribution sample (stratified)")
    p.add_argument("--projection", choices=["umap", "pca"])
    p.add_argument("--dynamics-sample", type=int)
    p.add_argument("--max-examples", type=int, help="cap the split (stratified sample) for quick runs")
    p.add_argument("--device", help="cpu / cuda (default: CUDA when present)")
    p.add_argument("--force", action="store_true", help="rebuild even when inputs are unchanged")
    p.add_argument("--root", help="artifacts root (default artifacts/ or $MOESCOPE_ARTIFACTS)")
    a = p.parse_args(argv)
    precompute(a.run, a.checkpoint, a.data, Path(a.root) if a.root else None, a.force, a.device,
               split=a.split, batch_size=a.batch_size, attribution_sample=a.attribution_sample,
               projection=a.projection, dynamics_sample=a.dynamics_sample, max_examples=a.max_examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The routing table (:mod:`analysis.routing_table`) -> the stored indicator tables of a run.

* ``layer_metrics``: one row per layer: verdict, reason and every indicator of
  :func:`analysis.routing.layer_summary` (plus ``batch_dependence`` where it was measured);
* ``slice_metrics``: the same per layer and slice (position kind, modalities, every example label);
* ``specialisation``: mutual information of the top-1 expert with each label, against shuffled labels;
* ``coselection``: E x E counts of experts chosen together for one position, per layer.

Indicators read the gate's recorded probabilities (``probs``), never logits re-softmaxed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import routing as R
from analysis.routing_table import layer_arrays, stack

KEY = "example_index"
POSITION_SLICES = ("position_kind", "routed_modality", "gate_modality")


def summarise(rows: pd.DataFrame) -> dict:
    """:func:`analysis.routing.layer_summary` of some routing rows (one layer's, or one slice's)."""
    a = layer_arrays(rows)
    return R.layer_summary(a["probs"], a["topk_ids"], a["combine"], a["logits"])


def layer_row(summary: dict) -> dict:
    """Verdict, reason and indicators of one summary, as one table row (dead experts counted)."""
    label, reason = R.verdict(summary)
    return {
        "verdict": label,
        "reason": reason,
        **summary,
        "dead_experts": len(summary["dead_experts"]),
        "dead_expert_ids": summary["dead_experts"],
    }


def layer_metrics_frame(routing: pd.DataFrame, batch_dependence: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Indicators, verdict and reason per layer (over the examples' routed positions)."""
    rows = []
    for layer in sorted(routing["layer"].unique()):
        row = {"layer": layer, **layer_row(summarise(routing[routing["layer"] == layer]))}
        if batch_dependence and layer in batch_dependence:
            row["batch_dependence"] = batch_dependence[layer]
        rows.append(row)
    return pd.DataFrame(rows)


def attach_labels(routing: pd.DataFrame, examples: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """The routing rows with each example's label columns joined on ``example_index``."""
    cols = [KEY, *[c for c in labels if c in examples.columns]]
    return routing.merge(examples[cols], on=KEY, how="left")


def slice_metrics_frame(routing: pd.DataFrame, examples: pd.DataFrame, labels: Sequence[str]) -> pd.DataFrame:
    """Indicators per layer and per slice (position kind, modalities and every example label)."""
    joined = attach_labels(routing, examples, labels)
    slice_columns = [*POSITION_SLICES, *[c for c in labels if c in joined]]
    rows = []
    for layer, part in joined.groupby("layer", sort=True):
        a = layer_arrays(part)
        for column in slice_columns:
            values = part[column].astype(str).to_numpy()
            by_value = R.summaries_by_slice(a["probs"], a["topk_ids"], a["combine"], values, a["logits"])
            for value, summary in by_value.items():
                label, reason = R.verdict(summary)
                rows.append(
                    {
                        "layer": layer,
                        "slice": column,
                        "value": value,
                        "verdict": label,
                        "reason": reason,
                        **{k: v for k, v in summary.items() if not isinstance(v, list)},
                        "load": summary["load"],
                        "weight_share": summary["weight_share"],
                    }
                )
    return pd.DataFrame(rows)


def specialisation_frame(
    routing: pd.DataFrame, examples: pd.DataFrame, labels: Sequence[str], seed: int = 0
) -> pd.DataFrame:
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
            rows.append(
                {
                    "layer": layer,
                    "label": column,
                    "nmi": nmi,
                    **stats,
                    "above_shuffled": stats["mi"] > stats["shuffled_max"],
                }
            )
    return pd.DataFrame(rows)


def coselection_frame(routing: pd.DataFrame) -> pd.DataFrame:
    """Per layer, one row per expert pair (a, b): how often both were chosen for one position."""
    rows = []
    for layer, part in routing.groupby("layer", sort=True):
        topk = stack(part["topk_ids"]).astype(np.int64)
        e = len(part["probs"].iloc[0])
        counts = R.co_selection(topk, e)
        rows += [
            {"layer": layer, "expert_a": a, "expert_b": b, "count": int(counts[a, b])}
            for a in range(e)
            for b in range(e)
        ]
    return pd.DataFrame(rows)


def batch_dependence_of(in_batch: pd.DataFrame, alone: pd.DataFrame) -> dict[str, float]:
    """Per layer: mean |change| of the combine weights of the same positions run alone vs in a batch."""
    keys = ["layer", "call", KEY, "position"]
    joined = in_batch.merge(alone, on=keys, suffixes=("_batch", "_alone"))
    return {
        layer: float(R.batch_dependence(stack(part["combine_alone"]), stack(part["combine_batch"]))["mean_abs_change"])
        for layer, part in joined.groupby("layer")
    }

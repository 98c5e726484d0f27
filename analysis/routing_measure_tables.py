"""The routing table (:mod:`analysis.routing_table`) -> the stored ``routing_measures`` table, and router
saturation over training snapshots (a column of the ``dynamics`` table).

``routing_measures``: one row per (layer, group), the group being ``"all"`` (every routed position of the
layer) and each value of the routed input's modality (``routed_modality``), with the measures of
:mod:`analysis.routing_measures` (formulas there):

    layer, group, positions, num_experts, top_k,
    local_entropy, global_entropy, expert_token_mi        LIMoE: mean H(p(x)), H(mean p(x)), their difference
    top_n, top_n_share, top_n_uniform, top_n_ratio         Megatron: load of the N = k busiest experts vs N / E
    expert_diversity, expert_diversity_by_weight           NeMo: exp(H(load)) / E, by slots and by combine weight
    dead_expert_fraction                                   NeMo: share of experts with no slot
    load_slots, load_weight                                per-expert shares of the T*k slots and of the weight
    next_layer, consistency_next, consistency_positions   Jaccard of a position's expert sets here and in the
                                                           next routed layer (positions present in both only)

Co-activation stays in the ``coselection`` table (:mod:`analysis.indicator_tables`).

Positions are matched across layers (and across snapshots) on :data:`POSITION_KEYS` plus the order of
occurrence of a key within its table, so a layer that routes other positions (another modality, another
call) is never paired with this one: ``consistency_next`` is NaN where no position is shared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import routing_measures as M
from analysis.routing_table import layer_arrays, stack

ALL = "all"
GROUP_COLUMN = "routed_modality"
POSITION_KEYS = ("example_index", "call", "position", "position_kind", "routed_modality")
OCCURRENCE = "occurrence"
COLUMNS = [
    "layer",
    "group",
    "positions",
    "num_experts",
    "top_k",
    "local_entropy",
    "global_entropy",
    "expert_token_mi",
    "top_n",
    "top_n_share",
    "top_n_uniform",
    "top_n_ratio",
    "expert_diversity",
    "expert_diversity_by_weight",
    "dead_expert_fraction",
    "load_slots",
    "load_weight",
    "next_layer",
    "consistency_next",
    "consistency_positions",
]

# What each measure means, in one sentence with its source: (label, meaning). The pages and the report
# show these beside the numbers.
MEASURES: dict[str, tuple[str, str]] = {
    "local_entropy": (
        "local entropy",
        "mean over positions of H(p(x)) in nats: how undecided the router is for a single token (LIMoE).",
    ),
    "global_entropy": (
        "global entropy",
        "H(mean of p(x)) in nats: how evenly the positions use the experts together (LIMoE).",
    ),
    "expert_token_mi": (
        "expert-token MI",
        "global minus local entropy, the mutual information between token and expert: 0 when every token "
        "routes alike, log E when each commits to one expert and the experts are used evenly (LIMoE).",
    ),
    "top_n_share": (
        "top-k coverage",
        "share of the top-k slots held by the k busiest experts, against the uniform k / E "
        "(Megatron-LM's concentration measure).",
    ),
    "top_n_uniform": ("uniform k / E", "the top-k coverage of a perfectly balanced layer."),
    "expert_diversity": (
        "diversity (slots)",
        "exp(H(slot load)) / E: 1 when the slots are spread evenly, 1 / E when one expert takes them all (NeMo).",
    ),
    "expert_diversity_by_weight": (
        "diversity (weight)",
        "the same on the share of combine weight: well below the slot diversity when top-k spreads the slots "
        "but the weight sits on one or two experts.",
    ),
    "dead_expert_fraction": ("dead fraction", "share of the experts that get no slot at all (NeMo)."),
    "consistency_next": (
        "consistency with next layer",
        "mean Jaccard index of a position's expert sets here and in the next routed layer, over the positions "
        "both layers route (OLMoE); empty when they route different positions.",
    ),
    "router_saturation": (
        "router saturation",
        "share of a token's final top-k already chosen by the router at this snapshot, on the same positions "
        "(OLMoE): 1 at the final model.",
    ),
    "router_saturation_top1": (
        "top-1 saturation",
        "share of positions whose final top-1 expert is already the top-1 at this snapshot.",
    ),
}
TABLE_MEASURES = (
    "local_entropy",
    "global_entropy",
    "expert_token_mi",
    "top_n_share",
    "top_n_uniform",
    "expert_diversity",
    "expert_diversity_by_weight",
    "dead_expert_fraction",
    "consistency_next",
)


# --------------------------------------------------------------------------------------------- one group


def group_measures(probs: np.ndarray, topk_ids: np.ndarray, combine: np.ndarray) -> dict:
    """The routing measures of one set of T positions (probs [T, E], topk_ids [T, k], combine [T, E]).

    Entropies on p = probs / sum_e probs; f = slot load (share of the T*k slots), w = weight load (share
    of the total combine weight); top-N coverage with N = k on f (coverage_k = sum of the k largest f_i,
    against the uniform k / E); diversity exp(H(f)) / E and exp(H(w)) / E (NaN when no weight was
    applied at all); dead fraction #{i: f_i = 0} / E.
    """
    topk_ids = np.asarray(topk_ids, dtype=np.int64)
    num_experts, k = int(np.shape(probs)[1]), int(topk_ids.shape[1])
    f = M.slot_load(topk_ids, num_experts)
    w = M.weight_load(combine)
    weighted = bool(w.sum() > 0)
    coverage = M.top_n_coverage(f, k) if f.sum() > 0 else {"share": np.nan, "uniform": k / num_experts, "ratio": np.nan}
    return {
        "positions": int(len(topk_ids)),
        "num_experts": num_experts,
        "top_k": k,
        "local_entropy": M.local_entropy(probs),
        "global_entropy": M.global_entropy(probs),
        "expert_token_mi": M.expert_token_mi(probs),
        "top_n": k,
        "top_n_share": coverage["share"],
        "top_n_uniform": coverage["uniform"],
        "top_n_ratio": coverage["ratio"],
        "expert_diversity": M.expert_diversity(f),
        "expert_diversity_by_weight": M.expert_diversity(w) if weighted else np.nan,
        "dead_expert_fraction": M.dead_expert_fraction(f),
        "load_slots": f.tolist(),
        "load_weight": w.tolist(),
    }


# --------------------------------------------------------------------------------------------- alignment


def keyed(rows: pd.DataFrame, keys: Sequence[str] = POSITION_KEYS) -> pd.DataFrame:
    """``rows`` (index reset) with an ``occurrence`` column: 0 for the first row of each key (in table
    order), 1 for the second, ... (a decoder routing several steps at one position keeps them apart)."""
    keys = [c for c in keys if c in rows]
    out = rows.reset_index(drop=True)
    return out.assign(**{OCCURRENCE: out.groupby(keys, sort=False).cumcount() if keys else np.arange(len(out))})


def aligned_topk(
    rows_a: pd.DataFrame, rows_b: pd.DataFrame, keys: Sequence[str] = POSITION_KEYS
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(topk_a [N, k_a], topk_b [N, k_b], their keys [N rows]) of the N positions both routing tables
    hold: rows joined on ``keys`` (those both tables have) plus the order of occurrence of each key."""
    cols = [c for c in keys if c in rows_a and c in rows_b]
    a = keyed(rows_a[[*cols, "topk_ids"]], cols)
    b = keyed(rows_b[[*cols, "topk_ids"]], cols)
    joined = a.merge(b, on=[*cols, OCCURRENCE], suffixes=("_a", "_b"), how="inner", sort=False)
    if joined.empty:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64), joined[cols]
    return (
        stack(joined["topk_ids_a"]).astype(np.int64),
        stack(joined["topk_ids_b"]).astype(np.int64),
        joined[cols].reset_index(drop=True),
    )


def ordered_layers(routing: pd.DataFrame, layer_order: Sequence[str] | None = None) -> list[str]:
    """The routing table's layers in ``layer_order`` (the declared order), any others after, sorted."""
    present = set(routing["layer"].unique()) if len(routing) else set()
    declared = [name for name in (layer_order or ()) if name in present]
    return declared + sorted(present - set(declared))


def consistency_of(topk_a: np.ndarray, topk_b: np.ndarray) -> float:
    """:func:`analysis.routing_measures.cross_layer_consistency` (mean Jaccard of the expert sets),
    NaN when no position is shared."""
    return M.cross_layer_consistency(topk_a, topk_b) if len(topk_a) else float("nan")


# --------------------------------------------------------------------------------------------- the table


def routing_measures_frame(
    routing: pd.DataFrame, layer_order: Sequence[str] | None = None, group_column: str = GROUP_COLUMN
) -> pd.DataFrame:
    """One row per (layer, group) of the routing table (columns: :data:`COLUMNS`, module docstring).

    ``layer_order``: the declared order of the routed layers (the "next routed layer" of consistency);
    ``group_column``: the per-position column whose values make the groups beside ``"all"``."""
    layers = ordered_layers(routing, layer_order)
    rows = []
    for i, layer in enumerate(layers):
        part = routing[routing["layer"] == layer]
        arrays = layer_arrays(part)
        groups = part[group_column].astype(str).to_numpy() if group_column in part else np.full(len(part), ALL)
        following = layers[i + 1] if i + 1 < len(layers) else None
        if following is not None:
            here, there, keys = aligned_topk(part, routing[routing["layer"] == following])
            key_groups = keys[group_column].astype(str).to_numpy() if group_column in keys else np.full(len(keys), ALL)
        for group in [ALL, *sorted(set(groups))]:
            mask = np.ones(len(part), bool) if group == ALL else groups == group
            row = {
                "layer": layer,
                "group": group,
                **group_measures(arrays["probs"][mask], arrays["topk_ids"][mask], arrays["combine"][mask]),
                "next_layer": following or "",
                "consistency_next": float("nan"),
                "consistency_positions": 0,
            }
            if following is not None:
                shared = np.ones(len(keys), bool) if group == ALL else key_groups == group
                row["consistency_next"] = consistency_of(here[shared], there[shared])
                row["consistency_positions"] = int(shared.sum())
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


# --------------------------------------------------------------------------------------------- saturation


def saturation_by_layer(snapshot_routing: pd.DataFrame, final_routing: pd.DataFrame) -> dict[str, dict]:
    """Per layer, router saturation of one snapshot against the final model on the same positions:
    ``{"router_saturation": (1 / (N k)) sum_x |topk_t(x) ∩ topk_final(x)|, "router_saturation_top1":
    the same with k = 1, "saturation_positions": N}`` (OLMoE; NaN where no position is shared).

    Positions are matched on :data:`POSITION_KEYS` and their order of occurrence (:func:`aligned_topk`)."""
    out = {}
    for layer in ordered_layers(snapshot_routing):
        snap, final, _ = aligned_topk(
            snapshot_routing[snapshot_routing["layer"] == layer], final_routing[final_routing["layer"] == layer]
        )
        if len(final) == 0:
            out[layer] = {"router_saturation": np.nan, "router_saturation_top1": np.nan, "saturation_positions": 0}
            continue
        num_experts = 1 + int(max(snap.max(), final.max()))
        out[layer] = {
            "router_saturation": float(M.router_saturation([snap], final, num_experts=num_experts)[0]),
            "router_saturation_top1": float(M.router_saturation([snap], final, k=1, num_experts=num_experts)[0]),
            "saturation_positions": int(len(final)),
        }
    return out


# --------------------------------------------------------------------------------------------- display


def format_load(load) -> str:
    """A per-expert share vector as text: ``0.29 / 0.23 / 0.24 / 0.24`` ("" when absent)."""
    if load is None or (isinstance(load, float) and math.isnan(load)):
        return ""
    return " / ".join(f"{float(v):.2f}" for v in np.asarray(load, dtype=float).ravel())


def measures_display(frame: pd.DataFrame, measures: Sequence[str] = TABLE_MEASURES) -> pd.DataFrame:
    """The ``routing_measures`` rows as a table to show: layer, group, positions, the ``measures`` under
    their labels (:data:`MEASURES`), the next layer, and the loads by slots and by weight as text."""
    cols = [m for m in measures if m in frame]
    out = frame[["layer", "group", "positions", *cols]].rename(columns={m: MEASURES[m][0] for m in cols})
    out["next layer"] = frame["next_layer"].to_numpy() if "next_layer" in frame else ""
    out["load by slots"] = [format_load(v) for v in frame["load_slots"]] if "load_slots" in frame else ""
    out["load by weight"] = [format_load(v) for v in frame["load_weight"]] if "load_weight" in frame else ""
    return out.reset_index(drop=True)


def measures_side_by_side(
    frames: Mapping[str, pd.DataFrame | None], group: str = ALL, measures: Sequence[str] = TABLE_MEASURES
) -> pd.DataFrame:
    """One row per (layer, measure) with one column per run (its ``routing_measures`` value for ``group``;
    NaN where the run has no such layer, group or table). Layers in the order the runs list them."""
    long = []
    for run, frame in frames.items():
        if frame is None or frame.empty:
            continue
        part = frame[frame["group"] == group]
        for m in measures:
            if m in part:
                long.append(pd.DataFrame({"layer": part["layer"], "measure": MEASURES[m][0], "run": run, "v": part[m]}))
    runs = list(frames)
    if not long:
        return pd.DataFrame(columns=["layer", "measure", *runs])
    stacked = pd.concat(long, ignore_index=True)
    layers = list(dict.fromkeys(stacked["layer"]))
    labels = [MEASURES[m][0] for m in measures]
    wide = stacked.pivot_table(index=["layer", "measure"], columns="run", values="v", aggfunc="first", dropna=False)
    wide = wide.reindex(columns=runs).reset_index()
    wide["_l"] = wide["layer"].map({name: i for i, name in enumerate(layers)})
    wide["_m"] = wide["measure"].map({name: i for i, name in enumerate(labels)})
    wide = wide.sort_values(["_l", "_m"]).drop(columns=["_l", "_m"]).reset_index(drop=True)
    wide.columns.name = None
    return wide

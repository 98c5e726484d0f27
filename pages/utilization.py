"""Utilization and collapse: how the work is spread over the experts of every routed layer.

Per-layer load bars (share of the top-k slots and of the combine weight), a layers x experts heatmap,
the routing measures of the literature for one layer, per modality (``routing_measures`` table: LIMoE's
entropies and MI, top-k coverage, diversity and dead fraction, consistency with the next layer, loads by
slots and by weight), router token-entropy histograms, co-selection, specialisation against labels
(mutual information vs shuffled labels), metrics per slice, and the verdict reasons with their numbers.
Layout only: every number is precomputed in the run's tables and read through pages.reads.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.report import verdict_frame
from analysis.routing_measure_tables import MEASURES, TABLE_MEASURES, measures_display
from pages import reads, state, widgets

SLICE_COLUMNS = [
    "layer",
    "slice",
    "value",
    "verdict",
    "num_positions",
    "effective_experts",
    "token_entropy",
    "load_cv",
    "max_load_ratio",
    "unrouted_fraction",
    "switch_balance_loss",
    "reason",
]


def verdicts(run: str) -> None:
    lm = reads.table(run, "layer_metrics")
    st.subheader("Verdicts and their reasons")
    if lm is not None and len(lm):
        widgets.verdict_lines(lm)
        with st.expander("All indicators per layer"):
            st.dataframe(
                verdict_frame(lm).style.map(F.verdict_css, subset=["verdict"]).format(precision=3), hide_index=True
            )
    else:
        st.info("This run has no layer_metrics table.")


def loads_section(run: str):
    loads = reads.layer_loads(run)
    st.subheader("Load per expert")
    if loads is None or loads.empty:
        st.info("This run has no routing table, so no loads.")
    else:
        st.plotly_chart(
            F.load_bars(
                loads, "Load per expert: share of top-k slots (solid) and of combine weight (hatched), per layer"
            ),
            key="load_bars",
        )
        value = st.radio(
            "Heatmap of",
            ["slot_fraction", "weight_fraction"],
            horizontal=True,
            key="util_heat_value",
            format_func=lambda v: {
                "slot_fraction": "share of top-k slots",
                "weight_fraction": "share of combine weight",
            }[v],
        )
        title = (
            "Share of top-k slots: layers \u00d7 experts"
            if value == "slot_fraction"
            else "Share of combine weight: layers \u00d7 experts"
        )
        st.plotly_chart(F.load_heatmap(loads, value, title), key="load_heatmap")
        with st.expander("Loads split by call / position kind / modality"):
            by = st.selectbox(
                "Split by", ["call", "position_kind", "routed_modality", "gate_modality"], key="util_loads_by"
            )
            split = reads.layer_loads(run, by=[by])
            if split is not None:
                wide = split.pivot_table(index=["layer", by], columns="expert", values="slot_fraction").round(3)
                wide.columns = [f"expert {int(c)}" for c in wide.columns]
                st.dataframe(wide.reset_index(), hide_index=True)
    return loads


def measures_section(run: str) -> None:
    st.subheader("Routing measures")
    measures = reads.table(run, "routing_measures")
    if measures is None or measures.empty:
        st.info(
            f"This run has no routing_measures table (it was built before they existed): {state.rebuild_hint(run)}."
        )
        return
    layers = list(dict.fromkeys(measures["layer"]))
    layer = st.selectbox("Layer", layers, key="util_measures_layer")
    part = measures[measures["layer"] == layer]
    first = part.iloc[0]
    st.caption(
        f"`{layer}`: top-{int(first['top_k'])} of {int(first['num_experts'])} experts. One row for all its routed "
        "positions, then one per modality of the routed input; entropies in nats."
    )
    st.dataframe(measures_display(part).drop(columns=["layer"]).round(3), hide_index=True)
    st.markdown(
        "\n".join(f"- **{MEASURES[m][0]}**: {MEASURES[m][1]}" for m in TABLE_MEASURES)
        + "\n- **load by slots / load by weight**: each expert's share of the top-k slots, and of the combine "
        "weight the layer really applied (expert 0 first)."
    )


def entropy_section(run: str, loads) -> None:
    st.subheader("Router token entropy")
    specs = reads.layer_specs(run)
    layers = list(specs) or (sorted(loads["layer"].unique()) if loads is not None else [])
    values = reads.entropy_values(run, layers)
    st.plotly_chart(
        F.entropy_histograms(
            values,
            {name: layer.num_experts for name, layer in specs.items()},
            "Router token entropy per position (nats), per layer",
        ),
        key="entropy",
    )
    st.caption("0 = the router puts all its probability on one expert; log E (dashed) = uniform over all experts.")


def coselection_section(run: str) -> None:
    st.subheader("Co-selection")
    cosel = reads.table(run, "coselection")
    if cosel is None or cosel.empty:
        st.info("This run has no co-selection table.")
    else:
        left, right = st.columns([3, 2])
        layer = right.selectbox("Layer", list(dict.fromkeys(cosel["layer"])), key="util_cosel_layer")
        right.caption(
            "How often two experts are chosen together for one position (off the diagonal) and how "
            "often each is chosen at all (the diagonal). With top-1 routing only the diagonal is filled; "
            "a pair that is always chosen together behaves like one wide expert."
        )
        with left:
            st.plotly_chart(F.coselection_heatmap(cosel, layer), key="coselection")


def specialisation_section(run: str) -> None:
    st.subheader("Specialisation")
    spec = reads.table(run, "specialisation")
    if spec is None or spec.empty:
        st.info("This run has no specialisation table.")
    else:
        st.plotly_chart(
            F.specialisation_bars(
                spec, "Mutual information between the top-1 expert and each label, vs the same with shuffled labels"
            ),
            key="specialisation",
        )
        st.caption(
            "A blue bar above its red mark: the chosen expert tells more about the label than chance "
            "(the largest MI over 20 label shuffles) does."
        )
        with st.expander("Specialisation numbers"):
            st.dataframe(spec.round(4), hide_index=True)


def slices_section(run: str) -> None:
    st.subheader("Metrics per slice")
    slices = reads.table(run, "slice_metrics")
    if slices is None or slices.empty:
        st.info("This run has no slice_metrics table.")
        return
    a, b, c = st.columns(3)
    layer = a.selectbox("Layer", ["all"] + list(dict.fromkeys(slices["layer"])), key="util_slice_layer")
    kinds = list(dict.fromkeys(slices["slice"]))
    kind = b.selectbox("Slice by", ["all"] + kinds, key="util_slice_kind")
    verdicts = c.multiselect("Verdict", ["healthy", "warning", "collapsed"], key="util_slice_verdicts")
    shown = slices
    if layer != "all":
        shown = shown[shown["layer"] == layer]
    if kind != "all":
        shown = shown[shown["slice"] == kind]
    if verdicts:
        shown = shown[shown["verdict"].isin(verdicts)]
    cols = [col for col in SLICE_COLUMNS if col in shown]
    table = shown[cols].copy()
    for col in table.columns:
        if pd.api.types.is_float_dtype(table[col]):
            table[col] = table[col].round(3)
    st.dataframe(
        table.style.map(F.verdict_css, subset=["verdict"]).format(precision=3),
        hide_index=True,
        column_config={"reason": st.column_config.TextColumn(width="large")},
    )


def render() -> None:
    st.title("Utilization and collapse")
    run, store = state.require_run()
    st.caption(
        f"Run **{run}**: {len(reads.layer_specs(run))} routed layers; every number is over the run's "
        f"{reads.manifest(run).get('num_examples', '?')} examples and all their routed positions."
    )
    verdicts(run)
    loads = loads_section(run)
    measures_section(run)
    entropy_section(run, loads)
    coselection_section(run)
    specialisation_section(run)
    slices_section(run)


render()

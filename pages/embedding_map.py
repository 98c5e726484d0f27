"""Embedding map: the run's fitted 2-D projection of routed representations, coloured by expert,
modality, label or correctness. Selecting a point opens that example in the routing explorer.

Layout only: the frame (coordinates + labels + majority top-1 expert) comes from
``analysis.live.embedding_frame`` over the run's stored tables.
"""
from __future__ import annotations

from pathlib import Path

import plotly.express as px
import streamlit as st

from analysis import figures as F
from analysis.live import embedding_frame, layer_calls
from pages import common

ROUTING_EXPLORER = "pages/routing_explorer.py"
MODALITY_LABELS = ("decisive", "answer_source", "has_image")  # the label that says which modality decides
HOVER_TEXT_FIELDS = ("sentence", "question", "mention", "answer")


@st.cache_data(show_spinner="Reading the map…", max_entries=16)
def _frame(run: str, version: str, layer: str | None, call: str | None, _store):
    return embedding_frame(_store, layer, call)


@st.cache_data(show_spinner=False, max_entries=32)
def _calls(run: str, version: str, layer: str, _store) -> list[str]:
    return layer_calls(_store, layer)


def _open_in_explorer(run: str, index: int) -> None:
    try:
        common.open_example(run, index)
    except st.errors.StreamlitAPIException as exc:  # the explorer page is not in this app's navigation
        st.error(f"Cannot open the routing explorer here ({exc}).")


def main() -> None:
    st.title("Embedding map")
    run, store = common.require_run()
    if not store.has("projection"):
        st.info(f"Run **{run}** has no fitted projection (the model gave no representations, or the run is too "
                f"small); rebuild it with `python -m analysis.precompute --run {run}`.", icon=":material/info:")
        return
    method = str((store.manifest.get("params") or {}).get("projection") or "2-D").upper()
    st.caption(f"A {method} map of each example's routed representation (fitted once by the precompute). "
               "Click a point (or lasso several) to open it in the routing explorer.")

    layers = [spec["name"] for spec in store.manifest.get("layers") or []]
    labels = [c for c in store.manifest.get("slice_labels") or []]
    options = {}
    if layers:
        options["expert (top-1 of a layer)"] = "expert"
    modality = next((c for c in MODALITY_LABELS if c in labels), None)
    if modality:
        options[f"modality ({modality})"] = modality
    for c in labels:
        if c != modality:
            options[f"label: {c}"] = c
    options["correctness"] = "correct"
    version = common.run_version(run)
    c1, c2, c3 = st.columns(3)
    colour_name = c1.selectbox("Colour by", list(options), key="emb_colour")
    colour = options[colour_name]
    layer = call = None
    if colour == "expert":
        layer = c2.selectbox("Layer", layers, key="emb_layer",
                             help="Each example's colour is the expert most often top-1 over its positions in this "
                                  "layer (majority; ties to the lower id).")
        calls = _calls(run, version, layer, store)
        if len(calls) > 1:
            picked = c3.selectbox("Positions of", ["all calls", *calls], key="emb_call",
                                  help="Which calls of the layer count (e.g. the mention side, one InterMoE direction).")
            call = None if picked == "all calls" else picked
    frame = _frame(run, version, layer, call, store)
    if colour not in frame:
        st.warning(f"This run has no `{colour}` column; colouring by example instead.")
        colour = None
    hover = {c: True for c in ("id", *HOVER_TEXT_FIELDS, *labels, "correct") if c in frame}
    hover.update({"x": False, "y": False})
    if colour == "expert" and "expert_share" in frame:
        hover["expert_share"] = ":.0%"
    orders = {}
    if colour == "expert":
        orders["expert"] = sorted(frame["expert"].unique(), key=lambda e: (e == "none", len(e), e))
    colour_map = {f"expert {i}": F.expert_colour(i) for i in range(64)} if colour == "expert" else None
    fig = px.scatter(frame, x="x", y="y", color=colour, custom_data=["example_index"], hover_data=hover,
                     color_discrete_sequence=px.colors.qualitative.Bold, color_discrete_map=colour_map,
                     category_orders=orders, height=560)
    fig.update_traces(marker=dict(size=8, line=dict(width=0.5, color="white")))
    fig.update_layout(xaxis_title=None, yaxis_title=None, legend_title=None, legend_orientation="h",
                      legend_y=-0.02, legend_yanchor="top", margin=dict(t=30, b=10, l=10, r=10))
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    event = st.plotly_chart(fig, key="emb_map", on_select="rerun", selection_mode=("points", "lasso", "box"))
    st.caption(f"{len(frame)} examples.")

    points = (event.selection.get("points") if event and getattr(event, "selection", None) else None) or []
    picked = [int(p["customdata"][0]) for p in points if p.get("customdata")]
    if not picked:
        return
    st.subheader("Selected")
    chosen = frame[frame["example_index"].isin(picked)]
    show = [c for c in ("example_index", "id", *HOVER_TEXT_FIELDS, *labels, "correct", "expert") if c in chosen]
    st.dataframe(chosen[show], hide_index=True, width="stretch")
    first = picked[0]
    if len(picked) > 1:
        first = st.selectbox("Open which example", picked, key="emb_open_pick")
    explorer_exists = (Path(__file__).resolve().parent / Path(ROUTING_EXPLORER).name).is_file()
    if st.button(f"Open example #{first} in the routing explorer", type="primary", disabled=not explorer_exists,
                 key="emb_open", help=None if explorer_exists else "the routing explorer page is not installed"):
        _open_in_explorer(run, first)


if __name__ == "__main__":
    main()

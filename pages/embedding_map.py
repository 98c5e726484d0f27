"""Embedding map: the run's fitted 2-D projection of routed representations, coloured by expert,
modality, label or correctness. Selecting a point opens that example in the routing explorer.

Layout only: the frame (coordinates + labels + majority top-1 expert) comes from
``analysis.live.embedding_frame`` over the run's stored tables.
"""
from __future__ import annotations

from pathlib import Path

import plotly.express as px
import streamlit as st

from analysis.live import embedding_frame
from pages import common

ROUTING_EXPLORER = "pages/routing_explorer.py"
MODALITY_LABELS = ("decisive", "answer_source", "has_image")  # the label that says which modality decides
HOVER_TEXT_FIELDS = ("sentence", "question", "mention", "answer")


# -- run selection (pages.common's helpers when present) ---------------------------------------------

def _selected_store():
    getter = getattr(common, "selected_run", None)
    opener = getattr(common, "run_store", None) or getattr(common, "get_store", None)
    from analysis.store import list_runs
    run = getter() if callable(getter) else None
    if not run:
        runs = list_runs()
        if not runs:
            st.info("No runs are built yet. Build the demo runs with `python -m mmoe_core.demo` (or `make demo`).")
            st.stop()
        wanted = st.query_params.get(getattr(common, "RUN_PARAM", "run"))
        run = st.selectbox("Run", runs, index=runs.index(wanted) if wanted in runs else 0, key="emb_run")
    try:
        store = opener(run) if callable(opener) else _fallback_store(run)
    except FileNotFoundError as exc:
        st.error(str(exc))
        st.stop()
    if store is None:
        st.stop()
    return run, store


@st.cache_resource(show_spinner=False)
def _fallback_store_cached(run: str, target: str):
    from analysis.store import RunStore
    return RunStore(run)


def _fallback_store(run: str):
    import os
    from analysis.store import runs_dir
    return _fallback_store_cached(run, os.path.realpath(runs_dir() / run))


@st.cache_data(show_spinner="Reading the map…", max_entries=16)
def _frame(run: str, version: str, layer: str | None, _store):
    return embedding_frame(_store, layer)


def _open_in_explorer(run: str, index: int) -> None:
    params = {getattr(common, "RUN_PARAM", "run"): run, "example": str(index)}
    try:
        st.switch_page(ROUTING_EXPLORER, query_params=params)
    except st.errors.StreamlitAPIException as exc:  # the explorer page is not in this app's navigation
        st.error(f"Cannot open the routing explorer here ({exc}).")


def main() -> None:
    st.title("Embedding map")
    run, store = _selected_store()
    if not store.has("projection"):
        st.info(f"Run **{run}** has no fitted projection (the model gave no representations, or the run is too "
                f"small); rebuild it with `python -m analysis.precompute --run {run}`.", icon=":material/info:")
        return
    method = "map"
    try:
        from analysis.embedding import FittedProjection
        method = FittedProjection.load(store.path("projection_model.npz")).method.upper()
    except (FileNotFoundError, ValueError, OSError):
        pass
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
    c1, c2 = st.columns(2)
    colour_name = c1.selectbox("Colour by", list(options), key="emb_colour")
    colour = options[colour_name]
    layer = None
    if colour == "expert":
        layer = c2.selectbox("Layer", layers, key="emb_layer",
                             help="Each example's colour is the expert most often top-1 over its positions in this "
                                  "layer (majority; ties to the lower id).")
    frame = _frame(run, str(store.dir), layer, store)
    if colour not in frame:
        st.warning(f"This run has no `{colour}` column; colouring by example instead.")
        colour = None
    hover = {c: True for c in ("id", *HOVER_TEXT_FIELDS, *labels, "correct") if c in frame}
    hover.update({"x": False, "y": False})
    if colour == "expert" and "expert_share" in frame:
        hover["expert_share"] = ":.0%"
    frame = frame.sort_values(colour) if colour else frame
    fig = px.scatter(frame, x="x", y="y", color=colour, custom_data=["example_index"], hover_data=hover,
                     color_discrete_sequence=px.colors.qualitative.Bold, height=560)
    fig.update_traces(marker=dict(size=8, line=dict(width=0.5, color="white")))
    fig.update_layout(xaxis_title=None, yaxis_title=None, legend_title=colour_name,
                      margin=dict(t=10, b=10, l=10, r=10))
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

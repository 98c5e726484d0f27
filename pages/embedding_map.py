"""Embedding map: the run's fitted 2-D projection of routed representations, coloured by expert,
the declared label that says which input decides, any other declared label, or correctness. Hovers carry
the declared fields; selecting a point opens that example in the routing explorer.

Layout only: the frame (coordinates + fields + labels + majority top-1 expert) comes from
``analysis.live.embedding_frame`` over the run's stored tables.
"""

from __future__ import annotations

from pathlib import Path

import plotly.express as px
import streamlit as st

from analysis import figures as F
from analysis.live import embedding_frame, layer_calls
from mmoe_core.spec import ModelSpec
from pages import reads, state, widgets

ROUTING_EXPLORER = "pages/routing_explorer.py"


@st.cache_data(show_spinner="Reading the map…", max_entries=16)
def _frame(run: str, version: str, layer: str | None, call: str | None, _store):
    return embedding_frame(_store, layer, call)


@st.cache_data(show_spinner=False, max_entries=32)
def _calls(run: str, version: str, layer: str, _store) -> list[str]:
    return layer_calls(_store, layer)


def _open_in_explorer(run: str, index: int) -> None:
    try:
        state.open_example(run, index)
    except st.errors.StreamlitAPIException as exc:  # the explorer page is not in this app's navigation
        st.error(f"Cannot open the routing explorer here ({exc}).")


def colour_options(spec: ModelSpec) -> dict[str, str]:
    """{choice in words: frame column}: expert, the deciding label first, the other labels, correctness."""
    options = {}
    if spec.routed_layers:
        options["expert (top-1 of a layer)"] = "expert"
    deciding = spec.deciding_label()
    if deciding is not None:
        options[f"deciding input ({deciding.name})"] = deciding.name
    for label in spec.labels:
        if deciding is None or label.name != deciding.name:
            options[f"label: {label.name}"] = label.name
    options["correctness"] = "correct"
    return options


def hover_columns(spec: ModelSpec, frame) -> list[str]:
    return [
        c
        for c in (
            "id",
            *[f.name for f in spec.fields if f.kind in ("text", "category", "number", "id")],
            *[lab.name for lab in spec.labels],
            "prediction",
            "correct",
        )
        if c in frame
    ]


def render() -> None:
    st.title("Embedding map")
    run, store = state.require_run()
    if not store.has("projection"):
        st.info(
            f"Run **{run}** has no fitted projection (the model gave no representations, or the run is too "
            f"small); rebuild it with `python -m analysis.precompute --run {run}`.",
            icon=":material/info:",
        )
        return
    method = str((store.manifest.get("params") or {}).get("projection") or "2-D").upper()
    st.caption(
        f"A {method} map of each example's routed representation (fitted once by the precompute). "
        "Click a point (or lasso several) to open it in the routing explorer."
    )

    spec = reads.spec(run)
    layers = reads.layer_names(run)
    options = colour_options(spec)
    version = reads.run_version(run)
    c1, c2, c3 = st.columns(3)
    colour_name = c1.selectbox("Colour by", list(options), key="emb_colour")
    colour = options[colour_name]
    layer = call = None
    if colour == "expert":
        layer = c2.selectbox(
            "Layer",
            layers,
            key="emb_layer",
            help="Each example's colour is the expert most often top-1 over its positions in this "
            "layer (majority; ties to the lower id).",
        )
        calls = _calls(run, version, layer, store)
        if len(calls) > 1:
            picked = c3.selectbox(
                "Positions of",
                ["all calls", *calls],
                key="emb_call",
                help="Which calls of the layer count (e.g. one side of a paired input, one "
                "direction of a cross-modal layer).",
            )
            call = None if picked == "all calls" else picked
    frame = _frame(run, version, layer, call, store)
    if colour not in frame:
        st.warning(f"This run has no `{colour}` column; colouring by example instead.")
        colour = None
    names = widgets.column_labels(spec)
    hover = {c: True for c in hover_columns(spec, frame)}
    hover.update({"x": False, "y": False})
    if colour == "expert" and "expert_share" in frame:
        hover["expert_share"] = ":.0%"
    orders = {}
    if colour == "expert":
        orders["expert"] = sorted(frame["expert"].unique(), key=lambda e: (e == "none", len(e), e))
    colour_map = {f"expert {i}": F.expert_colour(i) for i in range(64)} if colour == "expert" else None
    fig = px.scatter(
        frame,
        x="x",
        y="y",
        color=colour,
        custom_data=["example_index"],
        hover_data=hover,
        labels={c: names[c] for c in hover if c in names},
        color_discrete_sequence=px.colors.qualitative.Bold,
        color_discrete_map=colour_map,
        category_orders=orders,
        height=560,
    )
    fig.update_traces(marker=dict(size=8, line=dict(width=0.5, color="white")))
    fig.update_layout(
        xaxis_title=None,
        yaxis_title=None,
        legend_title=None,
        legend_orientation="h",
        legend_y=-0.02,
        legend_yanchor="top",
        margin=dict(t=30, b=10, l=10, r=10),
    )
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
    show = ["example_index", *hover_columns(spec, chosen), *(["expert"] if "expert" in chosen else [])]
    st.dataframe(
        chosen[show],
        hide_index=True,
        width="stretch",
        column_config={c: st.column_config.Column(names[c]) for c in show if c in names},
    )
    first = picked[0]
    if len(picked) > 1:
        first = st.selectbox("Open which example", picked, key="emb_open_pick")
    explorer_exists = (Path(__file__).resolve().parent / Path(ROUTING_EXPLORER).name).is_file()
    if st.button(
        f"Open example #{first} in the routing explorer",
        type="primary",
        disabled=not explorer_exists,
        key="emb_open",
        help=None if explorer_exists else "the routing explorer page is not installed",
    ):
        _open_in_explorer(run, first)


render()

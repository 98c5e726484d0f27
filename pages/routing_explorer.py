"""Routing explorer: one example, its tokens and image patches coloured by the expert each layer chose.

Pick an example (or open one with ``?run=..&example=..`` from any page), a routed layer and one of its
calls (which input is routed, and what the gate sees). Hover a cell for the gate weights (combine), the
top-k ids and weights and the token entropy; grey cells are positions the layer did not route at all
(all-zero combine weights). Image patches sit on the grid cells the routing records carry. The example's
declared fields, labels and stored prediction (by name) are shown above. Layout only: rows come from
the run's routing table through pages.reads.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import figures as F
from mmoe_core.spec import ModelSpec
from pages import reads, state, widgets


def pick_example(run: str, examples: pd.DataFrame, spec: ModelSpec) -> int:
    """The example selector, kept in the URL as ``?example=<index>`` (an index or an id)."""
    titles = {int(r["example_index"]): widgets.example_title(r, spec) for r in examples.to_dict("records")}
    key = f"explorer_example_{run}"
    wanted, message = state.url_example(examples)
    if message:
        st.warning(message, icon=":material/link_off:")
    if wanted is not None and st.session_state.get(key) != wanted:
        st.session_state[key] = wanted
    if st.session_state.get(key) not in titles:
        st.session_state[key] = next(iter(titles))

    def on_change() -> None:
        st.query_params[state.EXAMPLE_PARAM] = str(st.session_state[key])

    st.selectbox(
        "Example",
        list(titles),
        key=key,
        format_func=lambda i: titles.get(i, str(i)),
        on_change=on_change,
        help="Also set by ?example=<index> in the URL; rows on other pages link here.",
    )
    index = int(st.session_state[key])
    if st.query_params.get(state.EXAMPLE_PARAM) != str(index):
        st.query_params[state.EXAMPLE_PARAM] = str(index)
    return index


def example_details(run: str, row: pd.Series, spec: ModelSpec) -> None:
    widgets.show_fields(row, spec)
    predictions = reads.predictions(run)
    if predictions is None or "example_index" not in predictions:
        return
    hit = predictions[predictions["example_index"] == int(row["example_index"])]
    if len(hit):
        text = widgets.prediction_text(hit.iloc[0].to_dict(), spec)
        if text:
            st.markdown("Prediction · " + text)


def k_experts_table(part: pd.DataFrame, layer: str, call: str, top_k: int | None) -> None:
    k = len(part["topk_ids"].iloc[0]) if len(part) else top_k
    st.subheader(f"The {k} experts of every routed position")
    routed = int(part["routed"].astype(bool).sum()) if "routed" in part else len(part)
    st.caption(
        f"{layer} · {call}: top-{k} expert ids (best first) and their combine weights per position; "
        f"{routed} of {len(part)} positions routed. Gate weights (combine) are the weights actually "
        "applied; under a gate that normalises over the batch they can differ from the top-k ids."
    )
    table = F.routing_table(part)
    st.dataframe(
        table.style.map(
            lambda v: f"color: #777; background-color: {F.NOT_ROUTED_COLOUR}" if v == F.NOT_ROUTED_LABEL else "",
            subset=["routed"],
        ).format(precision=3),
        hide_index=True,
        key=f"explorer_table_{layer}_{call}",
    )


def every_call(rows_all: pd.DataFrame, layers: list[str]) -> None:
    with st.expander("Every layer and call of this example (top-1 expert per position)"):
        for layer in layers:
            for call in dict.fromkeys(rows_all.loc[rows_all["layer"] == layer, "call"]):
                sub = rows_all[(rows_all["layer"] == layer) & (rows_all["call"] == call)]
                n_routed = int(sub["routed"].astype(bool).sum()) if "routed" in sub else len(sub)
                counts = sub.loc[sub["routed"].astype(bool), "top1"].value_counts().sort_index()
                share = ", ".join(f"E{int(e)}: {int(n)}" for e, n in counts.items()) or "none"
                st.markdown(f"- **{layer} · {call}**: {n_routed}/{len(sub)} routed; top-1 counts {share}")


def render() -> None:
    st.title("Routing explorer")
    run, store = state.require_run()
    spec = reads.spec(run)
    examples = reads.examples(run)
    if examples is None or examples.empty:
        st.info(f"Run `{run}` has no examples table; {state.rebuild_hint(run)}.")
        return
    index = pick_example(run, examples, spec)
    row = examples[examples["example_index"] == index].iloc[0]
    specs = reads.layer_specs(run)
    info, pic = st.columns([3, 1])
    with info:
        example_details(run, row, spec)
    rows_all = reads.example_routing(run, index)
    if rows_all is None or rows_all.empty:
        st.info("This example has no routed positions in this run.")
        return
    picture = widgets.example_picture(row, spec)
    layers = [name for name in specs if name in set(rows_all["layer"])] + sorted(set(rows_all["layer"]) - set(specs))
    left, right = st.columns([1, 2])
    with left:
        layer = state.synced_radio(
            "Layer",
            layers,
            key=f"explorer_layer_{run}",
            param="layer",
            clears=("call",),
            horizontal=True,
            format_func=lambda name: (
                f"{name} ({specs[name].gate_kind}, top-{specs[name].top_k} of {specs[name].num_experts})"
                if name in specs
                else name
            ),
        )
    layer_rows = rows_all[rows_all["layer"] == layer]
    calls = widgets.order_calls(
        list(dict.fromkeys(layer_rows["call"])), widgets.own_side(rows_all, row, spec)
    )  # the example's own positions first
    with right:
        call = state.synced_radio(
            "Call (what is routed, what the gate sees)",
            calls,
            key=f"explorer_call_{run}_{layer}",
            param="call",
            format_func=lambda c: widgets.call_label(layer_rows, c),
        )
    declared = specs.get(layer)
    if declared is not None:
        st.caption(f"**{layer}** routes {declared.routed}; its gate sees {declared.gate_sees}.")
    part = layer_rows[layer_rows["call"] == call]
    if picture is not None and not F.split_call_rows(part)[0].shape[0]:  # image calls show it beside their grid
        pic.image(picture, caption="the example's image", width=180)
    widgets.show_call_routing(
        rows_all,
        layer,
        call,
        declared.num_experts if declared else None,
        key=f"explorer_{layer}_{call}",
        picture=picture,
    )
    k_experts_table(part, layer, call, declared.top_k if declared else None)
    every_call(rows_all, layers)


render()

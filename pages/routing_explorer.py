"""Routing explorer: one example, its text tokens and image patches coloured by the expert each layer chose.

Pick an example (or open one with ``?run=..&example=..`` from any page), a routed layer and one of its
calls (which input is routed, and what the gate sees). Hover a cell for the gate weights (combine), the
top-k ids and weights and the token entropy; grey cells are positions the layer did not route at all
(all-zero combine weights, e.g. under the published MMoE gate). The table lists the k experts of every
position. Layout only: rows come from the run's routing table through pages.common.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import figures as F
from pages import common

TEXT_FIELDS = common.TEXT_FIELDS


def describe(row: pd.Series) -> str:
    text = next((str(row[f]) for f in TEXT_FIELDS if f in row and isinstance(row[f], str) and row[f]), "")
    text = text if len(text) <= 70 else text[:69] + "\u2026"
    ident = row.get("id", "")
    return f"{int(row[common.example_index_column(row.to_frame().T)])} · {ident} · {text}".strip(" ·")


def pick_example(run: str, examples: pd.DataFrame) -> int:
    """The example selector, kept in the URL as ``?example=<index>``."""
    column = common.example_index_column(examples)
    options = [int(i) for i in examples[column]]
    labels = {int(r[column]): describe(r) for _, r in examples.iterrows()}
    key = f"explorer_example_{run}"
    wanted, message = common.url_example(examples)
    if message:
        st.warning(message, icon=":material/link_off:")
    if wanted is not None and st.session_state.get(key) != wanted:
        st.session_state[key] = wanted
    if st.session_state.get(key) not in labels:
        st.session_state[key] = options[0]

    def on_change() -> None:
        st.query_params[common.EXAMPLE_PARAM] = str(st.session_state[key])

    st.selectbox("Example", options, key=key, format_func=lambda i: labels.get(i, str(i)), on_change=on_change,
                 help="Also set by ?example=<index> in the URL; rows on other pages link here.")
    index = int(st.session_state[key])
    if st.query_params.get(common.EXAMPLE_PARAM) != str(index):
        st.query_params[common.EXAMPLE_PARAM] = str(index)
    return index


def example_details(run: str, row: pd.Series, labels: list[str]) -> None:
    texts = [(f, row[f]) for f in TEXT_FIELDS if f in row and isinstance(row[f], str) and row[f]]
    for name, value in texts:
        st.markdown(f"**{name}:** {value}")
    shown = {l: row[l] for l in labels if l in row and row[l] is not None}
    if shown:
        st.markdown(" · ".join(f"{k}: **{v}**" for k, v in shown.items()))
    predictions = common.table(run, "predictions")
    if predictions is not None and "index" in predictions:
        hit = predictions[predictions["index"] == int(row[common.example_index_column(row.to_frame().T)])]
        if len(hit):
            p = hit.iloc[0]
            parts = [f"{c}: **{p[c]}**" if str(p[c]).strip() else f"{c}: (empty)"
                     for c in ("prediction", "gold", "rank", "correct") if c in p and pd.notna(p[c])]
            if parts:
                st.markdown("Prediction · " + " · ".join(parts))


def main() -> None:
    st.title("Routing explorer")
    run, store = common.require_run()
    examples = common.examples(run)
    if examples is None or examples.empty:
        st.info(f"Run `{run}` has no examples table; rebuild it with `python -m analysis.precompute --run {run}`.")
        return
    rows_all = None
    index = pick_example(run, examples)
    column = common.example_index_column(examples)
    row = examples[examples[column] == index].iloc[0]
    specs = common.layer_specs(run)
    picture = common.example_picture(row)
    rows_all = common.example_routing(run, index)
    info, pic = st.columns([3, 1])
    with info:
        example_details(run, row, list(common.manifest(run).get("slice_labels") or []))
    if rows_all is None or rows_all.empty:
        st.info("This example has no routed positions in this run.")
        return
    layers = [l for l in specs if l in set(rows_all["layer"])] + sorted(set(rows_all["layer"]) - set(specs))
    left, right = st.columns([1, 2])
    with left:
        layer = common.synced_radio("Layer", layers, key=f"explorer_layer_{run}", param="layer", clears=("call",),
                                    horizontal=True,
                                    format_func=lambda l: f"{l} ({specs[l]['gate_kind']}, top-{specs[l]['top_k']} of "
                                             f"{specs[l]['num_experts']})" if l in specs else l)
    layer_rows = rows_all[rows_all["layer"] == layer]
    calls = list(dict.fromkeys(layer_rows["call"]))
    calls = common.order_calls(calls, common.own_side(rows_all, row))  # the example's own positions first
    with right:
        call = common.synced_radio("Call (what is routed, what the gate sees)", calls, key=f"explorer_call_{run}_{layer}",
                                   param="call", format_func=lambda c: common.call_label(layer_rows, c))
    spec = specs.get(layer, {})
    if spec:
        st.caption(f"**{layer}** routes {spec.get('routed')}; its gate sees {spec.get('gate_sees')}.")
    E = int(spec.get("num_experts") or 0) or None
    has_patches = bool((layer_rows.loc[layer_rows["call"] == call, "position_kind"] == "image_patch").any())
    if picture is not None and not has_patches:  # image calls show the picture beside their patch grid
        pic.image(picture, caption="the example's image", width=180)
    common.show_call_routing(rows_all, layer, call, E, key=f"explorer_{layer}_{call}",
                             picture=picture)

    part = layer_rows[layer_rows["call"] == call]
    k = len(part["topk_ids"].iloc[0]) if len(part) else spec.get("top_k")
    st.subheader(f"The {k} experts of every routed position")
    routed = int(part["routed"].astype(bool).sum()) if "routed" in part else len(part)
    st.caption(f"{layer} · {call}: top-{k} expert ids (best first) and their combine weights per position; "
               f"{routed} of {len(part)} positions routed. Gate weights (combine) are the weights actually "
               "applied; under a faithful reference gate they can differ from the top-k ids.")
    table = F.routing_table(part)
    st.dataframe(table.style.map(lambda v: f"color: #777; background-color: {F.NOT_ROUTED_COLOUR}"
                                 if v == F.NOT_ROUTED_LABEL else "", subset=["routed"]).format(precision=3),
                 hide_index=True, key=f"explorer_table_{layer}_{call}")

    with st.expander("Every layer and call of this example (top-1 expert per position)"):
        for l in layers:
            for c in dict.fromkeys(rows_all.loc[rows_all["layer"] == l, "call"]):
                sub = rows_all[(rows_all["layer"] == l) & (rows_all["call"] == c)]
                n_routed = int(sub["routed"].astype(bool).sum()) if "routed" in sub else len(sub)
                counts = sub.loc[sub["routed"].astype(bool), "top1"].value_counts().sort_index()
                share = ", ".join(f"E{int(e)}: {int(n)}" for e, n in counts.items()) or "none"
                st.markdown(f"- **{l} · {c}**: {n_routed}/{len(sub)} routed; top-1 counts {share}")


main()

"""Attributions: which inputs drive the prediction, and a router's choice.

Layout only. The numbers are the run's precomputed ``attributions`` table (integrated gradients with
their convergence delta, occlusion, one router logit per example) read through the store; another router
logit can be attributed now with the run's live model. Text inputs show as coloured tokens, image inputs
(declared kind ``image_patches``) as heatmaps on their declared patch grid. The targets come from the
model's declaration: those that need a (layer, expert, position) are router logits, the others the
prediction. The share of each input is compared across the values of a declared label.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis.live import attribution_choices, attribution_rows, input_share_by_label, picture_keys
from mmoe_core.spec import ModelSpec
from pages import reads, state, widgets

METHOD_NAMES = {"ig": "integrated gradients", "occlusion": "occlusion"}


def router_targets(spec: ModelSpec) -> set[str]:
    return {t.name for t in spec.attribution_targets if t.needs_layer}


def _target_label(row) -> str:
    if pd.isna(row.get("layer")) or row.get("layer") is None:
        return f"prediction ({row['target']})"
    where = f", {row['call']}" if isinstance(row.get("call"), str) and row.get("call") else ""
    pos = row.get("target_position")
    pos = "" if pos is None or (isinstance(pos, float) and math.isnan(pos)) else f" at position {int(pos)}"
    return f"{row['target'].replace('_', ' ')}: {row['layer']} expert {int(row['expert'])}{pos}{where}"


def pick_example(attributions: pd.DataFrame, examples: pd.DataFrame, spec: ModelSpec) -> tuple[int, dict]:
    sampled = sorted(int(i) for i in attributions["example_index"].unique())
    by_index = {int(r["example_index"]): r for r in examples.to_dict("records")}
    keys = picture_keys(widgets.image_fields(spec))
    with_picture = [i for i in sampled if any(isinstance(by_index.get(i, {}).get(k), str) for k in keys)]
    if with_picture and state.EXAMPLE_PARAM not in st.query_params:  # open on an example with a picture
        st.session_state.setdefault("attr_example", with_picture[0])

    def describe(i: int) -> str:
        row = by_index.get(i)
        if row is None:
            return f"#{i}"
        tags = widgets.label_tags(row, spec)
        return widgets.example_title(row, spec) + (f" ({tags})" if tags else "")

    index = state.synced_example(
        "Example (attributed sample)",
        sampled,
        key="attr_example",
        format_func=describe,
        among="the examples the precompute attributed",
    )
    return index, by_index.get(index, {})


def one_example(run: str, attributions: pd.DataFrame, index: int, row: dict, spec: ModelSpec, method_slot) -> None:
    mine = attributions[attributions["example_index"] == index]
    methods = [m for m in METHOD_NAMES if m in set(mine["method"])] + sorted(set(mine["method"]) - set(METHOD_NAMES))
    method = method_slot.radio(
        "Method", methods, format_func=lambda m: METHOD_NAMES.get(m, m), key="attr_method", horizontal=True
    )
    picture = widgets.example_picture(row, spec) if row else None
    choices = attribution_choices(mine[mine["method"] == method])
    merged = (
        choices.merge(
            mine[["method", "target", "layer", "expert", "call", "target_position"]].drop_duplicates(
                ["method", "target", "layer", "expert"]
            ),
            on=["method", "target", "layer", "expert"],
            how="left",
        )
        if "call" in mine
        else choices
    )
    routers = router_targets(spec)
    prediction = merged[~merged["target"].isin(routers)]
    router = merged[merged["target"].isin(routers)]

    left, right = st.columns(2)
    with left:
        st.markdown("#### Prediction")
        if prediction.empty:
            st.info(f"No {METHOD_NAMES.get(method, method)} attribution of the prediction for this example.")
        else:
            rows = attribution_rows(mine, None, method, prediction.iloc[0]["target"], None, None)
            widgets.show_delta(rows)
            widgets.show_inputs(rows, picture, f"attr_pred_{method}", spec)
    with right:
        st.markdown("#### Router logit")
        if router.empty:
            st.info(
                "No router-logit attribution stored for this example and method "
                "(the precompute attributes one router logit per example, by integrated gradients)."
            )
        else:
            pick = st.selectbox(
                "Router logit (layer, expert)",
                list(range(len(router))),
                format_func=lambda i: _target_label(router.iloc[i]),
                key="attr_router",
            )
            chosen = router.iloc[pick]
            rows = attribution_rows(mine, None, method, chosen["target"], chosen["layer"], int(chosen["expert"]))
            widgets.show_delta(rows)
            widgets.show_inputs(rows, picture, f"attr_router_{method}", spec)
        router_now(run, index, picture, spec)


def router_now(run: str, index: int, picture, spec: ModelSpec) -> None:
    """Attribute any router logit of this example now (layer, call, expert, position), with the live model."""
    from analysis.live import live_attribution

    with st.expander("Attribute another router logit now"):
        routing = reads.example_routing(run, index)
        specs = reads.layer_specs(run)
        if routing is None or routing.empty or not specs:
            st.caption("This run has no routing rows for the example.")
            return
        c = st.columns(4)
        layer = c[0].selectbox("Layer", list(specs), key="attr_now_layer")
        part = routing[routing["layer"] == layer]
        call = c[1].selectbox("Call", list(dict.fromkeys(part["call"])), key="attr_now_call")
        rows = part[part["call"] == call]
        labels = {int(p): f"{int(p)}: {t}" if t else str(int(p)) for p, t in zip(rows["position"], rows["token"])}
        position = c[2].selectbox("Position", list(labels), format_func=labels.get, key="attr_now_position")
        top1 = int(rows.loc[rows["position"] == position, "top1"].iloc[0])
        expert = c[3].selectbox(
            "Expert",
            list(range(specs[layer].num_experts)),
            index=top1,
            key="attr_now_expert",
            help=f"The router chose expert {top1} first at this position.",
        )
        key = ("attr_now", run, index, layer, call, int(position), int(expert))
        if st.button("Compute (integrated gradients, 16 steps)", key="attr_now_go"):
            try:
                with st.spinner("Loading the model…"):
                    adapter, examples, lock = reads.live_model(run)
            except Exception as exc:  # a missing checkpoint / dataset, a refused config: say so, keep the page alive
                state.show_failure(f"Cannot load the model of run {state.literal(run)} for a live run", exc)
                return
            if index not in examples:
                st.error(f"Example {index} is not in the run's dataset split any more.")
                return
            try:
                with lock, st.spinner("Integrated gradients…"):
                    st.session_state[key] = live_attribution(
                        adapter,
                        examples[index],
                        "ig",
                        layer=layer,
                        expert=int(expert),
                        position=int(position),
                        call=call,
                    )
            except Exception as exc:  # e.g. a call the adapter cannot attribute to its inputs
                state.show_failure("Cannot attribute that router logit", exc)
                return
        if key in st.session_state:
            result = st.session_state[key]
            widgets.show_delta(result)
            widgets.show_inputs(result, picture, "attr_now", spec)


def share_by_label(attributions: pd.DataFrame, spec: ModelSpec) -> None:
    st.subheader("Input share by label")
    st.caption(
        "Mean share of each input in an example's total |attribution| of the prediction, per value of a "
        "label: e.g. the picture's share where the label says the picture decides, against the rest."
    )
    deciding = spec.deciding_label()
    names = [lab.name for lab in spec.labels]
    if deciding is not None:  # the label that says which input decides comes first
        names = [deciding.name, *[n for n in names if n != deciding.name]]
    options = [n for n in names if n in attributions.columns]
    if not options:
        st.info("The attributions table carries no example labels to compare by.")
        return
    s1, s2 = st.columns(2)
    label = s1.selectbox("Label", options, key="attr_share_label")
    methods = [m for m in METHOD_NAMES if m in set(attributions["method"])]
    method = s2.radio("Method", methods, format_func=METHOD_NAMES.get, key="attr_share_method", horizontal=True)
    shares = input_share_by_label(attributions, label, method, sorted(router_targets(spec)))
    if shares.empty:
        st.info("No attribution of the prediction with that method.")
        return
    inputs = [c for c in shares.columns if c != "n_examples"]
    fig = go.Figure()
    for name in inputs:
        fig.add_bar(
            x=shares.index.astype(str), y=shares[name], name=name, hovertemplate=f"{name}: %{{y:.1%}}<extra></extra>"
        )
    fig.update_layout(
        barmode="stack" if method == "ig" else "group",
        yaxis_title="mean share",
        yaxis_tickformat=".0%",
        xaxis_title=label,
        height=360,
        legend_orientation="h",
        margin=dict(t=30, b=10, l=10, r=10),
    )
    st.plotly_chart(fig, key="attr_share_chart")
    st.dataframe(shares.style.format({c: "{:.1%}" for c in inputs}), width="stretch")
    if method != "ig" and len(inputs) == 1:
        st.caption(f"This method attributes one input only ({inputs[0]}), so its share is always that input's.")


def render() -> None:
    st.title("Attributions")
    st.caption(
        "Which inputs move the prediction and a router's logit. Red: pushes it up; blue: pushes it "
        "down. Integrated gradients (zero baseline) and occlusion."
    )
    run, store = state.require_run()
    if not store.has("attributions"):
        st.info(f"Run **{run}** has no attributions table; {state.rebuild_hint(run)}.", icon=":material/info:")
        return
    spec = reads.spec(run)
    attributions, examples = reads.table(run, "attributions"), reads.examples(run)
    st.subheader("One example")
    c1, c2 = st.columns([3, 1])
    with c1:
        index, row = pick_example(attributions, examples, spec)
    one_example(run, attributions, index, row, spec, c2)
    share_by_label(attributions, spec)


render()

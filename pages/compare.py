"""Compare two runs side by side: headline metrics, per-layer verdicts, the routing measures of the
literature per layer (``routing_measures``), expert loads by slots and by combine weight, and the same
example routed by both (the routing explorer's figures for each run).

Run A is the run picked in the sidebar; run B is picked here and kept in the URL as ``?compare=NAME``.
Layout only: everything comes from the two runs' artifacts through pages.reads.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.report import format_metric, headline_tables
from analysis.routing_measure_tables import ALL, MEASURES, TABLE_MEASURES, measures_side_by_side
from pages import reads, state, widgets

COMPARE_PARAM = "compare"


def pick_other(run: str, runs: list[str]) -> str | None:
    others = [r for r in runs if r != run]
    if not others:
        return None
    key = "compare_run_b"
    wanted = st.query_params.get(COMPARE_PARAM)
    if wanted is not None and wanted not in others:
        st.warning(
            f"The link asks to compare with run {state.literal(wanted)}, which is not available here; pick another.",
            icon=":material/link_off:",
        )
    elif wanted is not None and st.session_state.get(key) != wanted:
        st.session_state[key] = wanted
    if st.session_state.get(key) not in others:
        # Prefer a run of the same family (its examples and layers line up).
        family = reads.spec(run).family
        same = [r for r in others if reads.spec(r).family == family]
        st.session_state[key] = (same or others)[0]

    def on_change() -> None:
        st.query_params[COMPARE_PARAM] = st.session_state[key]

    st.selectbox("Compare with (run B)", others, key=key, on_change=on_change)
    other = st.session_state[key]
    if st.query_params.get(COMPARE_PARAM) != other:
        st.query_params[COMPARE_PARAM] = other
    return other


def metrics_side_by_side(a: str, b: str) -> None:
    overall_a, _ = headline_tables(reads.read_json(a, "metrics"))
    overall_b, _ = headline_tables(reads.read_json(b, "metrics"))
    names = list(dict.fromkeys([*overall_a, *overall_b]))
    if not names:
        st.info("Neither run has headline metrics.")
        return
    st.dataframe(
        pd.DataFrame(
            {
                "measure": names,
                a: [format_metric(n, overall_a[n]) if n in overall_a else "" for n in names],
                b: [format_metric(n, overall_b[n]) if n in overall_b else "" for n in names],
            }
        ),
        hide_index=True,
    )


def verdicts_side_by_side(a: str, b: str) -> None:
    frames = []
    for run in (a, b):
        lm = reads.table(run, "layer_metrics")
        if lm is not None and len(lm):
            frames.append(
                lm[["layer", "verdict", "reason"]].rename(columns={"verdict": f"{run}", "reason": f"reason ({run})"})
            )
        else:
            frames.append(pd.DataFrame(columns=["layer", run, f"reason ({run})"]))
    merged = frames[0].merge(frames[1], on="layer", how="outer")
    merged = merged[["layer", a, b, f"reason ({a})", f"reason ({b})"]]
    st.dataframe(
        merged.style.map(F.verdict_css, subset=[a, b]),
        hide_index=True,
        column_config={
            f"reason ({a})": st.column_config.TextColumn(width="large"),
            f"reason ({b})": st.column_config.TextColumn(width="large"),
        },
    )


def same_example(a: str, b: str) -> None:
    ex_a, ex_b = reads.examples(a), reads.examples(b)
    if ex_a is None or ex_b is None:
        st.info("Both runs need an examples table.")
        return
    key_col = "id" if "id" in ex_a and "id" in ex_b else None
    if key_col:  # the same example in both runs: same id (the index may differ)
        shared = ex_a[[key_col, "example_index"]].merge(
            ex_b[[key_col, "example_index"]], on=key_col, suffixes=("_a", "_b")
        )
    else:
        shared = pd.DataFrame()
    if shared.empty:
        st.info(
            f"`{a}` and `{b}` share no examples (different datasets or families), so one example cannot be "
            "routed by both."
        )
        return
    ids = shared[key_col].astype(str).tolist()
    wanted, message = state.url_example(ex_a)
    if message:
        st.warning(message, icon=":material/link_off:")
    key = f"compare_example_{a}_{b}"
    if wanted is not None:
        hit = ex_a.loc[ex_a["example_index"] == wanted, key_col]
        if len(hit) and str(hit.iloc[0]) in ids and st.session_state.get(key) != str(hit.iloc[0]):
            st.session_state[key] = str(hit.iloc[0])
    if st.session_state.get(key) not in ids:
        st.session_state[key] = ids[0]
    spec_a = reads.spec(a)
    text = {str(r[key_col]): widgets.example_title(r, spec_a) for r in ex_a.to_dict("records")}
    chosen = st.selectbox("Example (shared by both runs)", ids, key=key, format_func=lambda i: text.get(i, i))
    pair = shared[shared[key_col].astype(str) == chosen].iloc[0]
    idx_a, idx_b = int(pair["example_index_a"]), int(pair["example_index_b"])
    rows_a, rows_b = reads.example_routing(a, idx_a), reads.example_routing(b, idx_b)
    if rows_a is None or rows_b is None or rows_a.empty or rows_b.empty:
        st.info("One of the runs has no routing for this example.")
        return
    specs_a, specs_b = reads.layer_specs(a), reads.layer_specs(b)
    layers = [name for name in specs_a if name in set(rows_a["layer"]) and name in set(rows_b["layer"])]
    if not layers:
        st.info("The two runs have no routed layer in common.")
        return
    left, right = st.columns([1, 2])
    layer = left.radio("Layer", layers, horizontal=True, key="compare_layer")
    calls = [
        c
        for c in dict.fromkeys(rows_a.loc[rows_a["layer"] == layer, "call"])
        if c in set(rows_b.loc[rows_b["layer"] == layer, "call"])
    ]
    example_row = ex_a[ex_a["example_index"] == idx_a].iloc[0]
    calls = widgets.order_calls(calls, widgets.own_side(rows_a, example_row, spec_a))  # the example's own first
    call = right.radio(
        "Call",
        calls,
        key=f"compare_call_{layer}",
        format_func=lambda c: widgets.call_label(rows_a[rows_a["layer"] == layer], c),
    )
    picture = widgets.example_picture(example_row, spec_a)
    if picture is not None:
        st.image(picture, caption="the example's image", width=160)
    col_left, col_right = st.columns(2)
    sides = ((col_left, a, rows_a, specs_a, idx_a), (col_right, b, rows_b, specs_b, idx_b))
    for column, run, rows, specs, idx in sides:
        with column:
            declared = specs.get(layer)
            st.markdown(
                f"**{run}** · {declared.gate_kind}, top-{declared.top_k} of {declared.num_experts}"
                if declared
                else f"**{run}**"
            )
            widgets.show_call_routing(
                rows,
                layer,
                call,
                declared.num_experts if declared else None,
                key=f"compare_{run}_{layer}_{call}",
                title_prefix=run,
                wrap=8,
            )
            state.example_link(run, idx, label=f"Open in the routing explorer ({run})")


def measures_of_both(a: str, b: str) -> None:
    frames = {run: reads.table(run, "routing_measures") for run in (a, b)}
    for run, frame in frames.items():
        if frame is None or frame.empty:
            st.info(
                f"Run `{run}` has no routing_measures table (built before they existed): {state.rebuild_hint(run)}."
            )
    present = [f for f in frames.values() if f is not None and not f.empty]
    if not present:
        return
    groups = list(dict.fromkeys([ALL, *sorted({g for f in present for g in f["group"] if g != ALL})]))
    group = st.selectbox(
        "Positions",
        groups,
        key="compare_measures_group",
        format_func=lambda g: "all routed positions" if g == ALL else f"routed modality {g}",
    )
    table = measures_side_by_side(frames, group)
    st.dataframe(table.round(3), hide_index=True)
    with st.expander("What the measures mean"):
        st.markdown("\n".join(f"- **{MEASURES[m][0]}**: {MEASURES[m][1]}" for m in TABLE_MEASURES))


LOAD_VIEWS = {"slot_fraction": "share of top-k slots", "weight_fraction": "share of combine weight"}


def loads_side_by_side(a: str, b: str) -> None:
    value = st.radio("Load by", list(LOAD_VIEWS), horizontal=True, key="compare_load_value", format_func=LOAD_VIEWS.get)
    left, right = st.columns(2)
    for column, name in ((left, a), (right, b)):
        with column:
            st.plotly_chart(
                F.load_heatmap(reads.layer_loads(name), value, title=f"{name}: {LOAD_VIEWS[value]}"),
                key=f"compare_loads_{name}",
            )


def render() -> None:
    st.title("Compare runs")
    run, store = state.require_run()
    other = pick_other(run, reads.available_runs())
    if other is None:
        st.info(f"Only one run (`{run}`) is built: build another to compare, e.g. with `{state.BUILD_COMMAND}`.")
        return
    if state.run_store(other) is None:
        return
    st.caption(f"Run A: **{run}** (the sidebar's run) · run B: **{other}**")

    st.subheader("Headline metrics")
    metrics_side_by_side(run, other)
    st.subheader("Per-layer verdicts")
    verdicts_side_by_side(run, other)

    st.subheader("Routing measures")
    measures_of_both(run, other)

    st.subheader("Expert loads")
    loads_side_by_side(run, other)

    st.subheader("The same example, routed by both")
    same_example(run, other)


render()

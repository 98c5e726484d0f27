"""Source weights: the renderer of every declared output of kind ``source_weights``.

Such an output gives, at each position of an example, a weight on each of a few named sources (the
sources, their labels and colours, and the ground-truth label naming each example's source are all in
the model's declaration). The page shows whether the dominant source agrees with that label, the mean
weights by any declared label, and one example position by position. Layout only: the numbers come from
``analysis.source_weights`` over the run's stored table, through pages.reads.
"""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.source_weights import SourceWeightsSummary, by_label, mean_column
from mmoe_core.spec import ModelSpec, OutputSpec
from pages import reads, state, widgets


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.1%}"


def pick_output(run: str, spec: ModelSpec, store) -> OutputSpec | None:
    outputs = [o for o in spec.output("source_weights") if store.has(o.name)]
    if not outputs:
        st.info(
            f"Run **{run}** ({spec.title}) declares no output of kind *source weights* (a weight per "
            "position on each of a few named sources), so there is nothing to show here.",
            icon=":material/info:",
        )
        return None
    if len(outputs) == 1:
        return outputs[0]
    names = [o.name for o in outputs]
    return outputs[names.index(st.radio("Output", names, horizontal=True, key="sw_output"))]


def agreement(summary: SourceWeightsSummary) -> None:
    output = summary.output
    truth = output.truth_label
    if not truth or summary.confusion.empty:
        st.caption("The model declares no ground-truth label for this output's sources, so agreement is not scored.")
        return
    st.subheader(f"Does the dominant source match the {truth.replace('_', ' ')}?")
    cols = st.columns(1 + len(output.sources))
    cols[0].metric(
        f"agreement with {truth.replace('_', ' ')}", _pct(summary.agreement), help=summary.definition, border=True
    )
    for col, source in zip(cols[1:], output.sources):
        col.metric(
            f"{source.name} examples weighted to {source.name}",
            _pct(summary.agreement_by_source.get(source.name, float("nan"))),
            border=True,
        )
    st.caption(
        f"**Definition.** {summary.definition} Over {summary.agreement_n} single-source examples "
        f"of {len(summary.per_example)}."
    )
    left, right = st.columns([2, 3])
    with left:
        st.markdown(f"**Confusion: {truth.replace('_', ' ')} × dominant source** (examples)")
        st.dataframe(summary.confusion, width="stretch")
        st.caption(
            "Examples whose label names no single source have no one right side: shown for reference, "
            "left out of the agreement."
        )
    with right:
        st.plotly_chart(
            F.source_weight_bars(by_label(summary, truth), truth, output.sources, f"By {truth.replace('_', ' ')}"),
            key="sw_by_truth",
        )


def by_labels(summary: SourceWeightsSummary) -> None:
    others = [lab for lab in summary.labels if lab != summary.output.truth_label]
    if not others:
        return
    label = st.selectbox("Mean weights by label", others, key="sw_by_label") if len(others) > 1 else others[0]
    st.plotly_chart(
        F.source_weight_bars(by_label(summary, label), label, summary.output.sources, f"By {label.replace('_', ' ')}"),
        key="sw_by_other",
    )


def one_example(run: str, spec: ModelSpec, weights: pd.DataFrame, summary: SourceWeightsSummary) -> None:
    output = summary.output
    st.subheader(f"One example, position by position ({output.positions})")
    per = summary.per_example
    examples = reads.examples(run)
    rows = {int(r["example_index"]): r for r in examples.to_dict("records")} if examples is not None else {}
    filters = [lab for lab in summary.labels if lab in per]
    f1, f2 = st.columns([1, 3])
    shown = per
    if filters:
        label = next((lab for lab in filters if lab != output.truth_label), filters[0])
        values = sorted(per[label].dropna().astype(str).unique())
        chosen = f1.selectbox(f"{label.replace('_', ' ')}", ["all", *values], key=f"sw_filter_{label}")
        shown = per if chosen == "all" else per[per[label].astype(str) == chosen]
    if shown.empty:
        st.info("No example with that label in this run.")
        return

    def describe(i: int) -> str:
        row = per[per["example_index"] == i].iloc[0]
        value = row.get(output.truth_label) if output.truth_label else None
        truth = f"{value}; " if value is not None and pd.notna(value) else ""
        return f"{widgets.example_title(rows.get(i, {'example_index': i}), spec)} ({truth}dominant {row['dominant']})"

    index = state.synced_example(
        "Example",
        [int(i) for i in shown["example_index"]],
        key="sw_example",
        format_func=describe,
        container=f2,
        among="this run's examples" if shown is per else "the examples of that filter",
    )
    row = per[per["example_index"] == index].iloc[0]
    title = spec.title_field()
    heading = str(rows.get(index, {}).get(title.name, "")) if title is not None else ""
    st.plotly_chart(
        F.source_weight_positions(
            weights[weights["example_index"] == index],
            output.sources,
            f"“{html.escape(heading)}”" if heading else f"example {index}",
        ),
        key="sw_positions",
    )
    cols = st.columns(len(output.sources) + 2)
    for col, source in zip(cols, output.sources):
        col.metric(f"mean {source.label}", f"{row[mean_column(source.name)]:.3f}")
    cols[-2].metric("dominant source", row["dominant"])
    if output.truth_label:
        cols[-1].metric(output.truth_label.replace("_", " "), str(row.get(output.truth_label, "?")))
    gold = next((f for f in spec.fields if f.role == "gold"), None)
    if gold is not None and index in rows and pd.notna(rows[index].get(gold.name)):
        st.caption(f"{gold.label}: **{state.escape_markdown(rows[index][gold.name])}**")


def render() -> None:
    st.title("Source weights")
    run, store = state.require_run()
    spec = reads.spec(run)
    output = pick_output(run, spec, store)
    if output is None:
        return
    st.caption(
        f"**{output.name}** · {output.description} Sources: " + ", ".join(f"{s.label}" for s in output.sources) + "."
    )
    weights, summary = reads.source_weights(run, output.name)
    agreement(summary)
    by_labels(summary)
    one_example(run, spec, weights, summary)


render()

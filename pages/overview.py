"""Overview and health: the model card, headline metrics and the per-layer verdicts of the picked run.

Layout only: the numbers come from the run's artifacts (manifest, config.json, metrics.json,
layer_metrics) through pages.common; the model card and tables are arranged by analysis.report's helpers
so the exported report says the same thing.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.report import (format_metric, headline_tables, layers_frame, model_card, rate_measures,
                             training_options, verdict_frame)
from pages import common


def verdict_table(run: str) -> None:
    lm = common.table(run, "layer_metrics")
    if lm is None or lm.empty:
        st.info(f"Run `{run}` has no layer_metrics table; rebuild it with "
                f"`python -m analysis.precompute --run {run}`.")
        return
    frame = verdict_frame(lm)
    for row in frame.itertuples(index=False):
        colour = {"healthy": "green", "warning": "orange", "collapsed": "red"}.get(row.verdict, "gray")
        reason = str(row.reason)
        if reason.startswith(f"{row.verdict}: "):
            reason = reason[len(row.verdict) + 2:]
        st.markdown(f"**{row.layer}** · :{colour}-background[{row.verdict}] {reason}")
    st.dataframe(frame.style.map(F.verdict_css, subset=["verdict"]).format(precision=3), hide_index=True,
                 column_config={"reason": st.column_config.TextColumn(width="large")})


def headline(run: str, family: str) -> None:
    metrics = common.read_json(run, "metrics")
    overall, by = headline_tables(metrics)
    if not overall:
        st.info("This run has no headline metrics (metrics.json).")
        return
    shown = [k for k in overall if k != "n"][:8]
    cols = st.columns(len(shown) + (1 if "n" in overall else 0))
    for col, key in zip(cols, shown):
        col.metric(key.replace("_", " "), format_metric(key, overall[key]))
    if "n" in overall:
        cols[-1].metric("examples scored", format_metric("n", overall["n"]))
    if not by:
        return
    rates = rate_measures(metrics.get("overall") or {})
    tabs = st.tabs([f"by {label.replace('_', ' ')}" for label in by])
    for tab, (label, frame) in zip(tabs, by.items()):
        with tab:
            left, right = st.columns([3, 2])
            with left:
                chosen = [m for m in ("MRR", "Hits@1", "Hits@5", "exact_match") if m in rates] or rates[:3]
                st.plotly_chart(F.headline_bars(metrics[f"by_{label}"], chosen,
                                                f"{', '.join(chosen)} by {label.replace('_', ' ')}"),
                                key=f"headline_{label}")
            with right:
                st.dataframe(frame, hide_index=True)


EXAMPLE_COLUMNS = ("id", "sentence", "question", "mention", "answer", "gold_name", "prediction_name", "prediction",
                   "rank", "correct")


def examples_section(run: str) -> None:
    """Every example with its prediction; selecting a row opens it in the routing explorer."""
    examples = common.examples(run)
    if examples is None or examples.empty:
        return
    column = common.example_index_column(examples)
    shown = examples.rename(columns={column: "example_index"})
    predictions = common.table(run, "predictions")
    if predictions is not None and "index" in predictions:
        keep = [c for c in ("prediction_name", "prediction", "rank", "correct") if c in predictions]
        extra = predictions[["index", *keep]].rename(columns={"index": "example_index"})
        shown = shown.merge(extra, on="example_index", how="left", suffixes=("", " (predicted)"))
    labels = [l for l in common.manifest(run).get("slice_labels") or [] if l in shown]
    cols = ["example_index", *[c for c in EXAMPLE_COLUMNS if c in shown], *labels]
    common.example_table(shown[list(dict.fromkeys(cols))], run, key=f"overview_examples_{run}", height=320)


def main() -> None:
    st.title("Overview and health")
    run, store = common.require_run()
    manifest = common.manifest(run)
    config = common.read_json(run, "config") or {}
    family = str(manifest.get("family", ""))
    st.caption(f"Run **{run}** · {family} · {manifest.get('num_examples', '?')} examples of split "
               f"`{manifest.get('split', '?')}` · built {manifest.get('created', '?')}")

    st.subheader("Per-layer verdicts")
    st.caption("healthy / warning / collapsed from the documented thresholds (analysis.routing.THRESHOLDS); "
               "each reason quotes the numbers behind it. Details on the Utilization and collapse page.")
    verdict_table(run)

    st.subheader("Headline metrics")
    headline(run, family)

    st.subheader("Examples")
    examples_section(run)

    st.subheader("Model card")
    card, opts = st.columns([3, 2])
    with card:
        st.dataframe(pd.DataFrame(model_card(manifest, config), columns=["field", "value"]), hide_index=True,
                     column_config={"value": st.column_config.TextColumn(width="large")})
    with opts:
        options = training_options(config)
        if options:
            st.dataframe(pd.DataFrame({"training option": list(options), "value": [str(v) for v in options.values()]}),
                         hide_index=True)
    st.markdown("**Routed layers** (E experts, top-k, gate kind, what is routed, what the gate sees)")
    st.dataframe(layers_frame(manifest), hide_index=True)
    gates = {spec.get("gate_kind") for spec in manifest.get("layers") or []}
    if "mmoe_reference" in gates:
        st.info("This run uses the published MEL-MMoE `SwitchGate` (`gate=\"mmoe_reference\"`): it normalises "
                "over the batch and scatters its top-k mask along the sequence axis, so many positions get no "
                "expert output at all. The routing explorer shows them as **not routed**.", icon=":material/info:")


main()

"""Overview and health: the per-layer verdicts, headline metrics, examples and model card of the picked run.

Layout only: the numbers come from the run's artifacts (its declaration, manifest, config.json,
metrics.json, layer_metrics, examples and predictions) through pages.reads; the run facts of the model
card and the verdict table are arranged by analysis.report's helpers, so the exported report says the
same thing. The headline measures come first as the model declares them (``spec.prediction.headline``),
and every warning the model declares (``spec.notes``) is shown.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.report import (
    format_metric,
    headline_tables,
    layers_frame,
    model_card,
    rate_measures,
    training_options,
    verdict_frame,
)
from mmoe_core.spec import ModelSpec
from pages import reads, state, widgets

PREDICTION_COLUMNS = ("prediction", "gold", "rank", "correct")


def verdict_table(run: str) -> None:
    lm = reads.table(run, "layer_metrics")
    if lm is None or lm.empty:
        st.info(f"Run `{run}` has no layer_metrics table; {state.rebuild_hint(run)}.")
        return
    widgets.verdict_lines(lm)
    st.dataframe(
        verdict_frame(lm).style.map(F.verdict_css, subset=["verdict"]).format(precision=3),
        hide_index=True,
        column_config={"reason": st.column_config.TextColumn(width="large")},
    )


def unrouted_note(run: str) -> None:
    """Say so when a layer leaves positions with no expert output (all-zero combine weights)."""
    lm = reads.table(run, "layer_metrics")
    if lm is None or "unrouted_fraction" not in lm:
        return
    hit = lm[lm["unrouted_fraction"].fillna(0) > 0]
    if len(hit):
        shares = ", ".join(f"{r.layer} {r.unrouted_fraction:.0%}" for r in hit.itertuples(index=False))
        st.info(
            f"Some positions get no expert output at all (their combine weights are all zero): {shares} of "
            "the routed positions. The routing explorer shows them as **not routed**.",
            icon=":material/info:",
        )


def headline_first(names, headline) -> list[str]:
    """``names`` with the declared headline measures first, in their declared order (case-insensitive)."""
    order = {h.lower(): i for i, h in enumerate(headline)}
    return sorted(names, key=lambda n: order.get(str(n).lower(), len(order)))


def headline(run: str, spec: ModelSpec) -> None:
    metrics = reads.read_json(run, "metrics")
    overall, by = headline_tables(metrics)
    if not overall:
        st.info("This run has no headline metrics (metrics.json).")
        return
    shown = headline_first([k for k in overall if k != "n"], spec.prediction.headline)[:8]
    cols = st.columns(len(shown) + (1 if "n" in overall else 0))
    for col, key in zip(cols, shown):
        col.metric(key.replace("_", " "), format_metric(key, overall[key]))
    if "n" in overall:
        cols[-1].metric("examples scored", format_metric("n", overall["n"]))
    if not by:
        return
    rates = rate_measures(metrics.get("overall") or {})
    declared = [
        m
        for m in headline_first(rates, spec.prediction.headline)
        if m.lower() in {h.lower() for h in spec.prediction.headline}
    ]
    chosen = declared[:3] or rates[:3]
    tabs = st.tabs([f"by {label.replace('_', ' ')}" for label in by])
    for tab, (label, frame) in zip(tabs, by.items()):
        with tab:
            left, right = st.columns([3, 2])
            with left:
                st.plotly_chart(
                    F.headline_bars(
                        metrics[f"by_{label}"], chosen, f"{', '.join(chosen)} by {label.replace('_', ' ')}"
                    ),
                    key=f"headline_{label}",
                )
            with right:
                st.dataframe(frame, hide_index=True)


def examples_section(run: str, spec: ModelSpec) -> None:
    """Every example with its prediction; selecting a row opens it in the routing explorer."""
    examples = reads.examples(run)
    if examples is None or examples.empty:
        return
    shown = examples
    predictions = reads.predictions(run)
    if predictions is not None and "example_index" in predictions:
        keep = [c for c in PREDICTION_COLUMNS if c in predictions]
        shown = shown.merge(
            predictions[["example_index", *keep]], on="example_index", how="left", suffixes=("", " (predicted)")
        )
    item = spec.prediction.item or "prediction"
    cols = [
        "example_index",
        *widgets.display_columns(spec, shown),
        *[c for c in PREDICTION_COLUMNS if c in shown and c not in widgets.display_columns(spec, shown)],
    ]
    labels = {
        **widgets.column_labels(spec),
        "prediction": f"predicted {item}",
        "gold": f"gold {item}",
        "rank": "gold rank",
    }
    widgets.example_table(
        shown[list(dict.fromkeys(cols))],
        run,
        key=f"overview_examples_{run}",
        height=320,
        column_config={c: st.column_config.Column(labels[c]) for c in cols if c in labels},
    )


def card_section(run: str, spec: ModelSpec, manifest: dict, config: dict) -> None:
    card, opts = st.columns([3, 2])
    lines = model_card(manifest, config, spec)
    with card:
        st.dataframe(
            pd.DataFrame(lines, columns=["field", "value"]),
            hide_index=True,
            column_config={"value": st.column_config.TextColumn(width="large")},
        )
    with opts:
        options = training_options(config)
        if options:
            st.dataframe(
                pd.DataFrame({"training option": list(options), "value": [str(v) for v in options.values()]}),
                hide_index=True,
            )
    st.markdown("**Routed layers** (E experts, top-k, what the gate does, what is routed, what the gate sees)")
    st.dataframe(
        layers_frame(spec), hide_index=True, column_config={"note": st.column_config.TextColumn(width="large")}
    )


def render() -> None:
    st.title("Overview and health")
    run, store = state.require_run()
    spec = reads.spec(run)
    manifest = reads.manifest(run)
    st.caption(
        f"Run **{run}** · {spec.title} · {manifest.get('num_examples', '?')} examples of split "
        f"`{manifest.get('split', '?')}` · built {manifest.get('created', '?')}"
    )
    for note in spec.notes:
        st.info(note, icon=":material/info:")
    unrouted_note(run)

    st.subheader("Per-layer verdicts")
    st.caption(
        "healthy / warning / collapsed from the documented thresholds (analysis.routing.THRESHOLDS); "
        "each reason quotes the numbers behind it. Details on the Utilization and collapse page."
    )
    verdict_table(run)

    st.subheader("Headline metrics")
    headline(run, spec)

    st.subheader("Examples")
    examples_section(run, spec)

    st.subheader("Model card")
    card_section(run, spec, manifest, reads.read_json(run, "config") or {})


render()

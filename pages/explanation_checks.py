"""Explanation checks: are the dashboard's explanations worth the pictures?

Ground-truth agreement (attribution mass on the input that decides an example, dominant source against the
truth label, routing specialisation against a permutation baseline), the sanity checks with their flags
(cascading parameter randomisation, deletion and insertion curves, captum's infidelity and sensitivity),
the run-wide expert knockout as a heatmap beside each expert's slot load, and the collapse detector judged
on injected pathologies. Every number comes from the run's ``explanation_checks``, ``knockout_effects`` and
``detector_suite`` tables and ``explanation_checks.json`` (:mod:`analysis.explanation_checks`), read through
pages.reads; the labels, inputs and metrics named are the run's declared ones.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis import figures as F
from pages import reads, state

FLAG_CSS = "background-color: #f8d7da; color: #842029"
CHECK_TABLES = ("explanation_checks", "knockout_effects", "detector_suite")


def _flag_css(value: object) -> str:
    return FLAG_CSS if value == "flagged" else ""


def _shown(rows: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """``rows`` with ``columns`` renamed for a person, the flag in words, floats rounded."""
    out = rows.copy()
    if "flagged" in out:
        out["flagged"] = out["flagged"].map(lambda f: "flagged" if bool(f) else "ok")
    out = out[[c for c in columns if c in out]].rename(columns=columns)
    return out


def _table(frame: pd.DataFrame, key: str) -> None:
    styled = frame.style.format(precision=3, na_rep="–")
    if "flag" in frame:
        styled = styled.map(_flag_css, subset=["flag"])
    st.dataframe(styled, hide_index=True, key=key)


def _rows(checks: pd.DataFrame, check: str) -> pd.DataFrame:
    return checks[checks["check"] == check] if checks is not None and len(checks) else pd.DataFrame()


def _no_checks(run: str) -> None:
    st.info(
        "This run has no explanation checks (it was built before they existed, or with `--no-checks`): "
        f"rebuild it with `python -m analysis.precompute --run {run} --force`."
    )


# ----------------------------------------------------------------------------------------- agreement


def attribution_agreement(checks: pd.DataFrame, summary: dict) -> None:
    rows = _rows(checks, "attr_decisive_share")
    st.markdown("**Attributions: mass on the deciding input**")
    if rows.empty:
        st.caption("No attribution sample, or the model declares no label saying which input decides an example.")
        return
    label = rows["label"].iloc[0]
    st.caption(
        f"For the examples of each value of the ground-truth label *{label}*: the mean share of "
        "attribution mass (sum of |a|) on the inputs that value points at, beside the same share over the "
        "other examples. A share not above it is flagged; p: one-sided Mann-Whitney U."
    )
    _table(
        _shown(
            rows,
            {
                "method": "method",
                "slice": label,
                "value": "share on deciding inputs",
                "baseline": "share elsewhere",
                "n": "examples",
                "p_value": "p",
                "flagged": "flag",
                "detail": "what",
            },
        ),
        "ec_attr",
    )


def source_agreement(checks: pd.DataFrame) -> None:
    rows = _rows(checks, "source_agreement")
    if rows.empty:
        return
    st.markdown("**Source weights: dominant source against the truth label**")
    st.caption(
        "Share of examples whose largest mean source weight is the source their ground-truth label names, "
        "overall, per source and per value of every other label. Baseline: the same agreement with truth "
        "and dominant source paired at random (per source: how often that source dominates at all)."
    )
    _table(
        _shown(
            rows,
            {
                "method": "output",
                "label": "by",
                "slice": "value",
                "value": "agreement",
                "baseline": "chance",
                "n": "examples",
                "p_value": "p",
                "flagged": "flag",
            },
        ),
        "ec_sources",
    )


def routing_agreement(checks: pd.DataFrame) -> None:
    rows = _rows(checks, "routing_specialisation")
    if rows.empty:
        return
    st.markdown("**Routing specialisation: chosen expert against each ground-truth label**")
    st.caption(
        "Mutual information (nats) between the top-1 expert and the label, per layer, against its mean "
        "under permutations (labels of whole examples are permuted between examples, labels of positions "
        "within each example). Flagged: chance explains it (p at or above the threshold)."
    )
    wide = rows.pivot_table(index="layer", columns="label", values="value", sort=False)
    pvals = rows.pivot_table(index="layer", columns="label", values="p_value", sort=False)
    fig = go.Figure(
        go.Heatmap(
            z=wide.to_numpy(),
            x=list(wide.columns),
            y=list(wide.index),
            colorscale="Blues",
            text=[
                ["–" if math.isnan(v) else f"{v:.3f}<br>p {p:.3f}" for v, p in zip(r, q)]
                for r, q in zip(wide.to_numpy(), pvals.reindex_like(wide).to_numpy())
            ],
            texttemplate="%{text}",
            colorbar=dict(title=dict(text="MI")),
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title="MI(top-1 expert; label), per layer", height=140 + 48 * len(wide), margin=dict(t=60, b=40, l=130, r=20)
    )
    st.plotly_chart(fig, key="ec_specialisation")
    with st.expander("Specialisation numbers"):
        _table(
            _shown(
                rows,
                {
                    "layer": "layer",
                    "label": "label",
                    "value": "MI",
                    "baseline": "permuted MI",
                    "n": "positions",
                    "p_value": "p",
                    "flagged": "flag",
                    "detail": "what",
                },
            ),
            "ec_spec_rows",
        )


# ----------------------------------------------------------------------------------------- sanity


def randomisation(checks: pd.DataFrame, summary: dict) -> None:
    rows = _rows(checks, "randomisation_spearman")
    st.markdown("**Model-parameter randomisation (Adebayo et al.)**")
    if rows.empty:
        st.caption("Not computed for this run (no sanity sample).")
        return
    threshold = float(rows["baseline"].iloc[0])
    st.caption(
        "Modules are re-initialised from the output end backwards, stage by stage (each stage keeps the "
        "ones before). The line is the Spearman rank correlation of |attribution| per position with the "
        f"trained model's. Above {threshold:g} the explanation did not change: flagged. `input_norm` is a "
        "control that ignores the model (the size of each input vector): it must be flagged everywhere."
    )
    fig = go.Figure()
    stages = list(dict.fromkeys(rows["layer"]))
    for i, (method, part) in enumerate(rows.groupby("method", sort=False)):
        part = part.set_index("layer").reindex(stages)
        fig.add_trace(
            go.Scatter(
                x=[s.split(": ", 1)[0] for s in stages],
                y=part["value"],
                mode="lines+markers",
                name=method,
                line=dict(color=F.layer_colour(i)),
                hovertext=stages,
                hovertemplate="%{hovertext}<br>rho %{y:.3f}<extra></extra>",
            )
        )
    fig.add_hline(y=threshold, line_dash="dash", line_color="#b02a37", annotation_text="flag above")
    fig.update_layout(
        title="Rank correlation with the trained model's attributions",
        height=360,
        xaxis_title="randomisation stage (cumulative, from the output end)",
        yaxis_title="Spearman rho",
        yaxis_range=[-0.2, 1.05],
        margin=dict(t=60, b=50, l=60, r=20),
    )
    st.plotly_chart(fig, key="ec_randomisation")
    _table(
        _shown(
            rows,
            {
                "method": "method",
                "layer": "stage",
                "value": "Spearman rho",
                "n": "examples",
                "flagged": "flag",
                "detail": "what",
            },
        ),
        "ec_random_rows",
    )


def faithfulness(checks: pd.DataFrame) -> None:
    rows = (
        checks[checks["check"].isin(["deletion_auc", "insertion_auc", "infidelity", "sensitivity_max"])]
        if checks is not None and len(checks)
        else pd.DataFrame()
    )
    if rows.empty:
        return
    st.markdown("**Deletion and insertion curves; captum's infidelity and sensitivity**")
    st.caption(
        "Deletion: the most-attributed positions are removed first (lower area is better); insertion: they "
        "are added back first (higher is better); both against random orders. Infidelity against the same "
        "values shuffled over positions (lower is better). Sensitivity: how much the explanation moves under "
        "small input noise (reported, not judged)."
    )
    _table(
        _shown(
            rows,
            {
                "check": "check",
                "method": "method",
                "value": "value",
                "baseline": "baseline",
                "n": "examples",
                "p_value": "p",
                "flagged": "flag",
                "detail": "what",
            },
        ),
        "ec_faithful",
    )


# ----------------------------------------------------------------------------------------- knockout


def _heatmap(
    wide: pd.DataFrame, title: str, scale: str, fmt: str, mid: float | None = None, bar: str = ""
) -> go.Figure:
    z = wide.to_numpy(dtype=float)
    text = [["–" if math.isnan(v) else format(v, fmt) for v in row] for row in z]
    extra = {}
    if mid is not None:
        largest = float(pd.DataFrame(z).abs().max().max()) if z.size else 0.0
        bound = largest if largest > 0 else 1.0  # all zero: a readable scale, not +-1e-9
        extra = dict(zmid=mid, zmin=-bound, zmax=bound)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(wide.columns),
            y=list(wide.index),
            colorscale=scale,
            text=text,
            texttemplate="%{text}",
            colorbar=dict(title=dict(text=bar)),
            **extra,
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=140 + 48 * len(wide), margin=dict(t=60, b=40, l=130, r=20))
    return fig


def knockout_section(run: str, knockout: pd.DataFrame | None, summary: dict) -> None:
    st.subheader("Expert knockout: used a lot, or matters?")
    if knockout is None or knockout.empty:
        st.info("This run has no knockout table.")
        return
    metrics = list(dict.fromkeys(knockout["metric"]))
    a, b = st.columns(2)
    metric = a.selectbox("Metric", metrics, key="ec_metric")
    slices = ["all examples"] + [
        f"{lab} = {s}"
        for lab, s in dict.fromkeys(
            zip(knockout.loc[knockout["label"] != "", "label"], knockout.loc[knockout["label"] != "", "slice"])
        )
    ]
    where = b.selectbox("Slice", slices, key="ec_slice")
    rows = knockout[knockout["metric"] == metric]
    if where == "all examples":
        rows = rows[rows["label"] == ""]
    else:
        label, value = where.split(" = ", 1)
        rows = rows[(rows["label"] == label) & (rows["slice"] == value)]
    n = int(rows["n"].max()) if len(rows) else 0
    st.caption(
        f"Change of {metric} ({where}, {n} examples re-run) when one expert is disabled (the gate chooses "
        "among the others) or the whole layer's MoE output is removed; beside it, the expert's share of "
        "the routing slots over the run. Whether a drop is bad depends on the metric (a loss: a rise is)."
    )
    experts = rows[rows["expert"] >= 0]
    layers = list(dict.fromkeys(knockout["layer"]))
    delta = experts.pivot_table(index="layer", columns="expert", values="delta", sort=False).reindex(layers)
    load = experts.pivot_table(index="layer", columns="expert", values="load", sort=False).reindex(layers)
    for wide in (delta, load):
        wide.columns = [f"expert {int(c)}" for c in wide.columns]
    left, right = st.columns(2)
    with left:
        st.plotly_chart(
            _heatmap(delta, f"\u0394 {metric}, expert knocked out", "RdBu", "+.3f", mid=0.0, bar="\u0394"),
            key="ec_knockout_heatmap",
        )
    with right:
        st.plotly_chart(
            _heatmap(load, "Share of routing slots (the run)", "Blues", ".0%", bar="load"), key="ec_load_heatmap"
        )
    whole = rows[rows["expert"] == -1][["layer", "base", "value", "delta"]]
    notes = summary.get("knockout_notes") or {}
    st.markdown("**Whole routed layer removed** (its MoE output zero, the rest of the model unchanged)")
    if len(whole):
        _table(
            whole.rename(
                columns={"base": f"{metric} (model)", "value": f"{metric} without the layer", "delta": "\u0394"}
            ),
            "ec_whole",
        )
    for layer, why in notes.items():
        st.caption(f"{layer}: not removable: {why}")
    with st.expander("Every knockout row"):
        _table(knockout, "ec_knockout_rows")


# ----------------------------------------------------------------------------------------- detector


def detector_section(suite: pd.DataFrame | None) -> None:
    st.subheader("The collapse detector, validated on this run's routing")
    if suite is None or suite.empty:
        st.info("This run has no detector suite.")
        return
    st.caption(
        "Each pathology is written into this run's own routing of each layer and judged by the verdict "
        "rules; `none` is the untouched layer, which should stay healthy. Passed: detected at the expected "
        "level (or left healthy)."
    )
    judged = suite[suite["verdict"] != "n/a"]
    st.dataframe(pd.crosstab(judged["expected"], judged["verdict"]), key="ec_confusion")
    shown = suite.copy()
    shown["flag"] = shown["passed"].map(lambda p: "n/a" if pd.isna(p) else ("ok" if bool(p) else "flagged"))
    _table(shown[["layer", "pathology", "expected", "verdict", "flag", "caught_by", "reason"]], "ec_suite")


def render() -> None:
    st.title("Explanation checks")
    run, store = state.require_run()
    checks = reads.table(run, "explanation_checks")
    knockout = reads.table(run, "knockout_effects")
    suite = reads.table(run, "detector_suite")
    summary = reads.read_json(run, "explanation_checks") or {}
    if checks is None and knockout is None and suite is None:
        _no_checks(run)
        return
    samples = summary.get("samples") or {}
    if samples:
        st.caption(
            f"Sanity checks on {samples.get('sanity', 0)} examples, knockout on {samples.get('knockout', 0)} "
            "(a stratified sample of the run)."
        )
    st.subheader("Ground-truth agreement")
    attribution_agreement(checks, summary)
    source_agreement(checks)
    routing_agreement(checks)
    st.subheader("Sanity checks")
    randomisation(checks, summary)
    faithfulness(checks)
    knockout_section(run, knockout, summary)
    detector_section(suite)


render()

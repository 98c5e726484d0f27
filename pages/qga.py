"""QGA source weights: how much each question token draws on the image (alpha) vs the context (beta).

Layout only: the numbers come from the run's declared ``qga`` output through ``analysis.live``'s
summaries (averages, agreement with the gold answer source, confusion).
"""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from analysis.live import QGA_AGREEMENT_DEFINITION, qga_summary, qga_tokens
from pages import common

SOURCE_COLOURS = {"alpha (image)": "#1f77b4", "beta (context)": "#ff7f0e"}


# -- cached reads ----------------------------------------------------------------------------------------

@st.cache_data(show_spinner="Summarising QGA weights…", max_entries=8)
def _qga(run: str, version: str):
    qga = common.table(run, "qga")
    examples = common.examples(run)
    return qga_tokens(qga), qga_summary(qga, examples)


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.1%}"


def _averages_chart(frame, label: str, title: str) -> go.Figure:
    fig = go.Figure()
    names = frame[label].astype(str).tolist()
    fig.add_bar(x=names, y=frame["mean_alpha"], name="alpha (image)", marker_color=SOURCE_COLOURS["alpha (image)"],
                customdata=frame["questions"], hovertemplate="%{x}<br>mean alpha %{y:.3f}<br>%{customdata} questions")
    fig.add_bar(x=names, y=frame["mean_beta"], name="beta (context)", marker_color=SOURCE_COLOURS["beta (context)"],
                customdata=frame["questions"], hovertemplate="%{x}<br>mean beta %{y:.3f}<br>%{customdata} questions")
    fig.update_layout(barmode="group", title=title, yaxis_title="mean weight over question tokens",
                      yaxis_range=[0, 1], height=380, margin=dict(t=50, b=10, l=10, r=10), legend_orientation="h",
                      legend_y=1.12)
    fig.update_xaxes(tickangle=-40 if len(names) > 6 else 0)
    return fig


def main() -> None:
    st.title("QGA source weights")
    st.caption("Question-guided attention (MoEMoE): for every question token, a weight alpha on the image and "
               "beta on the context (alpha + beta = 1); the joint input is e = alpha·I + beta·C.")
    run, store = common.require_run()
    outputs = store.manifest.get("outputs") or {}
    family = store.manifest.get("family", "unknown")
    if "qga" not in outputs or not store.has("qga"):
        st.info(f"Run **{run}** ({family} family) declares no QGA output: source weights exist only for models "
                "with question-guided attention (the MoEMoE family, e.g. the `moemoe-qa` demo run).",
                icon=":material/info:")
        return
    tokens, summary = _qga(run, common.run_version(run))

    st.subheader("Does the dominant source match where the answer lives?")
    c1, c2, c3 = st.columns(3)
    c1.metric("QGA agreement with answer source", _pct(summary.agreement),
              help=QGA_AGREEMENT_DEFINITION, border=True)
    c2.metric("image questions weighted to the image", _pct(summary.agreement_by_source.get("image", float("nan"))),
              border=True)
    c3.metric("context questions weighted to the context",
              _pct(summary.agreement_by_source.get("context", float("nan"))), border=True)
    st.caption(f"**Definition.** {QGA_AGREEMENT_DEFINITION} Over {summary.agreement_n} single-source questions "
               f"of {len(summary.per_example)}.")
    left, right = st.columns([2, 3])
    with left:
        st.markdown("**Confusion: gold answer source × dominant QGA source** (questions)")
        st.dataframe(summary.confusion, width="stretch")
        st.caption("Questions whose answer is in both sources have no single right side: shown for reference, "
                   "left out of the agreement.")
    with right:
        st.plotly_chart(_averages_chart(summary.by_answer_source, "answer_source", "By answer source"),
                        key="qga_by_source")
    st.plotly_chart(_averages_chart(summary.by_question_type, "question_type", "By question type"),
                    key="qga_by_type")

    st.subheader("One question, token by token")
    per = summary.per_example
    types = sorted(per["question_type"].dropna().astype(str).unique()) if "question_type" in per else []
    f1, f2 = st.columns([1, 3])
    chosen_type = f1.selectbox("Question type", ["all", *types], key="qga_type")
    shown = per if chosen_type == "all" else per[per["question_type"].astype(str) == chosen_type]
    if shown.empty:
        st.info("No question of that type in this run.")
        return
    labels = {int(r.example_index): f"#{int(r.example_index)} · {getattr(r, 'question', '')} "
                                    f"({getattr(r, 'answer_source', '?')}; dominant {r.dominant})"
              for r in shown.itertuples(index=False)}
    wanted = st.query_params.get("example")
    options = list(labels)
    default = options.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in labels else 0
    index = f2.selectbox("Question", options, index=default, format_func=labels.get, key="qga_question")
    row = per[per["example_index"] == index].iloc[0]
    toks = tokens[tokens["example_index"] == index]
    x = [f"{p}: {t}" for p, t in zip(toks["position"], toks["token"])]
    fig = go.Figure()
    fig.add_bar(x=x, y=toks["alpha"], name="alpha (image)", marker_color=SOURCE_COLOURS["alpha (image)"])
    fig.add_bar(x=x, y=toks["beta"], name="beta (context)", marker_color=SOURCE_COLOURS["beta (context)"])
    fig.update_layout(barmode="group", yaxis_range=[0, 1], yaxis_title="weight", height=360,
                      title=f"“{row.get('question', '')}”", margin=dict(t=50, b=10, l=10, r=10),
                      legend_orientation="h")
    st.plotly_chart(fig, key="qga_tokens")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("mean alpha (image)", f"{row['mean_alpha']:.3f}")
    m2.metric("mean beta (context)", f"{row['mean_beta']:.3f}")
    m3.metric("dominant source", row["dominant"])
    m4.metric("gold answer source", str(row.get("answer_source", "?")))
    if "answer" in row:
        st.caption(f"Gold answer: **{row['answer']}** · question type: {row.get('question_type', '?')}")


if __name__ == "__main__":
    main()

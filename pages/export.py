"""Export: a self-contained HTML report of the picked run (model card, headline metrics, verdict table
with reasons, utilization and dynamics figures; plotly.js inlined, so it opens offline), to download or
preview. The same report from a shell: ``python -m analysis.report --run NAME --out report.html``.
"""

from __future__ import annotations

import streamlit as st

from analysis.report import build_report
from pages import reads, state


@st.cache_data(show_spinner="Building the report…", max_entries=8)
def report_html(run: str, version: str, root: str) -> str:
    return build_report(run, root)


def render() -> None:
    st.title("Export report")
    run, store = state.require_run()
    html = report_html(run, reads.run_version(run), str(reads.artifacts_root()))
    st.markdown(
        f"A single HTML file for **{run}**: model card, headline metrics, the per-layer verdict table "
        "with its reasons, and the utilization and dynamics figures. plotly.js is embedded, so it opens "
        "anywhere without a server or internet access."
    )
    left, right = st.columns([1, 3])
    left.download_button(
        "Download the HTML report",
        data=html.encode("utf-8"),
        file_name=f"{run}-report.html",
        mime="text/html",
        icon=":material/download:",
        type="primary",
        key="export_download",
        on_click="ignore",
    )
    right.caption(f"{len(html) / 1e6:.1f} MB. From a shell:")
    right.code(f"python -m analysis.report --run {run} --out {run}-report.html", language="bash")
    if st.toggle("Preview", value=True, key="export_preview"):
        st.iframe(html, height=900)


render()

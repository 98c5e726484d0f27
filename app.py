"""MoEscope: the Streamlit entry point.

`streamlit run app.py` (or `make demo`). Navigation over pages/, the run picker shared by every
page (kept in the URL as ?run=...), and a badge saying whether live runs use a GPU or the CPU.
"""

import streamlit as st

# The icon is an emoji: the browser draws it as an inline SVG (a data: URL). A ":material/..." page icon
# makes the browser fetch the icon from fonts.gstatic.com, which an offline network does not have.
st.set_page_config(page_title="MoEscope", page_icon="🔬", layout="wide")

from pages.state import EXPECTED_ERRORS, render_sidebar, show_failure  # noqa: E402  (after set_page_config)

PAGES = {
    "Run": [
        st.Page("pages/overview.py", title="Overview and health", icon=":material/monitor_heart:", default=True),
        st.Page("pages/routing_explorer.py", title="Routing explorer", icon=":material/route:"),
        st.Page("pages/utilization.py", title="Utilization and collapse", icon=":material/bar_chart:"),
        st.Page("pages/dynamics.py", title="Training dynamics", icon=":material/timeline:"),
    ],
    "Interpret": [
        st.Page("pages/source_weights.py", title="Source weights", icon=":material/balance:"),
        st.Page("pages/attributions.py", title="Attributions", icon=":material/highlight:"),
        st.Page("pages/explanation_checks.py", title="Explanation checks", icon=":material/fact_check:"),
        st.Page("pages/embedding_map.py", title="Embedding map", icon=":material/scatter_plot:"),
        st.Page("pages/playground.py", title="Live playground", icon=":material/science:"),
    ],
    "Share": [
        st.Page("pages/compare.py", title="Compare runs", icon=":material/compare_arrows:"),
        st.Page("pages/export.py", title="Export report", icon=":material/download:"),
    ],
    "Data": [
        st.Page("pages/dataset_browser.py", title="Dataset browser", icon=":material/dataset:"),
    ],
}

navigation = st.navigation(PAGES)
render_sidebar()
try:
    navigation.run()
except EXPECTED_ERRORS as exc:  # a file gone or damaged, a stale run, a refused config: one message, no traceback
    show_failure(f"This page cannot be shown ({navigation.title})", exc)

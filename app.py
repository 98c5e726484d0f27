"""MoEscope: the Streamlit entry point.

`streamlit run app.py` (or `make demo`). Navigation over pages/, the run picker shared by every
page (kept in the URL as ?run=...), and a badge saying whether live runs use a GPU or the CPU.
"""
import streamlit as st

st.set_page_config(page_title="MoEscope", page_icon=":material/hub:", layout="wide")

from pages.state import render_sidebar  # noqa: E402  (after set_page_config, as Streamlit requires)

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
navigation.run()

"""MoEscope: the Streamlit entry point.

`streamlit run app.py` (or `make demo`). Navigation over pages/, the run picker shared by every
page (kept in the URL as ?run=...), and a badge saying whether live runs use a GPU or the CPU.
"""
import streamlit as st

st.set_page_config(page_title="MoEscope", page_icon=":material/hub:", layout="wide")

from pages.common import render_sidebar  # noqa: E402  (after set_page_config, as Streamlit requires)

PAGES = {
    "Data": [
        st.Page("pages/dataset_browser.py", title="Dataset browser", icon=":material/dataset:", default=True),
    ],
}

navigation = st.navigation(PAGES)
render_sidebar()
navigation.run()

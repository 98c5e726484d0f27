"""MoEscope served: ``streamlit run serve.py`` (``make serve``, ``make demo``).

The app itself is ``app.py``; this entry point wraps it in Streamlit's ``st.App`` so that a lifespan hook
imports the pages' modules before the server accepts its first connection (:mod:`pages.warmup`): the
first visitor of a fresh server sees a page as fast as every later one. ``streamlit run app.py`` still
works, with that first page slower.
"""

import contextlib
import sys

import streamlit as st


@contextlib.asynccontextmanager
async def _warm(_app):
    from streamlit.runtime.pages_manager import PagesManager

    from pages.warmup import warm_up

    # app.py navigates with st.navigation; Streamlit would otherwise switch a server with a pages/ folder
    # into its old multipage mode at the first visit (pages.state undoes that, but only when it is
    # imported inside that visit's script run, and here it is imported before any visit)
    PagesManager.uses_pages_directory = False
    seconds = warm_up()
    print(f"MoEscope: {len(seconds)} page modules imported in {sum(seconds.values()):.1f} s", file=sys.stderr)
    yield


app = st.App("app.py", lifespan=_warm)

"""Widgets shared by every page: the run picker (kept in the URL) and the device badge.

Pages only lay out widgets and figures; everything they show comes from `analysis` (cached
artifacts) or a small live-run function. This module is the one place that caches those reads.
"""
from __future__ import annotations

import streamlit as st

RUN_PARAM = "run"


@st.cache_resource
def device_label() -> str:
    import torch
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return "CPU (no GPU found)"


def render_sidebar() -> None:
    with st.sidebar:
        st.markdown("### MoEscope")
        label = device_label()
        st.badge(label, icon=":material/memory:", color="green" if label.startswith("GPU") else "gray")

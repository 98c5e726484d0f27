"""Declared outputs and attributions: source weights over named sources, patch attributions on a grid."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.figures.base import (
    _layout,
    empty_figure,
    layer_colour,
)


def _source_colour(source, i: int) -> str:
    return getattr(source, "colour", "") or layer_colour(i)


def source_weight_bars(
    frame: pd.DataFrame, x: str, sources: Sequence, title: str, count: str = "examples", height: int = 380
) -> go.Figure:
    """Grouped bars of mean source weights: one group per value of column ``x``, one bar per declared
    source (:class:`mmoe_core.spec.SourceSpec`: its label and colour); ``frame`` holds ``mean_<source>``
    columns (see :func:`analysis.source_weights.by_label`) and ``count``."""
    if frame is None or frame.empty:
        return empty_figure(title, "no examples")
    names = frame[x].astype(str).tolist()
    fig = go.Figure()
    for i, source in enumerate(sources):
        fig.add_bar(
            x=names,
            y=frame[f"mean_{source.name}"],
            name=source.label,
            marker_color=_source_colour(source, i),
            customdata=frame[count] if count in frame else None,
            hovertemplate="%{x}<br>mean "
            + html.escape(source.label)
            + " %{y:.3f}"
            + (f"<br>%{{customdata}} {count}" if count in frame else "")
            + "<extra></extra>",
        )
    fig.update_yaxes(range=[0, 1], title_text="mean weight over positions")
    fig.update_xaxes(tickangle=-40 if len(names) > 6 else 0)
    return _layout(fig, title, height=height, barmode="group", legend_below=True)


def source_weight_positions(weights: pd.DataFrame, sources: Sequence, title: str, height: int = 360) -> go.Figure:
    """One example's weight on every declared source at each position (``position``, ``token`` and one
    column per source name, as :func:`analysis.source_weights.long_weights` gives)."""
    if weights is None or weights.empty:
        return empty_figure(title, "no positions")
    x = [f"{int(p)}: {t}" for p, t in zip(weights["position"], weights["token"])]
    fig = go.Figure()
    for i, source in enumerate(sources):
        fig.add_bar(
            x=x,
            y=weights[source.name],
            name=source.label,
            marker_color=_source_colour(source, i),
            hovertemplate="%{x}: %{y:.3f}<extra>" + html.escape(source.label) + "</extra>",
        )
    fig.update_yaxes(range=[0, 1], title_text="weight")
    return _layout(fig, title, height=height, barmode="group", legend_below=True)


# ------------------------------------------------------------------------------------ attributions

MAX_PICTURE_SIDE = 256  # a chart embeds at most this many pixels a side (its JSON grows with every pixel)


def attribution_patches(picture: np.ndarray | None, grid: np.ndarray, title: str = "") -> go.Figure:
    """An image input's patch attributions on its grid (``grid``: [rows, cols], NaN where no value), over
    the picture (an RGB array) when there is one; diverging colours, 0 is clear. A picture larger than
    :data:`MAX_PICTURE_SIDE` a side is subsampled first (a 5000 x 5000 picture made the chart's JSON too
    long for the browser: "RangeError: Invalid string length"); pass a thumbnail to keep it sharp."""
    n_rows, n_cols = grid.shape
    fig = go.Figure()
    if picture is not None:
        step = -(-max(picture.shape[:2]) // MAX_PICTURE_SIDE)
        if step > 1:
            picture = picture[::step, ::step]
        h, w = picture.shape[:2]
        fig.add_trace(go.Image(z=picture, hoverinfo="skip"))
    else:
        h, w = n_rows * 8, n_cols * 8
    dy, dx = h / n_rows, w / n_cols
    scale = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    text = [[f"patch row {r}, column {c}: {grid[r, c]:+.4f}" for c in range(n_cols)] for r in range(n_rows)]
    fig.add_trace(
        go.Heatmap(
            z=grid,
            x0=dx / 2,
            dx=dx,
            y0=dy / 2,
            dy=dy,
            colorscale="RdBu_r",
            zmid=0,
            zmin=-scale or -1,
            zmax=scale or 1,
            opacity=0.55,
            text=text,
            hoverinfo="text",
            colorbar=dict(title="attr.", thickness=12),
        )
    )
    shapes = [
        dict(type="line", x0=0, x1=w, y0=r * dy, y1=r * dy, line=dict(color="white", width=0.5))
        for r in range(1, n_rows)
    ]
    shapes += [
        dict(type="line", y0=0, y1=h, x0=c * dx, x1=c * dx, line=dict(color="white", width=0.5))
        for c in range(1, n_cols)
    ]
    fig.update_layout(shapes=shapes)
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0], scaleanchor="x")
    return _layout(fig, title, height=380, margin=dict(t=40 if title else 10, b=10, l=10, r=10))

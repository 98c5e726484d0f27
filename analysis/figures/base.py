"""Palettes, layout and the small helpers every figure module shares (no figure of its own but the empty one)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go

# One categorical palette for experts everywhere (tab10 without its grey, then tab20b/c darks): no grey,
# so that grey can only mean "not routed".
EXPERT_PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
    "#e6550d",
)
NOT_ROUTED_COLOUR = "#cfcfcf"
NOT_ROUTED_LABEL = "not routed"
# Layers (lines in the dynamics page): a palette that shares no colour with the expert palette.
LAYER_PALETTE: tuple[str, ...] = (
    "#1b9e77",
    "#d95f02",
    "#7570b3",
    "#e7298a",
    "#66a61e",
    "#e6ab02",
    "#a6761d",
    "#666666",
)
VERDICT_COLOURS: dict[str, str] = {"healthy": "#1a7f37", "warning": "#b35900", "collapsed": "#c62828"}
VERDICT_BACKGROUNDS: dict[str, str] = {"healthy": "#dcf5e3", "warning": "#fff0d6", "collapsed": "#fde0e0"}

FONT = dict(size=13)


def expert_colour(i: int) -> str:
    """The colour of expert ``i`` (cycles after :data:`EXPERT_PALETTE` runs out)."""
    return EXPERT_PALETTE[int(i) % len(EXPERT_PALETTE)]


def expert_colours(num_experts: int) -> list[str]:
    return [expert_colour(i) for i in range(int(num_experts))]


def layer_colour(i: int) -> str:
    return LAYER_PALETTE[int(i) % len(LAYER_PALETTE)]


def verdict_css(verdict: object) -> str:
    """CSS for a verdict cell (pandas Styler.map / the report's table)."""
    v = str(verdict)
    if v not in VERDICT_COLOURS:
        return ""
    return f"color: {VERDICT_COLOURS[v]}; background-color: {VERDICT_BACKGROUNDS[v]}; font-weight: 600"


# Legends go under the plot (container coordinates), clear of subplot titles and of the mode bar.
LEGEND_BELOW = dict(
    orientation="h", yref="container", y=0.0, yanchor="bottom", x=0.0, xanchor="left", traceorder="normal"
)
_BELOW_MARGIN = 90  # px under the plot: tick labels, axis title, then the legend


def _layout(
    fig: go.Figure, title: str, height: int, legend_below: bool = False, below: int = _BELOW_MARGIN, **kw
) -> go.Figure:
    margin = kw.pop("margin", dict(t=60, b=40, l=50, r=20))
    if legend_below:
        kw["legend"] = LEGEND_BELOW
        margin = {**margin, "b": max(margin.get("b", 0), below)}
        height += below - 40
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left", font=dict(size=15)),
        height=height,
        font=FONT,
        margin=margin,
        template="plotly_white",
        **kw,
    )
    return fig


def in_layer_order(frame: pd.DataFrame | None, layers: Sequence[str]) -> pd.DataFrame | None:
    """``frame`` with its rows ordered by ``layers`` (e.g. the run's declared layer order; layers not named
    go last), stable within a layer, so every figure lists layers in the same order."""
    if frame is None or frame.empty or "layer" not in frame:
        return frame
    rank = {name: i for i, name in enumerate(layers)}
    key = frame["layer"].map(lambda name: rank.get(name, len(rank)))
    return frame.assign(_order=key.to_numpy()).sort_values("_order", kind="stable").drop(columns="_order")


def empty_figure(title: str, message: str, height: int = 220) -> go.Figure:
    """A figure that says why there is nothing to plot (instead of blank axes)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height)


def _legend_swatches(fig: go.Figure, num_experts: int, not_routed: bool, used: Iterable[int] | None = None) -> None:
    """Legend entries (square markers) for the experts and for "not routed"."""
    used_set = set(range(num_experts)) if used is None else set(int(u) for u in used)
    for i in range(num_experts):
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"expert {i}",
                marker=dict(symbol="square", size=13, color=expert_colour(i)),
                showlegend=True,
                hoverinfo="skip",
                visible=True if i in used_set else "legendonly",
            )
        )
    if not_routed:
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=NOT_ROUTED_LABEL,
                marker=dict(symbol="square", size=13, color=NOT_ROUTED_COLOUR, line=dict(color="#888", width=1)),
                showlegend=True,
                hoverinfo="skip",
            )
        )


def _axis_ref(axis: str, index: int) -> str:
    """Axis name of subplot ``index`` (0-based, row-major) in a make_subplots grid: x, x2, x3..."""
    return axis if index == 0 else f"{axis}{index + 1}"


def _line_shape(index: int, *, x: float | None = None, y: float | None = None, **line) -> dict:
    """A full-width horizontal (``y``) or full-height vertical (``x``) line in subplot ``index``; much
    cheaper than ``add_hline``/``add_vline`` (which re-derive the subplot grid on every call)."""
    xr, yr = _axis_ref("x", index), _axis_ref("y", index)
    if y is not None:
        return dict(type="line", xref=f"{xr} domain", yref=yr, x0=0, x1=1, y0=y, y1=y, line=line, layer="above")
    return dict(type="line", xref=xr, yref=f"{yr} domain", x0=x, x1=x, y0=0, y1=1, line=line, layer="above")


def _discrete_scale(num_experts: int) -> list[list]:
    """A stepped colourscale over codes 0..E-1 (experts) and E (not routed)."""
    colours = expert_colours(num_experts) + [NOT_ROUTED_COLOUR]
    n = len(colours)
    scale = []
    for i, c in enumerate(colours):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    c = max(1, min(cols, n))
    return math.ceil(n / c), c

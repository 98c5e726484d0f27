"""Utilization and collapse: loads, entropy, co-selection, specialisation, headline metrics by label."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.figures.base import (
    _axis_ref,
    _grid,
    _layout,
    _line_shape,
    empty_figure,
    expert_colour,
    layer_colour,
)


def load_bars(loads: pd.DataFrame, title: str = "Load per expert, per layer") -> go.Figure:
    """Per layer: each expert's share of the top-k slots (solid) and of the combine weight (hatched);
    the dashed line is the balanced share 1/E. ``loads``: layer, expert, slot_fraction, weight_fraction."""
    if loads is None or loads.empty:
        return empty_figure(title, "no routing loads in this run")
    layers = list(dict.fromkeys(loads["layer"]))
    nr, nc = _grid(len(layers))
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=layers, horizontal_spacing=0.06, vertical_spacing=0.16)
    shapes: list[dict] = []
    for i, layer in enumerate(layers):
        part = loads[loads["layer"] == layer].sort_values("expert")
        E = int(part["expert"].max()) + 1
        r, c = divmod(i, nc)
        names = [f"E{int(e)}" for e in part["expert"]]
        colours = [expert_colour(e) for e in part["expert"]]
        fig.add_trace(
            go.Bar(
                x=names,
                y=part["slot_fraction"].fillna(0),
                marker_color=colours,
                name="slot share",
                legendgroup="slots",
                showlegend=False,
                offsetgroup="slots",
                customdata=np.stack([part["slots"]], axis=-1) if "slots" in part else None,
                hovertemplate="%{x}: %{y:.1%} of top-k slots"
                + (" (%{customdata[0]} slots)" if "slots" in part else "")
                + "<extra>"
                + html.escape(layer)
                + "</extra>",
            ),
            row=r + 1,
            col=c + 1,
        )
        fig.add_trace(
            go.Bar(
                x=names,
                y=part["weight_fraction"].fillna(0),
                marker=dict(color=colours, pattern=dict(shape="/", fgcolor="white", solidity=0.35)),
                name="combine-weight share",
                legendgroup="weight",
                showlegend=False,
                offsetgroup="weight",
                hovertemplate="%{x}: %{y:.1%} of combine weight<extra>" + html.escape(layer) + "</extra>",
            ),
            row=r + 1,
            col=c + 1,
        )
        shapes.append(_line_shape(i, y=1.0 / E, dash="dash", color="#555", width=1))
        fig.layout[_axis_ref("yaxis", i)].update(tickformat=".0%", rangemode="tozero")
    for name, pattern in (("top-k slot share", ""), ("combine-weight share", "/")):
        fig.add_trace(
            go.Bar(
                x=[None],
                y=[None],
                name=name,
                showlegend=True,
                marker=dict(color="#999", pattern=dict(shape=pattern, fgcolor="white")),
            )
        )
    fig.add_trace(
        go.Scatter(x=[None], y=[None], mode="lines", name="balanced share 1/E", line=dict(dash="dash", color="#555"))
    )
    fig.update_layout(shapes=shapes)
    return _layout(fig, title, height=300 * nr + 60, barmode="group", legend_below=True)


def load_heatmap(
    loads: pd.DataFrame, value: str = "slot_fraction", title: str = "Share of top-k slots: layers \u00d7 experts"
) -> go.Figure:
    """Layers (rows) x experts (columns), cell = share of the layer's slots (or combine weight)."""
    if loads is None or loads.empty:
        return empty_figure(title, "no routing loads in this run")
    pivot = loads.pivot_table(index="layer", columns="expert", values=value, aggfunc="sum", sort=False).fillna(0)
    layers = list(dict.fromkeys(loads["layer"]))
    pivot = pivot.reindex(layers)
    experts = [int(e) for e in pivot.columns]
    text = [[f"{v:.0%}" for v in row] for row in pivot.to_numpy()]
    what = "slots" if value == "slot_fraction" else "combine weight"
    fig = go.Figure(
        go.Heatmap(
            z=pivot.to_numpy(),
            x=[f"expert {e}" for e in experts],
            y=layers,
            text=text,
            texttemplate="%{text}",
            colorscale="Blues",
            zmin=0,
            zmax=max(1e-9, pivot.to_numpy().max()),
            colorbar=dict(title=dict(text="share"), tickformat=".0%"),
            hovertemplate="%{y} \u00b7 %{x}: %{z:.1%} of " + what + "<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    for i, e in enumerate(experts):  # a colour chip per expert column, same palette as everywhere
        fig.add_shape(
            type="rect",
            xref="x",
            yref="paper",
            x0=i - 0.45,
            x1=i + 0.45,
            y0=1.01,
            y1=1.05,
            fillcolor=expert_colour(e),
            line=dict(width=0),
        )
    return _layout(fig, title, height=120 + 48 * len(layers), margin=dict(t=70, b=40, l=130, r=20))


def entropy_histograms(
    values: Mapping[str, np.ndarray],
    num_experts: Mapping[str, int],
    title: str = "Token entropy of the router, per layer",
) -> go.Figure:
    """Histogram of per-position router entropy (nats) per layer; the dashed line is log E (uniform
    routing), 0 is a one-hot router."""
    layers = [name for name in values if len(values[name])]
    if not layers:
        return empty_figure(title, "no entropy values in this run")
    nr, nc = _grid(len(layers))
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=layers, horizontal_spacing=0.06, vertical_spacing=0.18)
    shapes: list[dict] = []
    for i, layer in enumerate(layers):
        r, c = divmod(i, nc)
        E = int(num_experts.get(layer, 0) or 0)
        hi = math.log(E) if E > 1 else float(np.max(values[layer]) or 1.0)
        fig.add_trace(
            go.Histogram(
                x=values[layer],
                xbins=dict(start=0, end=hi * 1.0001, size=hi / 30),
                marker_color=layer_colour(i),
                showlegend=False,
                hovertemplate="entropy %{x}<br>%{y} positions<extra>" + html.escape(layer) + "</extra>",
            ),
            row=r + 1,
            col=c + 1,
        )
        if E > 1:
            shapes.append(_line_shape(i, x=hi, dash="dash", color="#555", width=1))
        fig.layout[_axis_ref("xaxis", i)].update(title_text="entropy (nats)", range=[0, hi * 1.05])
        if c == 0:
            fig.layout[_axis_ref("yaxis", i)].update(title_text="positions")
    fig.add_trace(
        go.Scatter(
            x=[None], y=[None], mode="lines", name="log E (uniform router)", line=dict(dash="dash", color="#555")
        )
    )
    fig.update_layout(shapes=shapes)
    return _layout(fig, title, height=290 * nr + 60, legend_below=True)


def coselection_heatmap(cosel: pd.DataFrame, layer: str, title: str | None = None) -> go.Figure:
    """E x E counts of experts chosen for the same position (diagonal: times chosen) in one layer."""
    title = title or f"Co-selection in {layer}: experts chosen together for one position"
    part = cosel[cosel["layer"] == layer] if cosel is not None and not cosel.empty else None
    if part is None or part.empty:
        return empty_figure(title, "no co-selection counts for this layer")
    m = part.pivot_table(index="expert_a", columns="expert_b", values="count", aggfunc="sum").fillna(0)
    names = [f"expert {int(e)}" for e in m.columns]
    rows = [f"expert {int(e)}" for e in m.index]
    fig = go.Figure(
        go.Heatmap(
            z=m.to_numpy(),
            x=names,
            y=rows,
            text=m.to_numpy().astype(int),
            texttemplate="%{text}",
            colorscale="Purples",
            colorbar=dict(title=dict(text="count")),
            hovertemplate="%{y} with %{x}: %{z} positions<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    E = len(names)
    for i in range(E):
        fig.add_shape(
            type="rect",
            xref="x",
            yref="paper",
            x0=i - 0.45,
            x1=i + 0.45,
            y0=1.01,
            y1=1.05,
            fillcolor=expert_colour(int(m.columns[i])),
            line=dict(width=0),
        )
    return _layout(fig, title, height=380, margin=dict(t=75, b=40, l=80, r=20))


def specialisation_bars(
    spec: pd.DataFrame, title: str = "Specialisation: MI(top-1 expert; label) vs shuffled labels"
) -> go.Figure:
    """Per layer and label: mutual information (nats) between the chosen expert and the label, beside the
    largest MI reached with shuffled labels (chance level). Bars above their marker are real."""
    if spec is None or spec.empty:
        return empty_figure(title, "no specialisation table in this run")
    layers = list(dict.fromkeys(spec["layer"]))
    nr, nc = _grid(len(layers))
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=layers, horizontal_spacing=0.06, vertical_spacing=0.22)
    for i, layer in enumerate(layers):
        part = spec[spec["layer"] == layer]
        r, c = divmod(i, nc)
        above = part.get("above_shuffled", pd.Series([True] * len(part), index=part.index)).fillna(False)
        fig.add_trace(
            go.Bar(
                x=part["label"],
                y=part["mi"],
                name="MI",
                showlegend=False,
                legendgroup="mi",
                marker_color=["#4c72b0" if a else "#b0b7c3" for a in above],
                hovertemplate="%{x}: MI %{y:.4f} nats<extra>" + html.escape(layer) + "</extra>",
            ),
            row=r + 1,
            col=c + 1,
        )
        if "shuffled_max" in part:
            fig.add_trace(
                go.Scatter(
                    x=part["label"],
                    y=part["shuffled_max"],
                    mode="markers",
                    showlegend=False,
                    marker=dict(symbol="line-ew-open", size=26, color="#c62828", line=dict(width=3)),
                    hovertemplate="%{x}: shuffled max %{y:.4f}<extra></extra>",
                ),
                row=r + 1,
                col=c + 1,
            )
        fig.layout[_axis_ref("yaxis", i)].update(title_text="MI (nats)" if c == 0 else None, rangemode="tozero")
        fig.layout[_axis_ref("xaxis", i)].update(tickangle=-30)
    fig.add_trace(go.Bar(x=[None], y=[None], name="MI above chance", marker_color="#4c72b0"))
    fig.add_trace(go.Bar(x=[None], y=[None], name="MI within chance", marker_color="#b0b7c3"))
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            name="max MI, shuffled labels",
            marker=dict(symbol="line-ew-open", size=18, color="#c62828", line=dict(width=3)),
        )
    )
    return _layout(fig, title, height=320 * nr + 60, legend_below=True)


def headline_bars(
    by_label: Mapping[str, Mapping[str, float]], measures: Sequence[str], title: str, percent: bool = True
) -> go.Figure:
    """Grouped bars: one group per value of a label, one bar per measure."""
    values = [v for v in by_label if isinstance(by_label[v], Mapping)]
    measures = [m for m in measures if any(m in by_label[v] for v in values)]
    if not values or not measures:
        return empty_figure(title, "no metrics by label")
    fig = go.Figure()
    for i, m in enumerate(measures):
        ys = [by_label[v].get(m) for v in values]
        fig.add_trace(
            go.Bar(
                x=[str(v) for v in values],
                y=ys,
                name=m,
                marker_color=layer_colour(i),
                text=[("" if y is None else (f"{y:.0%}" if percent else f"{y:.3g}")) for y in ys],
                textposition="outside",
                hovertemplate="%{x}: %{y:.3f}<extra>" + html.escape(m) + "</extra>",
            )
        )
    if percent:
        fig.update_yaxes(tickformat=".0%", range=[0, 1.12])
    return _layout(fig, title, height=340, barmode="group", legend_below=True)

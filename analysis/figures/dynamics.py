"""Training dynamics: indicators and loads over snapshots, the training log, schedule markers."""

from __future__ import annotations

import html
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

DYNAMICS_INDICATORS: dict[str, str] = {
    "effective_experts": "effective experts exp(H(P))",
    "token_entropy": "mean token entropy (nats)",
    "max_load_ratio": "max-load ratio (busiest expert / fair share)",
    "switch_balance_loss": "switch balance loss",
}


TRIGGER_LINE = dict(dash="dot", color="#c62828", width=2)
PHASE_LINE = dict(dash="dash", color="#777", width=1)


def _markers(trigger_step: int | None, phases: Sequence[tuple[int, str]]) -> list[tuple[int, str, dict]]:
    """(step, label, line style) of every vertical marker: the entropy trigger, then schedule phases."""
    out = [] if trigger_step is None else [(int(trigger_step), "entropy trigger", TRIGGER_LINE)]
    return out + [(int(step), label, PHASE_LINE) for step, label in phases]


def _mark_steps(fig: go.Figure, trigger_step: int | None, phases: Sequence[tuple[int, str]], panels: int) -> None:
    markers = _markers(trigger_step, phases)
    if not markers:
        return
    fig.update_layout(
        shapes=list(fig.layout.shapes or ())
        + [_line_shape(i, x=step, **line) for step, _, line in markers for i in range(panels)]
    )
    for step, label, line in markers:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{label} (step {step})", line=line))


def dynamics_lines(
    dyn: pd.DataFrame,
    trigger_step: int | None = None,
    indicators: Mapping[str, str] = DYNAMICS_INDICATORS,
    title: str = "Routing indicators over training snapshots",
    phases: Sequence[tuple[int, str]] = (),
) -> go.Figure:
    """One panel per indicator, one line per layer, x = training step; a dotted line marks the step
    the entropy-triggered two-stage schedule switched (when the run has one), dashed lines the
    training schedule's ``phases`` ((step, what starts there), :func:`analysis.report.training_phases`)."""
    if dyn is None or dyn.empty:
        return empty_figure(title, "this run has no training snapshots")
    names = [k for k in indicators if k in dyn]
    nr, nc = _grid(len(names), 2)
    fig = make_subplots(
        rows=nr, cols=nc, subplot_titles=[indicators[k] for k in names], horizontal_spacing=0.08, vertical_spacing=0.16
    )
    layers = list(dict.fromkeys(dyn["layer"]))
    for j, name in enumerate(names):
        r, c = divmod(j, nc)
        for i, layer in enumerate(layers):
            part = dyn[dyn["layer"] == layer].sort_values("step")
            fig.add_trace(
                go.Scatter(
                    x=part["step"],
                    y=part[name],
                    mode="lines+markers",
                    name=layer,
                    legendgroup=layer,
                    showlegend=j == 0,
                    line=dict(color=layer_colour(i), width=2),
                    hovertemplate="step %{x}: %{y:.3f}<extra>" + html.escape(layer) + "</extra>",
                ),
                row=r + 1,
                col=c + 1,
            )
        fig.layout[_axis_ref("xaxis", j)].update(title_text="step")
    _mark_steps(fig, trigger_step, phases, len(names))
    return _layout(fig, title, height=300 * nr + 80, legend_below=True)


def dynamics_load_area(
    dyn: pd.DataFrame, layer: str, trigger_step: int | None = None, phases: Sequence[tuple[int, str]] = ()
) -> go.Figure:
    """Stacked share of top-k slots per expert over training snapshots, for one layer."""
    title = f"Expert load over training in {layer}"
    part = dyn[dyn["layer"] == layer].sort_values("step") if dyn is not None and "load" in dyn else None
    if part is None or part.empty:
        return empty_figure(title, "no per-expert load over snapshots")
    loads = np.stack([np.asarray(v, dtype=float) for v in part["load"]])
    loads = loads / np.clip(loads.sum(axis=1, keepdims=True), 1e-12, None)
    fig = go.Figure()
    for e in range(loads.shape[1]):
        fig.add_trace(
            go.Scatter(
                x=part["step"],
                y=loads[:, e],
                mode="lines",
                stackgroup="load",
                name=f"expert {e}",
                line=dict(color=expert_colour(e), width=0.5),
                fillcolor=expert_colour(e),
                hovertemplate="step %{x}: %{y:.1%}<extra>expert " + str(e) + "</extra>",
            )
        )
    markers = _markers(trigger_step, phases)
    fig.update_layout(shapes=[_line_shape(0, x=step, **line) for step, _, line in markers])
    for step, label, _ in markers:
        fig.add_annotation(x=step, y=1, yref="paper", text=label, showarrow=False, xanchor="left", yanchor="bottom")
    fig.update_yaxes(tickformat=".0%", range=[0, 1], title_text="share of slots")
    fig.update_xaxes(title_text="step")
    return _layout(fig, title, height=340)


def train_log_lines(
    log: pd.DataFrame,
    columns: Sequence[str],
    trigger_step: int | None = None,
    title: str = "Training log",
    phases: Sequence[tuple[int, str]] = (),
) -> go.Figure:
    """Chosen train_log columns against the step, one panel each."""
    columns = [c for c in columns if c in log]
    if log is None or log.empty or not columns:
        return empty_figure(title, "nothing to plot")
    nr, nc = _grid(len(columns), 2)
    fig = make_subplots(
        rows=nr,
        cols=nc,
        subplot_titles=list(columns),
        horizontal_spacing=0.08,
        vertical_spacing=0.16 if nr > 1 else 0.1,
    )
    for j, col in enumerate(columns):
        r, c = divmod(j, nc)
        part = log[["step", col]].dropna()
        fig.add_trace(
            go.Scatter(
                x=part["step"],
                y=part[col],
                mode="lines",
                name=col,
                showlegend=False,
                line=dict(color=layer_colour(j), width=2),
                hovertemplate="step %{x}: %{y:.4g}<extra>" + html.escape(col) + "</extra>",
            ),
            row=r + 1,
            col=c + 1,
        )
        fig.layout[_axis_ref("xaxis", j)].update(title_text="step")
    _mark_steps(fig, trigger_step, phases, len(columns))
    return _layout(fig, title, height=280 * nr + 80, legend_below=True)

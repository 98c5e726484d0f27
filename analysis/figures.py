"""Plotly figure builders shared by the pages and the static report.

Pure functions from DataFrames (as the store returns them) to ``plotly.graph_objects.Figure``: no
Streamlit, no file I/O, no metric math beyond arranging numbers for display. Every figure that shows
experts colours them with one categorical palette (:data:`EXPERT_PALETTE`, via :func:`expert_colour`),
so expert 2 has the same colour on every page and in the report; positions whose combine weights are
all zero ("not routed": the layer gave them no expert output) are drawn in :data:`NOT_ROUTED_COLOUR`.
Layers (not experts) get their own palette (:data:`LAYER_PALETTE`) so the two are never confused.
"""
from __future__ import annotations

import html
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "EXPERT_PALETTE", "LAYER_PALETTE", "NOT_ROUTED_COLOUR", "NOT_ROUTED_LABEL", "VERDICT_COLOURS",
    "expert_colour", "expert_colours", "layer_colour", "verdict_css", "format_ids", "format_weights",
    "routing_table", "token_strip", "patch_grid", "patch_cells", "split_call_rows", "kind_words",
    "source_weight_bars", "source_weight_positions", "attribution_patches", "load_bars", "load_heatmap",
    "entropy_histograms", "coselection_heatmap", "specialisation_bars", "dynamics_lines", "dynamics_load_area",
    "train_log_lines", "headline_bars", "DYNAMICS_INDICATORS", "empty_figure", "in_layer_order",
]

# One categorical palette for experts everywhere (tab10 without its grey, then tab20b/c darks): no grey,
# so that grey can only mean "not routed".
EXPERT_PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
)
NOT_ROUTED_COLOUR = "#cfcfcf"
NOT_ROUTED_LABEL = "not routed"
# Layers (lines in the dynamics page): a palette that shares no colour with the expert palette.
LAYER_PALETTE: tuple[str, ...] = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
                                  "#a6761d", "#666666")
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
LEGEND_BELOW = dict(orientation="h", yref="container", y=0.0, yanchor="bottom", x=0.0, xanchor="left",
                    traceorder="normal")
_BELOW_MARGIN = 90  # px under the plot: tick labels, axis title, then the legend


def _layout(fig: go.Figure, title: str, height: int, legend_below: bool = False, below: int = _BELOW_MARGIN,
            **kw) -> go.Figure:
    margin = kw.pop("margin", dict(t=60, b=40, l=50, r=20))
    if legend_below:
        kw["legend"] = LEGEND_BELOW
        margin = {**margin, "b": max(margin.get("b", 0), below)}
        height += below - 40
    fig.update_layout(title=dict(text=title, x=0.0, xanchor="left", font=dict(size=15)), height=height,
                      font=FONT, margin=margin, template="plotly_white", **kw)
    return fig


def in_layer_order(frame: pd.DataFrame | None, layers: Sequence[str]) -> pd.DataFrame | None:
    """``frame`` with its rows ordered by ``layers`` (e.g. the run's declared layer order; layers not named
    go last), stable within a layer, so every figure lists layers in the same order."""
    if frame is None or frame.empty or "layer" not in frame:
        return frame
    rank = {name: i for i, name in enumerate(layers)}
    key = frame["layer"].map(lambda l: rank.get(l, len(rank)))
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
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"expert {i}",
                                 marker=dict(symbol="square", size=13, color=expert_colour(i)),
                                 showlegend=True, hoverinfo="skip", visible=True if i in used_set else "legendonly"))
    if not_routed:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=NOT_ROUTED_LABEL,
                                 marker=dict(symbol="square", size=13, color=NOT_ROUTED_COLOUR,
                                             line=dict(color="#888", width=1)), showlegend=True, hoverinfo="skip"))


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


# ------------------------------------------------------------------------------------ routing of one example

def format_ids(ids: object) -> str:
    if ids is None or (isinstance(ids, float) and math.isnan(ids)):
        return ""
    return ", ".join(str(int(i)) for i in list(ids))


def format_weights(weights: object, digits: int = 3) -> str:
    if weights is None or (isinstance(weights, float) and math.isnan(weights)):
        return ""
    return ", ".join(f"{float(w):.{digits}f}" for w in list(weights))


def _num_experts(rows: pd.DataFrame, num_experts: int | None) -> int:
    if num_experts:
        return int(num_experts)
    for col in ("combine", "logits"):
        if col in rows and len(rows):
            return len(rows[col].iloc[0])
    return int(rows["top1"].max()) + 1 if "top1" in rows and len(rows) else 1


def _routed(rows: pd.DataFrame) -> np.ndarray:
    if "routed" in rows:
        return rows["routed"].fillna(False).to_numpy(dtype=bool)
    if "combine" in rows:
        return np.array([float(np.sum(c)) > 0 for c in rows["combine"]], dtype=bool)
    return np.ones(len(rows), dtype=bool)


def _token_label(row) -> str:
    tok = row.get("token") if hasattr(row, "get") else None
    if tok is None or (isinstance(tok, float) and math.isnan(tok)) or str(tok) == "":
        return f"#{int(row['position'])}"
    return str(tok)


def _hover(row, routed: bool, k_label: str) -> str:
    tok = html.escape(_token_label(row))
    lines = [f"<b>{tok}</b> (position {int(row['position'])}, {html.escape(str(row.get('position_kind', '')))})"]
    top1 = row.get("top1")
    if routed:
        lines.append(f"top-1 expert: <b>{int(top1)}</b>")
    else:
        lines.append(f"<b>{NOT_ROUTED_LABEL}</b>: combine weights all zero, no expert output "
                     f"(router's top-1 would be expert {int(top1)})")
    if "topk_ids" in row and row["topk_ids"] is not None:
        lines.append(f"{k_label} ids: [{format_ids(row['topk_ids'])}]")
    if "topk_weights" in row and row["topk_weights"] is not None:
        lines.append(f"{k_label} weights: [{format_weights(row['topk_weights'])}]")
    if "combine" in row and row["combine"] is not None:
        comb = ", ".join(f"e{i} {float(w):.3f}" for i, w in enumerate(row["combine"]))
        lines.append(f"gate weights (combine): {comb}")
    if "entropy" in row and row["entropy"] is not None and not pd.isna(row["entropy"]):
        lines.append(f"token entropy: {float(row['entropy']):.3f} nats")
    if "top1_prob" in row and row["top1_prob"] is not None and not pd.isna(row["top1_prob"]):
        lines.append(f"top-1 probability: {float(row['top1_prob']):.3f}")
    mods = [str(row.get(c)) for c in ("routed_modality", "gate_modality") if row.get(c) is not None]
    if len(mods) == 2:
        lines.append(f"routed {html.escape(mods[0])}, gate sees {html.escape(mods[1])}")
    return "<br>".join(lines)


def _short(label: str, n: int = 10) -> str:
    label = label.replace("\u0120", "").strip() or label
    return html.escape(label if len(label) <= n else label[: n - 1] + "\u2026")


def _k_label(rows: pd.DataFrame) -> str:
    if "topk_ids" in rows and len(rows):
        return f"top-{len(rows['topk_ids'].iloc[0])}"
    return "top-k"


def token_strip(rows: pd.DataFrame, title: str, num_experts: int | None = None, wrap: int = 12) -> go.Figure:
    """Positions of one layer call as a wrapped strip of cells coloured by top-1 expert (grey: not routed);
    hover gives the combine weights, top-k ids and weights, and token entropy."""
    if rows is None or rows.empty:
        return empty_figure(title, "no routed positions")
    rows = rows.sort_values("position").reset_index(drop=True)
    E = _num_experts(rows, num_experts)
    routed = _routed(rows)
    n = len(rows)
    width = max(1, int(wrap))  # a fixed cell width: a short call fills part of one row
    nrows = math.ceil(n / width)
    z = np.full((nrows, width), np.nan)
    text = [["" for _ in range(width)] for _ in range(nrows)]
    hover = [["" for _ in range(width)] for _ in range(nrows)]
    k_label = _k_label(rows)
    for i, row in rows.iterrows():
        r, c = divmod(i, width)
        z[r, c] = int(row["top1"]) if routed[i] else E
        text[r][c] = _short(_token_label(row)) + ("" if routed[i] else "<br><i>not routed</i>")
        hover[r][c] = _hover(row, bool(routed[i]), k_label)
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertext=hover, texttemplate="%{text}", hoverinfo="text",
                               colorscale=_discrete_scale(E), zmin=-0.5, zmax=E + 0.5, showscale=False,
                               xgap=3, ygap=3, textfont=dict(size=12)))
    _legend_swatches(fig, E, not_routed=not routed.all(), used=rows.loc[routed, "top1"].unique())
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    return _layout(fig, title, height=90 + 46 * nrows, legend_below=True, below=45,
                   margin=dict(t=50, b=45, l=10, r=10))


def _is_patch(rows: pd.DataFrame) -> pd.Series:
    """Rows that are image patches: those with a recorded grid cell (``grid_row`` >= 0) or of position
    kind ``image_patch``."""
    patch = rows["position_kind"] == "image_patch"
    if "grid_row" in rows:
        patch = patch | (rows["grid_row"].fillna(-1).astype(int) >= 0)
    return patch


def patch_cells(rows: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """The image-patch rows with their grid cell (``grid_row``, ``grid_col``) and the grid's rows and
    columns. Cells are the recorded ones (the model's image grid, as its routing records carry it); when
    the records carry none, the patches lie row-major on a square grid in position order."""
    patches = rows[_is_patch(rows)].sort_values("position").reset_index(drop=True)
    if patches.empty:
        return patches.assign(grid_row=[], grid_col=[]), 0, 0
    if {"grid_row", "grid_col"} <= set(patches) and (patches[["grid_row", "grid_col"]].fillna(-1) >= 0).all().all():
        r = patches["grid_row"].astype(int).tolist()
        c = patches["grid_col"].astype(int).tolist()
        return patches.assign(grid_row=r, grid_col=c), max(r) + 1, max(c) + 1
    side = math.ceil(math.sqrt(len(patches)))
    r = [i // side for i in range(len(patches))]
    c = [i % side for i in range(len(patches))]
    return patches.assign(grid_row=r, grid_col=c), side, side


def patch_grid(rows: pd.DataFrame, title: str, num_experts: int | None = None, height: int = 360) -> go.Figure:
    """Image patches of one layer call on their grid, coloured by top-1 expert (grey: not routed)."""
    patches, n_rows, n_cols = patch_cells(rows)
    if patches.empty:
        return empty_figure(title, "no image patches in this call")
    E = _num_experts(rows, num_experts)
    routed = _routed(patches)
    z = np.full((n_rows, n_cols), np.nan)
    text = [["" for _ in range(n_cols)] for _ in range(n_rows)]
    hover = [["" for _ in range(n_cols)] for _ in range(n_rows)]
    k_label = _k_label(patches)
    for i, row in patches.iterrows():
        r, c = int(row["grid_row"]), int(row["grid_col"])
        z[r, c] = int(row["top1"]) if routed[i] else E
        text[r][c] = f"E{int(row['top1'])}" if routed[i] else "\u2205"
        hover[r][c] = _hover(row, bool(routed[i]), k_label)
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertext=hover, texttemplate="%{text}", hoverinfo="text",
                               colorscale=_discrete_scale(E), zmin=-0.5, zmax=E + 0.5, showscale=False,
                               xgap=2, ygap=2, textfont=dict(size=12)))
    _legend_swatches(fig, E, not_routed=not routed.all(), used=patches.loc[routed, "top1"].unique())
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", constrain="domain")
    return _layout(fig, title, height=height, legend=dict(orientation="v", x=1.02, y=1),
                   margin=dict(t=50, b=10, l=10, r=10))


def split_call_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(image-patch rows, all other rows) of one layer call."""
    is_patch = _is_patch(rows)
    return rows[is_patch], rows[~is_patch]


def kind_words(kind: str) -> str:
    """A position kind in words, plural, for titles: "text_token" -> "text tokens", "image_patch" ->
    "image patches", "decoder_step" -> "decoder steps"; a one-word kind is an acronym: "cls" -> "CLS
    positions"."""
    parts = str(kind).split("_")
    if len(parts) == 1:
        return f"{parts[0].upper()} positions"
    last = parts[-1]
    last = last + "es" if last.endswith(("s", "x", "ch", "sh")) else last + "s"
    return " ".join([*parts[:-1], last])


def routing_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One display row per position: token, kind, top-1, the k chosen experts and their weights, entropy,
    and whether the position was routed at all."""
    routed = _routed(rows)
    out = pd.DataFrame({
        "position": rows["position"].to_numpy(),
        "token": [_token_label(r) for _, r in rows.iterrows()],
        "kind": rows["position_kind"].to_numpy() if "position_kind" in rows else "",
        "routed": np.where(routed, "routed", NOT_ROUTED_LABEL),
        "top-1 expert": rows["top1"].astype(int).to_numpy(),
        "top-k experts": [format_ids(v) for v in rows["topk_ids"]],
        "top-k weights": [format_weights(v) for v in rows["topk_weights"]] if "topk_weights" in rows else "",
        "gate weights (combine)": [format_weights(v) for v in rows["combine"]] if "combine" in rows else "",
        "entropy (nats)": rows["entropy"].astype(float).round(3).to_numpy() if "entropy" in rows else np.nan,
    })
    return out


# ------------------------------------------------------------------------------------ source weights

def _source_colour(source, i: int) -> str:
    return getattr(source, "colour", "") or layer_colour(i)


def source_weight_bars(frame: pd.DataFrame, x: str, sources: Sequence, title: str, count: str = "examples",
                       height: int = 380) -> go.Figure:
    """Grouped bars of mean source weights: one group per value of column ``x``, one bar per declared
    source (:class:`mmoe_core.spec.SourceSpec`: its label and colour); ``frame`` holds ``mean_<source>``
    columns (see :func:`analysis.source_weights.by_label`) and ``count``."""
    if frame is None or frame.empty:
        return empty_figure(title, "no examples")
    names = frame[x].astype(str).tolist()
    fig = go.Figure()
    for i, source in enumerate(sources):
        fig.add_bar(x=names, y=frame[f"mean_{source.name}"], name=source.label, marker_color=_source_colour(source, i),
                    customdata=frame[count] if count in frame else None,
                    hovertemplate="%{x}<br>mean " + html.escape(source.label) + " %{y:.3f}"
                                  + (f"<br>%{{customdata}} {count}" if count in frame else "") + "<extra></extra>")
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
        fig.add_bar(x=x, y=weights[source.name], name=source.label, marker_color=_source_colour(source, i),
                    hovertemplate="%{x}: %{y:.3f}<extra>" + html.escape(source.label) + "</extra>")
    fig.update_yaxes(range=[0, 1], title_text="weight")
    return _layout(fig, title, height=height, barmode="group", legend_below=True)


# ------------------------------------------------------------------------------------ attributions

def attribution_patches(picture: np.ndarray | None, grid: np.ndarray, title: str = "") -> go.Figure:
    """An image input's patch attributions on its grid (``grid``: [rows, cols], NaN where no value), over
    the picture (an RGB array) when there is one; diverging colours, 0 is clear."""
    n_rows, n_cols = grid.shape
    fig = go.Figure()
    if picture is not None:
        h, w = picture.shape[:2]
        fig.add_trace(go.Image(z=picture, hoverinfo="skip"))
    else:
        h, w = n_rows * 8, n_cols * 8
    dy, dx = h / n_rows, w / n_cols
    scale = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    text = [[f"patch row {r}, column {c}: {grid[r, c]:+.4f}" for c in range(n_cols)] for r in range(n_rows)]
    fig.add_trace(go.Heatmap(z=grid, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, colorscale="RdBu_r", zmid=0,
                             zmin=-scale or -1, zmax=scale or 1, opacity=0.55, text=text, hoverinfo="text",
                             colorbar=dict(title="attr.", thickness=12)))
    shapes = [dict(type="line", x0=0, x1=w, y0=r * dy, y1=r * dy, line=dict(color="white", width=0.5))
              for r in range(1, n_rows)]
    shapes += [dict(type="line", y0=0, y1=h, x0=c * dx, x1=c * dx, line=dict(color="white", width=0.5))
               for c in range(1, n_cols)]
    fig.update_layout(shapes=shapes)
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0], scaleanchor="x")
    return _layout(fig, title, height=380, margin=dict(t=40 if title else 10, b=10, l=10, r=10))


# ------------------------------------------------------------------------------------ utilization

def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    c = max(1, min(cols, n))
    return math.ceil(n / c), c


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
        fig.add_trace(go.Bar(x=names, y=part["slot_fraction"].fillna(0), marker_color=colours, name="slot share",
                             legendgroup="slots", showlegend=False, offsetgroup="slots",
                             customdata=np.stack([part["slots"]], axis=-1) if "slots" in part else None,
                             hovertemplate="%{x}: %{y:.1%} of top-k slots"
                                           + (" (%{customdata[0]} slots)" if "slots" in part else "")
                                           + "<extra>" + html.escape(layer) + "</extra>"),
                      row=r + 1, col=c + 1)
        fig.add_trace(go.Bar(x=names, y=part["weight_fraction"].fillna(0), marker=dict(
                                 color=colours, pattern=dict(shape="/", fgcolor="white", solidity=0.35)),
                             name="combine-weight share", legendgroup="weight", showlegend=False,
                             offsetgroup="weight",
                             hovertemplate="%{x}: %{y:.1%} of combine weight<extra>" + html.escape(layer) + "</extra>"),
                      row=r + 1, col=c + 1)
        shapes.append(_line_shape(i, y=1.0 / E, dash="dash", color="#555", width=1))
        fig.layout[_axis_ref("yaxis", i)].update(tickformat=".0%", rangemode="tozero")
    for name, pattern in (("top-k slot share", ""), ("combine-weight share", "/")):
        fig.add_trace(go.Bar(x=[None], y=[None], name=name, showlegend=True,
                             marker=dict(color="#999", pattern=dict(shape=pattern, fgcolor="white"))))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="balanced share 1/E",
                             line=dict(dash="dash", color="#555")))
    fig.update_layout(shapes=shapes)
    return _layout(fig, title, height=300 * nr + 60, barmode="group",
                   legend_below=True)


def load_heatmap(loads: pd.DataFrame, value: str = "slot_fraction",
                 title: str = "Share of top-k slots: layers \u00d7 experts") -> go.Figure:
    """Layers (rows) x experts (columns), cell = share of the layer's slots (or combine weight)."""
    if loads is None or loads.empty:
        return empty_figure(title, "no routing loads in this run")
    pivot = loads.pivot_table(index="layer", columns="expert", values=value, aggfunc="sum", sort=False).fillna(0)
    layers = list(dict.fromkeys(loads["layer"]))
    pivot = pivot.reindex(layers)
    experts = [int(e) for e in pivot.columns]
    text = [[f"{v:.0%}" for v in row] for row in pivot.to_numpy()]
    what = "slots" if value == "slot_fraction" else "combine weight"
    fig = go.Figure(go.Heatmap(z=pivot.to_numpy(), x=[f"expert {e}" for e in experts], y=layers, text=text,
                               texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=max(1e-9, pivot.to_numpy().max()),
                               colorbar=dict(title=dict(text="share"), tickformat=".0%"),
                               hovertemplate="%{y} \u00b7 %{x}: %{z:.1%} of " + what + "<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    for i, e in enumerate(experts):  # a colour chip per expert column, same palette as everywhere
        fig.add_shape(type="rect", xref="x", yref="paper", x0=i - 0.45, x1=i + 0.45, y0=1.01, y1=1.05,
                      fillcolor=expert_colour(e), line=dict(width=0))
    return _layout(fig, title, height=120 + 48 * len(layers), margin=dict(t=70, b=40, l=130, r=20))


def entropy_histograms(values: Mapping[str, np.ndarray], num_experts: Mapping[str, int],
                       title: str = "Token entropy of the router, per layer") -> go.Figure:
    """Histogram of per-position router entropy (nats) per layer; the dashed line is log E (uniform
    routing), 0 is a one-hot router."""
    layers = [l for l in values if len(values[l])]
    if not layers:
        return empty_figure(title, "no entropy values in this run")
    nr, nc = _grid(len(layers))
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=layers, horizontal_spacing=0.06, vertical_spacing=0.18)
    shapes: list[dict] = []
    for i, layer in enumerate(layers):
        r, c = divmod(i, nc)
        E = int(num_experts.get(layer, 0) or 0)
        hi = math.log(E) if E > 1 else float(np.max(values[layer]) or 1.0)
        fig.add_trace(go.Histogram(x=values[layer], xbins=dict(start=0, end=hi * 1.0001, size=hi / 30),
                                   marker_color=layer_colour(i), showlegend=False,
                                   hovertemplate="entropy %{x}<br>%{y} positions<extra>" + html.escape(layer) + "</extra>"),
                      row=r + 1, col=c + 1)
        if E > 1:
            shapes.append(_line_shape(i, x=hi, dash="dash", color="#555", width=1))
        fig.layout[_axis_ref("xaxis", i)].update(title_text="entropy (nats)", range=[0, hi * 1.05])
        if c == 0:
            fig.layout[_axis_ref("yaxis", i)].update(title_text="positions")
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="log E (uniform router)",
                             line=dict(dash="dash", color="#555")))
    fig.update_layout(shapes=shapes)
    return _layout(fig, title, height=290 * nr + 60,
                   legend_below=True)


def coselection_heatmap(cosel: pd.DataFrame, layer: str, title: str | None = None) -> go.Figure:
    """E x E counts of experts chosen for the same position (diagonal: times chosen) in one layer."""
    title = title or f"Co-selection in {layer}: experts chosen together for one position"
    part = cosel[cosel["layer"] == layer] if cosel is not None and not cosel.empty else None
    if part is None or part.empty:
        return empty_figure(title, "no co-selection counts for this layer")
    m = part.pivot_table(index="expert_a", columns="expert_b", values="count", aggfunc="sum").fillna(0)
    names = [f"expert {int(e)}" for e in m.columns]
    rows = [f"expert {int(e)}" for e in m.index]
    fig = go.Figure(go.Heatmap(z=m.to_numpy(), x=names, y=rows, text=m.to_numpy().astype(int),
                               texttemplate="%{text}", colorscale="Purples", colorbar=dict(title=dict(text="count")),
                               hovertemplate="%{y} with %{x}: %{z} positions<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    E = len(names)
    for i in range(E):
        fig.add_shape(type="rect", xref="x", yref="paper", x0=i - 0.45, x1=i + 0.45, y0=1.01, y1=1.05,
                      fillcolor=expert_colour(int(m.columns[i])), line=dict(width=0))
    return _layout(fig, title, height=380, margin=dict(t=75, b=40, l=80, r=20))


def specialisation_bars(spec: pd.DataFrame, title: str = "Specialisation: MI(top-1 expert; label) vs shuffled labels"
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
        fig.add_trace(go.Bar(x=part["label"], y=part["mi"], name="MI", showlegend=False, legendgroup="mi",
                             marker_color=["#4c72b0" if a else "#b0b7c3" for a in above],
                             hovertemplate="%{x}: MI %{y:.4f} nats<extra>" + html.escape(layer) + "</extra>"),
                      row=r + 1, col=c + 1)
        if "shuffled_max" in part:
            fig.add_trace(go.Scatter(x=part["label"], y=part["shuffled_max"], mode="markers", showlegend=False,
                                     marker=dict(symbol="line-ew-open", size=26, color="#c62828", line=dict(width=3)),
                                     hovertemplate="%{x}: shuffled max %{y:.4f}<extra></extra>"),
                          row=r + 1, col=c + 1)
        fig.layout[_axis_ref("yaxis", i)].update(title_text="MI (nats)" if c == 0 else None, rangemode="tozero")
        fig.layout[_axis_ref("xaxis", i)].update(tickangle=-30)
    fig.add_trace(go.Bar(x=[None], y=[None], name="MI above chance", marker_color="#4c72b0"))
    fig.add_trace(go.Bar(x=[None], y=[None], name="MI within chance", marker_color="#b0b7c3"))
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="max MI, shuffled labels",
                             marker=dict(symbol="line-ew-open", size=18, color="#c62828", line=dict(width=3))))
    return _layout(fig, title, height=320 * nr + 60,
                   legend_below=True)


# ------------------------------------------------------------------------------------ dynamics

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
    fig.update_layout(shapes=list(fig.layout.shapes or ()) + [
        _line_shape(i, x=step, **line) for step, _, line in markers for i in range(panels)])
    for step, label, line in markers:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{label} (step {step})", line=line))


def dynamics_lines(dyn: pd.DataFrame, trigger_step: int | None = None,
                   indicators: Mapping[str, str] = DYNAMICS_INDICATORS,
                   title: str = "Routing indicators over training snapshots",
                   phases: Sequence[tuple[int, str]] = ()) -> go.Figure:
    """One panel per indicator, one line per layer, x = training step; a dotted line marks the step
    the entropy-triggered two-stage schedule switched (when the run has one), dashed lines the
    training schedule's ``phases`` ((step, what starts there), :func:`analysis.report.training_phases`)."""
    if dyn is None or dyn.empty:
        return empty_figure(title, "this run has no training snapshots")
    names = [k for k in indicators if k in dyn]
    nr, nc = _grid(len(names), 2)
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=[indicators[k] for k in names],
                        horizontal_spacing=0.08, vertical_spacing=0.16)
    layers = list(dict.fromkeys(dyn["layer"]))
    for j, name in enumerate(names):
        r, c = divmod(j, nc)
        for i, layer in enumerate(layers):
            part = dyn[dyn["layer"] == layer].sort_values("step")
            fig.add_trace(go.Scatter(x=part["step"], y=part[name], mode="lines+markers", name=layer,
                                     legendgroup=layer, showlegend=j == 0,
                                     line=dict(color=layer_colour(i), width=2),
                                     hovertemplate="step %{x}: %{y:.3f}<extra>" + html.escape(layer) + "</extra>"),
                          row=r + 1, col=c + 1)
        fig.layout[_axis_ref("xaxis", j)].update(title_text="step")
    _mark_steps(fig, trigger_step, phases, len(names))
    return _layout(fig, title, height=300 * nr + 80,
                   legend_below=True)


def dynamics_load_area(dyn: pd.DataFrame, layer: str, trigger_step: int | None = None,
                       phases: Sequence[tuple[int, str]] = ()) -> go.Figure:
    """Stacked share of top-k slots per expert over training snapshots, for one layer."""
    title = f"Expert load over training in {layer}"
    part = dyn[dyn["layer"] == layer].sort_values("step") if dyn is not None and "load" in dyn else None
    if part is None or part.empty:
        return empty_figure(title, "no per-expert load over snapshots")
    loads = np.stack([np.asarray(v, dtype=float) for v in part["load"]])
    loads = loads / np.clip(loads.sum(axis=1, keepdims=True), 1e-12, None)
    fig = go.Figure()
    for e in range(loads.shape[1]):
        fig.add_trace(go.Scatter(x=part["step"], y=loads[:, e], mode="lines", stackgroup="load", name=f"expert {e}",
                                 line=dict(color=expert_colour(e), width=0.5), fillcolor=expert_colour(e),
                                 hovertemplate="step %{x}: %{y:.1%}<extra>expert " + str(e) + "</extra>"))
    markers = _markers(trigger_step, phases)
    fig.update_layout(shapes=[_line_shape(0, x=step, **line) for step, _, line in markers])
    for step, label, _ in markers:
        fig.add_annotation(x=step, y=1, yref="paper", text=label, showarrow=False,
                           xanchor="left", yanchor="bottom")
    fig.update_yaxes(tickformat=".0%", range=[0, 1], title_text="share of slots")
    fig.update_xaxes(title_text="step")
    return _layout(fig, title, height=340)


def train_log_lines(log: pd.DataFrame, columns: Sequence[str], trigger_step: int | None = None,
                    title: str = "Training log", phases: Sequence[tuple[int, str]] = ()) -> go.Figure:
    """Chosen train_log columns against the step, one panel each."""
    columns = [c for c in columns if c in log]
    if log is None or log.empty or not columns:
        return empty_figure(title, "nothing to plot")
    nr, nc = _grid(len(columns), 2)
    fig = make_subplots(rows=nr, cols=nc, subplot_titles=list(columns), horizontal_spacing=0.08,
                        vertical_spacing=0.16 if nr > 1 else 0.1)
    for j, col in enumerate(columns):
        r, c = divmod(j, nc)
        part = log[["step", col]].dropna()
        fig.add_trace(go.Scatter(x=part["step"], y=part[col], mode="lines", name=col, showlegend=False,
                                 line=dict(color=layer_colour(j), width=2),
                                 hovertemplate="step %{x}: %{y:.4g}<extra>" + html.escape(col) + "</extra>"),
                      row=r + 1, col=c + 1)
        fig.layout[_axis_ref("xaxis", j)].update(title_text="step")
    _mark_steps(fig, trigger_step, phases, len(columns))
    return _layout(fig, title, height=280 * nr + 80, legend_below=True)


# ------------------------------------------------------------------------------------ headline metrics

def headline_bars(by_label: Mapping[str, Mapping[str, float]], measures: Sequence[str], title: str,
                  percent: bool = True) -> go.Figure:
    """Grouped bars: one group per value of a label, one bar per measure."""
    values = [v for v in by_label if isinstance(by_label[v], Mapping)]
    measures = [m for m in measures if any(m in by_label[v] for v in values)]
    if not values or not measures:
        return empty_figure(title, "no metrics by label")
    fig = go.Figure()
    for i, m in enumerate(measures):
        ys = [by_label[v].get(m) for v in values]
        fig.add_trace(go.Bar(x=[str(v) for v in values], y=ys, name=m, marker_color=layer_colour(i),
                             text=[("" if y is None else (f"{y:.0%}" if percent else f"{y:.3g}")) for y in ys],
                             textposition="outside",
                             hovertemplate="%{x}: %{y:.3f}<extra>" + html.escape(m) + "</extra>"))
    if percent:
        fig.update_yaxes(tickformat=".0%", range=[0, 1.12])
    return _layout(fig, title, height=340, barmode="group",
                   legend_below=True)

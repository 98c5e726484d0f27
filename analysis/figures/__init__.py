"""Plotly figure builders shared by the pages and the static report, by subject.

Pure functions from DataFrames (as the store returns them) to ``plotly.graph_objects.Figure``: no
Streamlit, no file I/O, no metric math beyond arranging numbers for display. Every figure that shows
experts colours them with one categorical palette (:data:`EXPERT_PALETTE`, via :func:`expert_colour`),
so expert 2 has the same colour on every page and in the report; positions whose combine weights are
all zero ("not routed": the layer gave them no expert output) are drawn in :data:`NOT_ROUTED_COLOUR`.
Layers (not experts) get their own palette (:data:`LAYER_PALETTE`) so the two are never confused.

Modules: :mod:`.base` (palettes, layout), :mod:`.routing` (one example's routing), :mod:`.utilization`
(loads, entropy, co-selection, specialisation, headline bars), :mod:`.dynamics` (over training),
:mod:`.outputs` (declared outputs, attributions). Every public builder is importable from here.
"""

from analysis.figures.base import (
    EXPERT_PALETTE,
    LAYER_PALETTE,
    NOT_ROUTED_COLOUR,
    NOT_ROUTED_LABEL,
    VERDICT_BACKGROUNDS,
    VERDICT_COLOURS,
    empty_figure,
    expert_colour,
    expert_colours,
    in_layer_order,
    layer_colour,
    verdict_css,
)
from analysis.figures.dynamics import DYNAMICS_INDICATORS, dynamics_lines, dynamics_load_area, train_log_lines
from analysis.figures.outputs import attribution_patches, source_weight_bars, source_weight_positions
from analysis.figures.routing import (
    format_ids,
    format_weights,
    kind_words,
    patch_cells,
    patch_grid,
    routing_table,
    split_call_rows,
    token_strip,
)
from analysis.figures.utilization import (
    coselection_heatmap,
    entropy_histograms,
    headline_bars,
    load_bars,
    load_heatmap,
    specialisation_bars,
)

__all__ = [
    "EXPERT_PALETTE",
    "LAYER_PALETTE",
    "NOT_ROUTED_COLOUR",
    "NOT_ROUTED_LABEL",
    "VERDICT_COLOURS",
    "VERDICT_BACKGROUNDS",
    "expert_colour",
    "expert_colours",
    "layer_colour",
    "verdict_css",
    "format_ids",
    "format_weights",
    "routing_table",
    "token_strip",
    "patch_grid",
    "patch_cells",
    "split_call_rows",
    "kind_words",
    "source_weight_bars",
    "source_weight_positions",
    "attribution_patches",
    "load_bars",
    "load_heatmap",
    "entropy_histograms",
    "coselection_heatmap",
    "specialisation_bars",
    "dynamics_lines",
    "dynamics_load_area",
    "train_log_lines",
    "headline_bars",
    "DYNAMICS_INDICATORS",
    "empty_figure",
    "in_layer_order",
]

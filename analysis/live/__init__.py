"""The live side of the dashboard, by job: what a page needs to run one example now.

* :mod:`analysis.live.uploads`: upload checks (an uploaded image is validated by its bytes before
  anything decodes it; :class:`UploadError` says why not), drawn pictures, an example's picture;
* :mod:`analysis.live.pictures`: any image mode to 8-bit RGB (16-bit grayscale scaled, alpha over white),
  an upload kept once at a bounded size with a display thumbnail, thumbnails for charts;
* :mod:`analysis.live.run`: the model behind a run (its manifest's checkpoint and dataset), live
  examples built from the declared editable fields, one live run with routing records, a knockout,
  attribution and timings, and a live example placed on the run's embedding map;
* :mod:`analysis.live.summaries`: small summaries the attribution and embedding-map pages show over
  the run's stored tables.

Summaries of declared ``source_weights`` outputs live in :mod:`analysis.source_weights`. No Streamlit
anywhere here, and no family is named: everything is read from the adapter's
:class:`~mmoe_core.spec.ModelSpec` and the contract's prediction keys.
"""

import importlib

# Submodule of every public name; imported on first use, so that a page asking for an upload check or a
# summary does not pay for torch (which the live run needs) before its first element.
_HOMES = {
    "uploads": (
        "receive_upload",
        "UploadError",
        "check_upload",
        "sniff_image_type",
        "MAX_UPLOAD_BYTES",
        "MAX_UPLOAD_PIXELS",
        "draw_image",
        "drawing_options",
        "example_picture",
        "picture_keys",
    ),
    "pictures": (
        "MODEL_SIDE",
        "THUMB_SIDE",
        "to_rgb",
        "fit_within",
        "thumbnail",
        "thumbnail_array",
        "UploadedPicture",
    ),
    "run": (
        "RunInputs",
        "run_inputs",
        "load_live_adapter",
        "load_base_examples",
        "warm_up",
        "clip_text",
        "live_example",
        "LiveResult",
        "run_live",
        "attribute_live",
        "live_attribution",
        "cpu_threads",
        "LIVE_CPU_THREADS",
        "routing_changes",
        "ranking_frame",
        "TOP_N",
        "project_live",
        "PROJECTION_FILE",
    ),
    "summaries": (
        "attribution_choices",
        "attribution_rows",
        "convergence_delta",
        "patch_grid",
        "input_share_by_label",
        "majority_expert",
        "layer_calls",
        "embedding_frame",
        "ATTRIBUTION_KEYS",
    ),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'analysis.live' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

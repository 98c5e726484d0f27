"""One example run now: the model behind a run, live examples built from the declared editable fields,
a forward with routing records (optionally with an expert knocked out), attribution and timings.

No Streamlit here, and nothing names a model family: the run's manifest says which checkpoint and
dataset to open, the adapter's :class:`~mmoe_core.spec.ModelSpec` says which fields may be edited (and how
long a text may be), and predictions use the contract's keys (``prediction``, ``gold``, ``rank``,
``top_names`` ...: see :mod:`mmoe_core.spec`).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.live.uploads import draw_image
from mmoe_core.spec import ExampleField, ModelSpec

__all__ = [
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
]


# ------------------------------------------------------------------------------------------------
# The model behind a run
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInputs:
    """What a run was built from, read from its manifest: checkpoint dir and hash, dataset dir, split."""

    run: str
    checkpoint: Path
    checkpoint_hash: str | None
    dataset: Path | None
    split: str
    family: str | None


def _resolve(path: str | os.PathLike | None, root: Path) -> Path | None:
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    for base in (root.parent, root):  # recorded relative to the repo root, or to the artifacts root
        if (base / p).exists():
            return base / p
    return p


def run_inputs(run: str, root: str | os.PathLike | None = None) -> RunInputs:
    """Checkpoint, its hash, dataset and split of a built run (from ``manifest.json``).

    Falls back to ``<root>/checkpoints/<run>`` when the manifest names no checkpoint. Raises
    FileNotFoundError (with the build command) when the run or its checkpoint is missing."""
    from analysis.store import RunStore, resolve_root

    root = resolve_root(root)
    with RunStore(run, root) as store:
        manifest = dict(store.manifest)
    ckpt = _resolve(manifest.get("checkpoint"), root) or root / "checkpoints" / run
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(
            f"run {run!r} was built from the checkpoint {ckpt}, which is gone; rebuild it "
            "with `python -m demo_build` (demo runs) or `python -m mmoe_core.train`"
        )
    params = manifest.get("params") or {}
    return RunInputs(
        run=run,
        checkpoint=ckpt,
        checkpoint_hash=manifest.get("checkpoint_hash"),
        dataset=_resolve(manifest.get("dataset"), root),
        split=str(manifest.get("split") or params.get("split") or "test"),
        family=manifest.get("family"),
    )


def load_live_adapter(run: str, root: str | os.PathLike | None = None, device: str | None = None):
    """The run's checkpoint wrapped in its family's adapter, on ``device`` (default: the GPU when there
    is one, else the CPU), in eval mode. Pages cache it (keyed by run and checkpoint hash)."""
    from mmoe_core.adapter import default_device, load_adapter

    inputs = run_inputs(run, root)
    return load_adapter(inputs.checkpoint, device=device or default_device())


def warm_up(adapter, example: Mapping[str, Any], attribution: bool = True) -> float:
    """One throw-away live run (and attribution) so that lazy imports, tokenizers and caches are paid while
    the model loads, not by the first live example. Returns the seconds it took."""
    t = time.perf_counter()
    run_live(adapter, example, attribution=attribution)
    return time.perf_counter() - t


def load_base_examples(adapter, run: str, root: str | os.PathLike | None = None) -> list[dict]:
    """The run's examples (its dataset and split, as the precompute read them) in the adapter's own form:
    the base examples a live run starts from. Also gives the adapter its dataset (e.g. a knowledge base to
    rank against)."""
    inputs = run_inputs(run, root)
    if inputs.dataset is None or not inputs.dataset.exists():
        raise FileNotFoundError(
            f"run {run!r} names the dataset {inputs.dataset}, which is gone; rebuild the demo "
            "worlds with `python -m demo_build`"
        )
    return adapter.load_examples(inputs.dataset, inputs.split)


# ------------------------------------------------------------------------------------------------
# Live examples, from the declared editable fields
# ------------------------------------------------------------------------------------------------

TEXT_KINDS = ("text", "long_text")


def _spec(spec_or_adapter) -> ModelSpec:
    return spec_or_adapter if isinstance(spec_or_adapter, ModelSpec) else spec_or_adapter.spec()


def clip_text(spec_field: ExampleField, value: str | None) -> tuple[str, str | None]:
    """``value`` cut to the field's ``max_chars``, and a note for the person when it was cut or is empty."""
    text = "" if value is None else str(value)
    if len(text) > spec_field.max_chars:
        return (
            text[: spec_field.max_chars],
            f"{spec_field.label}: cut to its first {spec_field.max_chars} characters (of {len(text)}); "
            "the model takes no more.",
        )
    if not text.strip():
        return text, f"{spec_field.label} is empty: the model runs on no text there."
    return text, None


def live_example(
    spec_or_adapter,
    base_example: Mapping[str, Any],
    texts: Mapping[str, str] | None = None,
    image=None,
    drawn_attributes: Mapping[str, Any] | None = None,
    image_field: str | None = None,
    fields: Mapping[str, Any] | None = None,
) -> dict:
    """A copy of ``base_example`` with edits, in the form ``adapter.run`` accepts.

    ``texts``: {field name: new text} for editable text fields of the spec (each cut to its
    ``max_chars``; ValueError for a field that is not an editable text field). ``image`` (a PIL image,
    e.g. from :func:`~analysis.live.uploads.check_upload`) or ``drawn_attributes`` (see
    :func:`~analysis.live.uploads.draw_image`) replace the picture of the editable image field
    ``image_field`` (default: the first one). ``fields`` sets any other key as is. Gold and labels are
    kept, so a ranking still shows where the gold item lands; ``live`` is True and the id gets ``+live``."""
    spec = _spec(spec_or_adapter)
    editable = {f.name: f for f in spec.editable_fields()}
    example = {k: (copy.deepcopy(v) if isinstance(v, (dict, list)) else v) for k, v in base_example.items()}
    for name, value in dict(texts or {}).items():
        spec_field = editable.get(name)
        if spec_field is None or spec_field.kind not in TEXT_KINDS:
            choices = [f.name for f in editable.values() if f.kind in TEXT_KINDS]
            raise ValueError(
                f"{name!r} is not an editable text field of the {spec.family!r} family "
                f"(its editable text fields: {', '.join(choices) or 'none'})"
            )
        example[name] = clip_text(spec_field, value)[0]
    if image is not None and drawn_attributes is not None:
        raise ValueError("give either an image or drawn_attributes, not both")
    if drawn_attributes is not None:
        image = draw_image(drawn_attributes)
    if image is not None:
        images = [f.name for f in editable.values() if f.kind == "image"]
        if not images or (image_field is not None and image_field not in images):
            named = f" {image_field!r}" if image_field else ""
            raise ValueError(
                f"the {spec.family!r} family has no editable image field{named} "
                f"(its editable image fields: {', '.join(images) or 'none'})"
            )
        example[image_field or images[0]] = image.convert("RGB")
    for key, value in dict(fields or {}).items():
        example[key] = value
    example["live"] = True
    base_id = str(base_example.get("id", base_example.get("index", "example")))
    example["id"] = base_id if base_id.endswith("+live") else f"{base_id}+live"
    return example


# ------------------------------------------------------------------------------------------------
# Routing of a live run
# ------------------------------------------------------------------------------------------------


def routing_changes(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per layer, between two live runs of one example (e.g. without and with a knockout): positions,
    ``changed`` (top-1 expert differs), ``changed_share``, ``topk_changed`` (the set of chosen experts
    differs)."""
    keys = ["layer", "call", "position"]
    columns = ["layer", "positions", "changed", "changed_share", "topk_changed"]
    if before is None or after is None or before.empty or after.empty:
        return pd.DataFrame(columns=columns)
    joined = before[keys + ["top1", "topk_ids"]].merge(
        after[keys + ["top1", "topk_ids"]], on=keys, suffixes=("_before", "_after")
    )
    joined["changed"] = joined["top1_before"] != joined["top1_after"]
    joined["topk_changed"] = [set(a) != set(b) for a, b in zip(joined["topk_ids_before"], joined["topk_ids_after"])]
    out = joined.groupby("layer", sort=True).agg(
        positions=("changed", "size"), changed=("changed", "sum"), topk_changed=("topk_changed", "sum")
    )
    out["changed_share"] = out["changed"] / out["positions"].clip(lower=1)
    return out.reset_index()[columns]


# ------------------------------------------------------------------------------------------------
# One live run
# ------------------------------------------------------------------------------------------------


@dataclass
class LiveResult:
    """What :func:`run_live` returns for one example.

    ``prediction``: the adapter's prediction row (contract keys: ``prediction``, ``gold``, ``correct``,
    ``score``; a ranking adds ``rank`` and ``top_names`` ...). ``kind``: the spec's prediction kind.
    ``ranking``: (ranking predictions) :func:`ranking_frame`. ``routing``: the routing table of the
    example (:func:`analysis.routing_table.routing_frame`). ``attribution``: long table like the run's
    ``attributions``, or None (``attribution_error`` says why when it failed). ``extras``: the example's
    declared outputs (by output name). ``representation``: the vector the embedding map projects.
    ``timings`` in seconds: forward, routing, attribution, total. ``device``: where it ran."""

    example: dict
    family: str
    kind: str
    prediction: dict
    routing: pd.DataFrame
    ranking: pd.DataFrame | None = None
    attribution: pd.DataFrame | None = None
    attribution_error: str | None = None
    extras: dict = field(default_factory=dict)
    representation: np.ndarray | None = None
    knockout: tuple[str, int] | None = None
    timings: dict = field(default_factory=dict)
    device: str = "cpu"

    @property
    def predicted(self) -> str | None:
        """The prediction as text (an item's name, an answer, a next token)."""
        value = self.prediction.get("prediction")
        return None if value is None else str(value)

    @property
    def gold(self) -> str | None:
        value = self.prediction.get("gold")
        return None if value is None else str(value)

    @property
    def correct(self) -> bool | None:
        value = self.prediction.get("correct")
        return None if value is None else bool(value)


TOP_N = 10


def ranking_frame(prediction: Mapping[str, Any], top_n: int = TOP_N) -> pd.DataFrame:
    """The best items of a ranking prediction by name: rank, name, score, gold (the gold item's row).
    From the contract's ``top_names`` / ``top_ids`` / ``top_scores``; without them, the top-1 alone."""
    names = prediction.get("top_names")
    ids = prediction.get("top_ids")
    scores = prediction.get("top_scores")
    if names is None:
        names, ids = [prediction.get("prediction")], [prediction.get("prediction_id")]
        scores = [prediction.get("score")]
    names = list(names)[:top_n]
    ids = list(ids)[: len(names)] if ids is not None else [None] * len(names)
    scores = list(scores)[: len(names)] if scores is not None else [None] * len(names)
    gold_id, gold = prediction.get("gold_id"), prediction.get("gold")
    rows = []
    for r, (name, item, score) in enumerate(zip(names, ids, scores), start=1):
        is_gold = (item == gold_id) if gold_id is not None and item is not None else (gold is not None and name == gold)
        rows.append({"rank": r, "name": "" if name is None else str(name), "score": score, "gold": bool(is_gold)})
    return pd.DataFrame(rows, columns=["rank", "name", "score", "gold"])


def _extras_for(extras: Mapping[str, Any], index: int) -> dict:
    out = {}
    for name, payload in dict(extras or {}).items():
        if isinstance(payload, pd.DataFrame):
            col = "example_index" if "example_index" in payload else "index" if "index" in payload else None
            out[name] = payload[payload[col] == index] if col else payload
        elif isinstance(payload, (list, tuple)) and payload and isinstance(payload[0], Mapping):
            out[name] = [row for row in payload if int(row.get("example_index", row.get("index", -1))) == index]
        else:
            out[name] = payload
    return out


def live_attribution(
    adapter,
    example: Mapping[str, Any],
    method: str = "ig",
    target: str | None = None,
    layer: str | None = None,
    expert: int | None = None,
    position: int | None = None,
    call: str | None = None,
    ig_steps: int = 16,
) -> pd.DataFrame:
    """Attributions of one example now, as rows of the run's ``attributions`` table
    (:data:`analysis.attribution.TABLE_COLUMNS`). Without ``layer``: the prediction target (``target`` or
    the family's score / answer logit); with ``layer``, ``expert`` and ``position`` (in ``call``): that
    router logit. ``method`` "ig" (``ig_steps`` steps; rows carry the convergence delta) or "occlusion"
    (one position at a time)."""
    from analysis import attribution as A

    example = dict(example)
    if layer is not None:
        if expert is None or position is None:
            raise ValueError("a router-logit attribution needs layer, expert and position")
        result = A.router_attribution(
            adapter,
            example,
            layer,
            int(expert),
            int(position),
            call=call,
            method=method,
            n_steps=ig_steps,
            internal_batch_size=ig_steps,
        )
    elif method == "ig":
        result = A.integrated_gradients(adapter, example, target, n_steps=ig_steps, internal_batch_size=ig_steps)
    elif method == "occlusion":
        result = A.occlusion(adapter, example, target)
    else:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {A.METHODS}")
    return pd.DataFrame(result.to_rows(int(example.get("index", 0))))


# Intra-op CPU threads for live runs. The demo models are small: one example gains nothing from more
# threads, and on a busy 2-core machine OpenMP's spin-waiting made 2 threads ~30x slower than 1
# (a demo run: p50 1.4-1.7 s vs 52 ms, same process, back to back).
LIVE_CPU_THREADS = 1


@contextmanager
def cpu_threads(adapter, threads: int | None = LIVE_CPU_THREADS) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads when the adapter is on the CPU (restored
    afterwards; torch's setting is process-wide, so pages serialise live runs under one lock)."""
    import torch

    if threads is None or getattr(adapter, "device", None) is None or adapter.device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def attribute_live(
    adapter,
    example: Mapping[str, Any],
    knockout: tuple[str, int] | None = None,
    method: str = "ig",
    ig_steps: int = 16,
    threads: int | None = LIVE_CPU_THREADS,
) -> tuple[pd.DataFrame | None, str | None, float]:
    """Attribution of the family's prediction target for one live example (under ``knockout`` when given),
    as (rows like the run's ``attributions`` table or None, error message or None, seconds). A page can
    call it after showing :func:`run_live` ``(attribution=False)``, so routing and prediction appear first."""
    t = time.perf_counter()
    ctx = adapter.knockout(*knockout) if knockout else nullcontext()
    try:
        with ctx, cpu_threads(adapter, threads):
            frame = live_attribution(adapter, example, method=method, ig_steps=ig_steps)
        return frame, None, time.perf_counter() - t
    except Exception as exc:  # reported beside the rest; the live run itself stands
        return None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t


def run_live(
    adapter,
    example: Mapping[str, Any],
    knockout: tuple[str, int] | None = None,
    attribution: bool = True,
    attribution_method: str = "ig",
    ig_steps: int = 16,
    threads: int | None = LIVE_CPU_THREADS,
) -> LiveResult:
    """Run one example now: routing (top-k per position per layer), prediction, attribution, timings.

    ``knockout=(layer, expert)`` forbids that expert in that layer for this run only (the adapter's
    knockout context; the attribution is of the knocked-out model too). ``attribution``: the family's
    prediction target (score or answer logit) by ``attribution_method`` ("ig" with ``ig_steps`` steps, or
    "occlusion"); a failure there is reported in ``attribution_error`` and the rest stands.
    ``timings`` (seconds): forward (the adapter's run with routing records), routing (the routing table,
    prediction tables), attribution, total. On the CPU the run uses ``threads`` torch threads
    (:data:`LIVE_CPU_THREADS`; None keeps torch's setting)."""
    import torch

    from analysis.routing_table import routing_frame

    example = dict(example)
    index = int(example.get("index", 0))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ctx = adapter.knockout(*knockout) if knockout else nullcontext()
    with ctx, cpu_threads(adapter, threads):
        with torch.no_grad():  # not inference_mode: adapters cache tensors that attribution differentiates through
            out = adapter.run([example], record=True, batch_size=1)
    timings["forward"] = time.perf_counter() - t0
    t = time.perf_counter()
    routing = routing_frame(out.recorder, "example", ids={index: str(example.get("id", index))}, only_examples=[index])
    prediction = dict(out.predictions[0]) if out.predictions else {}
    kind = adapter.prediction_spec().kind
    result = LiveResult(
        example=example,
        family=adapter.family,
        kind=kind,
        prediction=prediction,
        routing=routing,
        extras=_extras_for(out.extras, index),
        knockout=tuple(knockout) if knockout else None,
        timings=timings,
        device=str(adapter.device),
    )
    if out.representations is not None and len(out.representations):
        result.representation = out.representations[0].detach().float().cpu().numpy()
    if kind == "ranking":
        result.ranking = ranking_frame(prediction)
    timings["routing"] = time.perf_counter() - t
    if attribution:
        result.attribution, result.attribution_error, timings["attribution"] = attribute_live(
            adapter, example, knockout, attribution_method, ig_steps, threads
        )
    timings["total"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------
# A live example on the run's embedding map
# ------------------------------------------------------------------------------------------------

PROJECTION_FILE = "projection_model.npz"
PROJECTION_CACHE_ENTRIES = 8  # fitted maps kept in memory (one per published run version)
_projection_cache: dict[tuple, Any] = {}


def _open_store(run_store, root=None):
    from analysis.store import RunStore

    if isinstance(run_store, RunStore):
        return run_store, False
    return RunStore(str(run_store), root), True


def _projection_of(store):
    try:
        path = store.path(PROJECTION_FILE)
    except FileNotFoundError:
        return None
    from analysis.embedding import FittedProjection

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    projection = _projection_cache.get(key)
    if projection is None:
        while len(_projection_cache) >= PROJECTION_CACHE_ENTRIES:  # oldest first: a republish adds a key
            _projection_cache.pop(next(iter(_projection_cache)))
        projection = _projection_cache[key] = FittedProjection.load(path)
    return projection


def project_live(run_store, representation, root: str | os.PathLike | None = None) -> dict | None:
    """Place one representation (a :class:`LiveResult`'s, [D]) on the run's fitted map.

    ``run_store`` is a :class:`~analysis.store.RunStore` or a run name (then ``root`` is the artifacts
    root). Returns {"x", "y", "distance" (to the nearest fitted row: large means unlike anything the map
    was fitted on), "method"}, or None when the run has no fitted projection or no representation."""
    if representation is None:
        return None
    store, opened = _open_store(run_store, root)
    try:
        projection = _projection_of(store)
    finally:
        if opened:
            store.close()
    if projection is None:
        return None
    x = np.asarray(representation, dtype=np.float64).reshape(1, -1)
    coords, distance = projection.transform(x, return_distance=True)
    return {
        "x": float(coords[0, 0]),
        "y": float(coords[0, 1]) if coords.shape[1] > 1 else 0.0,
        "distance": float(distance[0]),
        "method": projection.method,
    }

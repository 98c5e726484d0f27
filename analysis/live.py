"""Small live-run functions for the playground (and any page that runs one example now).

No Streamlit here. A page asks these functions, never a model's internals; nothing here names a model
family: everything goes through the run's manifest and the family's adapter (input_spec, run, knockout,
attribution_inputs / attribution_forward).

* :func:`run_inputs` / :func:`load_live_adapter` / :func:`load_base_examples`: the checkpoint, dataset and
  split a run was built from (its manifest), the adapter on the GPU when there is one (else the CPU),
  and the base examples in the adapter's own form; :func:`warm_up` pays first-call costs up front;
* :func:`live_example`: a copy of a base example with edited text / question / context and an uploaded
  or drawn (:func:`draw_image`) picture; :func:`text_fields` says which fields are editable;
* :func:`run_live`: forward one example (optionally with an expert knocked out) and return routing rows,
  the prediction (top-10 ranking with entity names, or the answer), attribution and timings;
  :func:`attribute_live` / :func:`live_attribution` for the attribution alone (a page can show routing
  first); :func:`routing_changes` compares two live runs;
* :func:`check_upload`: validate an uploaded image (type by magic bytes, byte size, pixel count) before
  anything decodes it; raises :class:`UploadError`;
* :func:`project_live`: place a live example's representation on the run's fitted embedding map.

The last section holds the small summaries the QGA, attribution and embedding-map pages show over a
run's stored tables (:func:`qga_summary`, :func:`attribution_rows`, :func:`embedding_frame`, ...).
"""
from __future__ import annotations

import copy
import io
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd

__all__ = [
    "UploadError", "check_upload", "sniff_image_type", "MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS",
    "draw_image", "drawing_options",
    "run_inputs", "load_live_adapter", "load_base_examples", "warm_up", "text_fields", "live_example", "example_picture",
    "LiveResult", "run_live", "attribute_live", "cpu_threads", "LIVE_CPU_THREADS", "live_attribution", "routing_rows", "routing_changes", "project_live",
    "QGA_AGREEMENT_DEFINITION", "QGASummary", "qga_tokens", "qga_summary", "attribution_choices",
    "attribution_rows", "convergence_delta", "patch_grid", "majority_expert", "layer_calls", "embedding_frame",
]

MAX_UPLOAD_BYTES = 5 * 1024 * 1024          # 5 MB
MAX_UPLOAD_PIXELS = 25_000_000              # 25 megapixels


# ------------------------------------------------------------------------------------------------
# Uploads
# ------------------------------------------------------------------------------------------------

class UploadError(ValueError):
    """An uploaded file is not an acceptable image; the message says why, in words for the user."""


def sniff_image_type(data: bytes) -> str | None:
    """"PNG" / "JPEG" / "WEBP" from the file's first bytes (never from its name), else None."""
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _human_bytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} bytes"


def check_upload(data: bytes, filename: str = "", max_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_UPLOAD_PIXELS):
    """Validate an uploaded image and return it decoded as an RGB ``PIL.Image``.

    Checks, in order, before any pixel is decoded: the byte size (<= ``max_bytes``), the type by magic
    bytes (PNG, JPEG or WebP; the file name's extension is ignored), the pixel count the header claims
    (<= ``max_pixels``; PIL's decompression-bomb guard is also armed, as an error), then a full decode
    (a truncated or corrupt file fails here). Raises :class:`UploadError` with a message naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    name = filename or "the upload"
    if data is None:
        raise UploadError("no file was uploaded")
    data = bytes(data)
    if len(data) == 0:
        raise UploadError(f"{name} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UploadError(f"{name} is {_human_bytes(len(data))}; the limit is {_human_bytes(max_bytes)}")
    kind = sniff_image_type(data)
    if kind is None:
        raise UploadError(f"{name} is not a PNG, JPEG or WebP image (its content does not start like one, "
                          "whatever its extension says)")
    with warnings.catch_warnings():
        # PIL warns past MAX_IMAGE_PIXELS and raises past twice that: make both an error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=[kind])  # lazy: reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UploadError(f"{name} declares too many pixels to decode safely ({exc})") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UploadError(f"{name} looks like a {kind} file but its header cannot be read ({exc})") from exc
        w, h = img.size
        if w <= 0 or h <= 0:
            raise UploadError(f"{name} declares an empty picture ({w} x {h} pixels)")
        if w * h > max_pixels:
            raise UploadError(f"{name} is {w} x {h} = {w * h / 1e6:.1f} megapixels; the limit is "
                              f"{max_pixels / 1e6:g} megapixels (a decompression bomb guard)")
        try:
            img.load()
            rgb = img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UploadError(f"{name} declares too many pixels to decode safely ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UploadError(f"{name} is a damaged or truncated {kind} file ({exc})") from exc
    return rgb


# ------------------------------------------------------------------------------------------------
# Drawn pictures (the demo worlds' procedural drawing, from attribute pickers)
# ------------------------------------------------------------------------------------------------

# The product QA world draws on this light grey; the entity world on the named drawing.BACKGROUNDS.
_EXTRA_BACKGROUNDS = {"light grey": (200, 200, 200)}


def drawing_options() -> dict[str, list[str]]:
    """Choices for each drawable attribute (first entry of finish / trim is the neutral one)."""
    from mmoe_core.data import drawing
    return {
        "shape": list(drawing.SHAPES),
        "colour": list(drawing.SHAPE_COLOURS),
        "pattern": list(drawing.PATTERNS),
        "background": [*drawing.BACKGROUNDS, *_EXTRA_BACKGROUNDS],
        "finish": list(drawing.FINISHES),
        "trim": ["none", *drawing.SHAPE_COLOURS],
    }


def draw_image(attributes: Mapping[str, Any]):
    """Draw a picture from attribute names: shape, colour, pattern, background (name or RGB triple),
    optional finish ("matte" default) and trim (a colour name, or "none"). Raises ValueError on an
    unknown value, naming the choices."""
    from mmoe_core.data import drawing
    options = drawing_options()
    attrs = {"shape": "circle", "colour": "red", "pattern": "plain", "background": "white", "finish": "matte",
             "trim": "none", **{k: v for k, v in dict(attributes).items() if v is not None}}
    unknown = set(attrs) - set(options)
    if unknown:
        raise ValueError(f"unknown drawing attribute(s) {sorted(unknown)}; use {sorted(options)}")
    for key in ("shape", "colour", "pattern", "finish", "trim"):
        if attrs[key] not in options[key]:
            raise ValueError(f"unknown {key} {attrs[key]!r}; choices: {', '.join(options[key])}")
    background = attrs["background"]
    if isinstance(background, str):
        rgb = {**drawing.BACKGROUNDS, **_EXTRA_BACKGROUNDS}.get(background)
        if rgb is None:
            raise ValueError(f"unknown background {background!r}; choices: {', '.join(options['background'])}")
    else:
        rgb = tuple(int(c) for c in background)
        if len(rgb) != 3:
            raise ValueError(f"a background colour is a name or an RGB triple, got {background!r}")
    trim = None if attrs["trim"] == "none" else attrs["trim"]
    return drawing.draw_picture(attrs["shape"], attrs["colour"], attrs["pattern"], rgb,
                                finish=attrs["finish"], trim=trim)


# ------------------------------------------------------------------------------------------------
# The model behind a run
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
        raise FileNotFoundError(f"run {run!r} was built from the checkpoint {ckpt}, which is gone; rebuild it "
                                "with `python -m mmoe_core.demo` (demo runs) or `python -m mmoe_core.train`")
    params = manifest.get("params") or {}
    return RunInputs(run=run, checkpoint=ckpt, checkpoint_hash=manifest.get("checkpoint_hash"),
                     dataset=_resolve(manifest.get("dataset"), root),
                     split=str(manifest.get("split") or params.get("split") or "test"),
                     family=manifest.get("family"))


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
    the base examples a live run starts from. Also gives the adapter its dataset (e.g. MMoE's KB)."""
    inputs = run_inputs(run, root)
    if inputs.dataset is None or not inputs.dataset.exists():
        raise FileNotFoundError(f"run {run!r} names the dataset {inputs.dataset}, which is gone; rebuild the demo "
                                "worlds with `python -m mmoe_core.demo`")
    return adapter.load_examples(inputs.dataset, inputs.split)


# ------------------------------------------------------------------------------------------------
# Live examples
# ------------------------------------------------------------------------------------------------

# The field a generic "text" edit goes to, when the example has it (first match wins): the mention
# sentence of an entity-linking example, else a plain text field.
_MAIN_TEXT_FIELDS = ("sentence", "text")


def text_fields(adapter, example: Mapping[str, Any]) -> dict[str, str]:
    """Editable text of an example: {input name (from input_spec): example field holding its text}.

    An input whose name is a field of the example maps to it (MoEMoE: question, context); otherwise the
    example's main text field (``sentence`` or ``text``) stands for the first remaining text input."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for spec in adapter.input_spec():
        if spec.kind != "text_tokens":
            continue
        if spec.name in example and isinstance(example.get(spec.name), (str, type(None))):
            out[spec.name] = spec.name
            taken.add(spec.name)
    for spec in adapter.input_spec():
        if spec.kind != "text_tokens" or spec.name in out:
            continue
        field_name = next((f for f in _MAIN_TEXT_FIELDS if f in example and f not in taken), None)
        if field_name is not None:
            out[spec.name] = field_name
            taken.add(field_name)
    return out


def _image_inputs(adapter) -> list[str]:
    return [spec.name for spec in adapter.input_spec() if spec.kind == "image_patches"]


def live_example(adapter, base_example: Mapping[str, Any], text: str | None = None, image=None,
                 drawn_attributes: Mapping[str, Any] | None = None, question: str | None = None,
                 context: str | None = None, fields: Mapping[str, Any] | None = None) -> dict:
    """A copy of ``base_example`` with edits, in the form ``adapter.run`` accepts.

    ``text`` replaces the main text (MMoE: the mention sentence; a family whose text input has its own
    field, e.g. MoEMoE's question, takes it there); ``question`` / ``context`` replace those fields
    (ValueError when the family has no such input); ``image`` (a PIL image, e.g. from
    :func:`check_upload`) or ``drawn_attributes`` (see :func:`draw_image`) replace the picture;
    ``fields`` sets any other field as is. The gold answer and labels are kept, so a ranking still
    shows where the gold entity lands; ``live`` is True and the id gets a ``+live`` suffix."""
    example = {k: (copy.deepcopy(v) if isinstance(v, (dict, list)) else v) for k, v in base_example.items()}
    mapping = text_fields(adapter, base_example)
    if text is not None:
        if not mapping:
            raise ValueError(f"the {adapter.family!r} family has no editable text input")
        main = next((f for f in mapping.values() if f in _MAIN_TEXT_FIELDS), next(iter(mapping.values())))
        example[main] = str(text)
        if main != "text" and "text" in example:
            example.pop("text")  # a precomputed full text would override the edited field
    for name, value in (("question", question), ("context", context)):
        if value is None:
            continue
        if name not in mapping:
            raise ValueError(f"the {adapter.family!r} family has no {name} input "
                             f"(its text inputs: {', '.join(mapping) or 'none'})")
        example[mapping[name]] = str(value)
    if image is not None and drawn_attributes is not None:
        raise ValueError("give either an image or drawn_attributes, not both")
    if drawn_attributes is not None:
        image = draw_image(drawn_attributes)
    if image is not None:
        if not _image_inputs(adapter):
            raise ValueError(f"the {adapter.family!r} family has no image input")
        example["image"] = image.convert("RGB")
    for key, value in dict(fields or {}).items():
        example[key] = value
    example["live"] = True
    base_id = str(base_example.get("id", base_example.get("index", "example")))
    example["id"] = base_id if base_id.endswith("+live") else f"{base_id}+live"
    return example


def example_picture(example: Mapping[str, Any], size: int | None = None):
    """The example's picture as a PIL image (an in-memory ``image``, else the file at ``image_path`` or a
    path-valued ``image``), or None when it has none or the file cannot be read."""
    from PIL import Image
    img = example.get("image")
    if isinstance(img, Image.Image):
        return img.resize((size, size)) if size else img
    path = example.get("image_path") or (img if isinstance(img, (str, os.PathLike)) else None)
    if not path or (isinstance(path, float) and np.isnan(path)):
        return None
    try:
        from mmoe_core.data.readers import load_image
        return load_image(path, size) if size else load_image(path)
    except Exception:
        return None


# ------------------------------------------------------------------------------------------------
# Routing rows of a live run
# ------------------------------------------------------------------------------------------------

ROUTING_COLUMNS = ["layer", "call", "position", "position_kind", "token", "routed_modality", "gate_modality",
                   "top1", "topk_ids", "topk_weights", "combine", "probs", "entropy", "top1_prob", "routed"]


def routing_rows(recorder, subject: str = "example", example_ids: list[int] | None = None) -> pd.DataFrame:
    """One row per routed position and layer call of ``subject`` ("example": the run's own examples;
    "kb": knowledge-base items routed on the other side), via :func:`flatten_call`. Columns:
    example_index, layer, call, position, position_kind, token, routed/gate modality, top1, topk_ids,
    topk_weights (combine weight of each chosen expert), combine, probs, entropy (nats), top1_prob,
    routed (some expert got weight). ``example_ids``: keep only the calls made on exactly these examples
    (a live run of one example: calls on other batches, e.g. a knowledge base encoded on the side, are
    skipped before any work)."""
    from analysis.routing import token_entropy
    from mmoe_core.routing_record import flatten_call
    parts = []
    for call in (recorder.calls if recorder is not None else []):
        if call.meta is not None and call.meta.subject != subject:
            continue
        if example_ids is not None and call.meta is not None and \
                [int(i) for i in call.meta.example_ids] != [int(i) for i in example_ids]:
            continue
        flat = flatten_call(call)
        n = len(flat["position"])
        if n == 0:
            continue
        topk = np.asarray(flat["topk_ids"]).astype(np.int64)
        combine = np.asarray(flat["combine"], dtype=np.float32)
        probs = np.asarray(flat["probs"], dtype=np.float32)
        frame = pd.DataFrame({k: flat[k] for k in ("example_index", "layer", "call", "position", "position_kind",
                                                    "token", "routed_modality", "gate_modality")})
        frame["top1"] = topk[:, 0]
        frame["topk_ids"] = list(topk)
        frame["topk_weights"] = list(np.take_along_axis(combine, topk, axis=1))
        frame["combine"] = list(combine)
        frame["probs"] = list(probs)
        frame["entropy"] = token_entropy(probs).astype(np.float32)
        frame["top1_prob"] = probs.max(axis=1)
        frame["routed"] = combine.sum(axis=1) > 0
        parts.append(frame)
    if not parts:
        return pd.DataFrame(columns=["example_index", *ROUTING_COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["example_index", "layer", "call", "position"], kind="stable").reset_index(drop=True)


def routing_changes(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Per layer, between two live runs of one example (e.g. without and with a knockout): positions,
    ``changed`` (top-1 expert differs), ``changed_share``, ``topk_changed`` (the set of chosen experts
    differs)."""
    keys = ["layer", "call", "position"]
    columns = ["layer", "positions", "changed", "changed_share", "topk_changed"]
    if before is None or after is None or before.empty or after.empty:
        return pd.DataFrame(columns=columns)
    joined = before[keys + ["top1", "topk_ids"]].merge(after[keys + ["top1", "topk_ids"]], on=keys,
                                                       suffixes=("_before", "_after"))
    joined["changed"] = joined["top1_before"] != joined["top1_after"]
    joined["topk_changed"] = [set(a) != set(b) for a, b in zip(joined["topk_ids_before"], joined["topk_ids_after"])]
    out = joined.groupby("layer", sort=True).agg(positions=("changed", "size"), changed=("changed", "sum"),
                                                 topk_changed=("topk_changed", "sum"))
    out["changed_share"] = out["changed"] / out["positions"].clip(lower=1)
    return out.reset_index()[columns]


# ------------------------------------------------------------------------------------------------
# One live run
# ------------------------------------------------------------------------------------------------

@dataclass
class LiveResult:
    """What :func:`run_live` returns for one example.

    ``prediction``: the adapter's raw prediction dict. ``kind``: "ranking" or "answer".
    ``ranking``: (ranking families) top-10 entities: rank, entity (KB index), name, score, gold.
    ``answer`` / ``gold_answer`` / ``correct``: (answer families) the decoded answer.
    ``routing``: :func:`routing_rows` of the example. ``attribution``: long table like the run's
    ``attributions`` (input, position, label, value, abs_value, share, delta, method, target), or None
    (``attribution_error`` says why when it failed). ``extras``: the example's declared outputs
    (e.g. ``qga``). ``representation``: the vector the embedding map projects. ``timings`` in seconds:
    forward, attribution, total. ``device``: where it ran."""
    example: dict
    family: str
    kind: str
    prediction: dict
    routing: pd.DataFrame
    ranking: pd.DataFrame | None = None
    answer: str | None = None
    gold_answer: str | None = None
    correct: bool | None = None
    attribution: pd.DataFrame | None = None
    attribution_error: str | None = None
    extras: dict = field(default_factory=dict)
    representation: np.ndarray | None = None
    knockout: tuple[str, int] | None = None
    timings: dict = field(default_factory=dict)
    device: str = "cpu"


TOP_N = 10


def _ranked_item_labels(adapter) -> tuple[list[str] | None, list[str] | None]:
    """(display names, ids) of the ranked items by index, when the adapter can say: an ``entity_names()`` /
    ``entity_ids()`` pair, else a knowledge base from ``kb()`` with ``names`` / ``qids``."""
    names = ids = None
    for attr, kind in (("entity_names", "names"), ("entity_ids", "ids")):
        fn = getattr(adapter, attr, None)
        if callable(fn):
            try:
                value = list(fn())
            except Exception:
                value = None
            names, ids = (value, ids) if kind == "names" else (names, value)
    kb = getattr(adapter, "kb", None)
    if (names is None or ids is None) and callable(kb):
        try:
            base = kb()
            names = names if names is not None else list(getattr(base, "names", None) or []) or None
            ids = ids if ids is not None else list(getattr(base, "qids", None) or []) or None
        except Exception:
            pass
    return names, ids


def _ranking_frame(adapter, prediction: Mapping[str, Any], top_n: int = TOP_N) -> pd.DataFrame:
    """Top-N of a ranking prediction, from the adapter's own top list (``topk``/``top10``/``top5`` ...)."""
    ids, scores = None, None
    for key in ("topk", "top10", "top20", "top5"):
        if prediction.get(key) is not None:
            ids = list(prediction[key])
            scores = prediction.get(f"{key}_scores")
            break
    if ids is None:
        ids = [prediction.get("prediction")]
        scores = [prediction.get("score")]
    ids = ids[:top_n]
    scores = list(scores)[:top_n] if scores is not None else [None] * len(ids)
    all_names, all_ids = _ranked_item_labels(adapter)

    def label(table, i):
        return table[int(i)] if table is not None and i is not None and 0 <= int(i) < len(table) else None

    gold = prediction.get("gold")
    rows = []
    for r, (i, score) in enumerate(zip(ids, scores), start=1):
        rows.append({"rank": r, "entity": i, "id": label(all_ids, i) or str(i), "name": label(all_names, i) or str(i),
                     "score": score, "gold": gold is not None and i == gold})
    return pd.DataFrame(rows)


def _extras_for(extras: Mapping[str, Any], index: int) -> dict:
    out = {}
    for name, payload in dict(extras or {}).items():
        if isinstance(payload, pd.DataFrame):
            col = "example_index" if "example_index" in payload else "index" if "index" in payload else None
            out[name] = payload[payload[col] == index] if col else payload
        elif isinstance(payload, (list, tuple)) and payload and isinstance(payload[0], Mapping):
            out[name] = [row for row in payload if int(row.get("index", row.get("example_index", -1))) == index]
        else:
            out[name] = payload
    return out


def live_attribution(adapter, example: Mapping[str, Any], method: str = "ig", target: str | None = None,
                     layer: str | None = None, expert: int | None = None, position: int | None = None,
                     call: str | None = None, ig_steps: int = 16) -> pd.DataFrame:
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
        result = A.router_attribution(adapter, example, layer, int(expert), int(position), call=call,
                                      method=method, n_steps=ig_steps, internal_batch_size=ig_steps)
    elif method == "ig":
        result = A.integrated_gradients(adapter, example, target, n_steps=ig_steps, internal_batch_size=ig_steps)
    elif method == "occlusion":
        result = A.occlusion(adapter, example, target)
    else:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {A.METHODS}")
    return pd.DataFrame(result.to_rows(int(example.get("index", 0))))


# Intra-op CPU threads for live runs. The demo models are small: one example gains nothing from more
# threads, and on a busy 2-core machine OpenMP's spin-waiting made 2 threads ~30x slower than 1
# (mmoe-balanced: p50 1.4-1.7 s vs 52 ms, same process, back to back).
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


def attribute_live(adapter, example: Mapping[str, Any], knockout: tuple[str, int] | None = None,
                   method: str = "ig", ig_steps: int = 16, threads: int | None = LIVE_CPU_THREADS
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


def run_live(adapter, example: Mapping[str, Any], knockout: tuple[str, int] | None = None,
             attribution: bool = True, attribution_method: str = "ig", ig_steps: int = 16,
             threads: int | None = LIVE_CPU_THREADS) -> LiveResult:
    """Run one example now: routing (top-k per position per layer), prediction, attribution, timings.

    ``knockout=(layer, expert)`` forbids that expert in that layer for this run only (the adapter's
    knockout context; the attribution is of the knocked-out model too). ``attribution``: the family's
    prediction target (score or answer logit) by ``attribution_method`` ("ig" with ``ig_steps`` steps, or
    "occlusion"); a failure there is reported in ``attribution_error`` and the rest stands.
    ``timings`` (seconds): forward (the adapter's run with routing records), routing (flattening the
    records, prediction tables), attribution, total. On the CPU the run uses ``threads`` torch threads
    (:data:`LIVE_CPU_THREADS`; None keeps torch's setting)."""
    import torch
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
    routing = routing_rows(out.recorder, "example", [index])
    prediction = dict(out.predictions[0]) if out.predictions else {}
    kind = adapter.prediction_spec().kind
    result = LiveResult(example=example, family=adapter.family, kind=kind, prediction=prediction, routing=routing,
                        extras=_extras_for(out.extras, index), knockout=tuple(knockout) if knockout else None,
                        timings=timings, device=str(adapter.device))
    if out.representations is not None and len(out.representations):
        result.representation = out.representations[0].detach().float().cpu().numpy()
    if kind == "ranking":
        result.ranking = _ranking_frame(adapter, prediction)
    else:
        result.answer = prediction.get("answer", prediction.get("prediction"))
        result.gold_answer = prediction.get("gold", example.get("answer"))
        result.correct = prediction.get("correct")
    timings["routing"] = time.perf_counter() - t
    if attribution:
        result.attribution, result.attribution_error, timings["attribution"] = attribute_live(
            adapter, example, knockout, attribution_method, ig_steps, threads)
    timings["total"] = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------
# A live example on the run's embedding map
# ------------------------------------------------------------------------------------------------

PROJECTION_FILE = "projection_model.npz"
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
    return {"x": float(coords[0, 0]), "y": float(coords[0, 1]) if coords.shape[1] > 1 else 0.0,
            "distance": float(distance[0]), "method": projection.method}


# ------------------------------------------------------------------------------------------------
# Summaries the QGA, attribution and embedding pages show (pure functions over run tables).
# They live here until they find a module of their own (analysis/qga.py, ...); no Streamlit.
# ------------------------------------------------------------------------------------------------

QGA_AGREEMENT_DEFINITION = (
    "Over single-source questions (answer source image or context): the share whose dominant QGA source "
    "matches the answer source. The dominant source of a question is image when its mean alpha over the "
    "question's tokens (SOT..EOT) exceeds its mean beta, else context.")


def qga_tokens(qga: pd.DataFrame) -> pd.DataFrame:
    """The QGA table as one row per question token: example_index, position, token, alpha, beta.

    Accepts the long form (already one row per token) or the per-example form the MoEMoE adapter
    declares (index, tokens [list], alpha [list], beta [list])."""
    if qga is None or qga.empty:
        return pd.DataFrame(columns=["example_index", "position", "token", "alpha", "beta"])
    df = qga.rename(columns={"index": "example_index"}) if "example_index" not in qga else qga
    first_alpha = df["alpha"].iloc[0]
    if isinstance(first_alpha, (list, tuple, np.ndarray)):
        rows = []
        for r in df.itertuples(index=False):
            alpha, beta = np.asarray(r.alpha, dtype=float), np.asarray(r.beta, dtype=float)
            tokens = getattr(r, "tokens", None)
            tokens = list(tokens) if tokens is not None else [""] * len(alpha)
            for p in range(len(alpha)):
                rows.append((int(r.example_index), p, str(tokens[p]) if p < len(tokens) else "", alpha[p], beta[p]))
        return pd.DataFrame(rows, columns=["example_index", "position", "token", "alpha", "beta"])
    out = df.copy()
    if "position" not in out:
        out["position"] = out.groupby("example_index").cumcount()
    if "token" not in out:
        out["token"] = ""
    return out[["example_index", "position", "token", "alpha", "beta"]].sort_values(
        ["example_index", "position"], kind="stable").reset_index(drop=True)


@dataclass
class QGASummary:
    per_example: pd.DataFrame       # example_index, tokens, mean_alpha, mean_beta, dominant, + example fields
    by_question_type: pd.DataFrame  # question_type, questions, mean_alpha, mean_beta
    by_answer_source: pd.DataFrame  # answer_source, questions, mean_alpha, mean_beta
    agreement: float                # see QGA_AGREEMENT_DEFINITION (nan when no single-source question)
    agreement_n: int
    agreement_by_source: dict       # {"image": share, "context": share}
    confusion: pd.DataFrame         # rows answer source (gold), columns dominant source, counts
    definition: str = QGA_AGREEMENT_DEFINITION


def qga_summary(qga: pd.DataFrame, examples: pd.DataFrame, source_label: str = "answer_source",
                type_label: str = "question_type") -> QGASummary:
    """Averages by question type and answer source, agreement with the gold answer source, confusion."""
    tokens = qga_tokens(qga)
    per = tokens.groupby("example_index").agg(tokens=("alpha", "size"), mean_alpha=("alpha", "mean"),
                                              mean_beta=("beta", "mean")).reset_index()
    per["dominant"] = np.where(per["mean_alpha"] > per["mean_beta"], "image", "context")
    ex = examples.rename(columns={"index": "example_index"}) if "example_index" not in examples else examples
    keep = [c for c in ("example_index", "id", "question", "answer", type_label, source_label, "category")
            if c in ex]
    per = per.merge(ex[keep], on="example_index", how="left")

    def by(label: str) -> pd.DataFrame:
        if label not in per:
            return pd.DataFrame(columns=[label, "questions", "mean_alpha", "mean_beta"])
        return per.groupby(label, sort=True).agg(questions=("example_index", "size"), mean_alpha=("mean_alpha", "mean"),
                                                 mean_beta=("mean_beta", "mean")).reset_index()

    agreement, n, by_source = float("nan"), 0, {}
    confusion = pd.DataFrame()
    if source_label in per:
        single = per[per[source_label].isin(["image", "context"])]
        n = len(single)
        if n:
            hits = single["dominant"] == single[source_label]
            agreement = float(hits.mean())
            by_source = {s: float(hits[single[source_label] == s].mean()) if (single[source_label] == s).any()
                         else float("nan") for s in ("image", "context")}
        confusion = pd.crosstab(per[source_label].rename("answer source"), per["dominant"].rename("dominant QGA source"))
        for col in ("image", "context"):
            if col not in confusion:
                confusion[col] = 0
        confusion = confusion[["image", "context"]]
    return QGASummary(per, by(type_label), by(source_label), agreement, n, by_source, confusion)


# -- attributions

ATTRIBUTION_KEYS = ["method", "target", "layer", "expert"]


def attribution_choices(attributions: pd.DataFrame) -> pd.DataFrame:
    """Distinct (method, target, layer, expert) of an attributions table, with how many examples each."""
    if attributions is None or attributions.empty:
        return pd.DataFrame(columns=[*ATTRIBUTION_KEYS, "examples"])
    keys = [k for k in ATTRIBUTION_KEYS if k in attributions]
    df = attributions[keys + ["example_index"]].copy()
    for k in keys:
        df[k] = df[k].astype(object).where(df[k].notna(), None)
    return df.groupby(keys, dropna=False, sort=True)["example_index"].nunique().reset_index(name="examples")


def _match(df: pd.DataFrame, column: str, value) -> pd.Series:
    if column not in df:
        return pd.Series(True, index=df.index)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return df[column].isna()
    return df[column] == value


def attribution_rows(attributions: pd.DataFrame, example_index: int | None = None, method: str | None = None,
                     target: str | None = None, layer: str | None = None, expert: int | None = None) -> pd.DataFrame:
    """Rows of one attribution (example, method, target[, layer, expert]) sorted by input and position.
    A router-logit attribution is picked by layer and expert; the score/answer one by layer=None."""
    df = attributions
    mask = pd.Series(True, index=df.index)
    if example_index is not None:
        mask &= df["example_index"] == int(example_index)
    if method is not None:
        mask &= df["method"] == method
    if target is not None:
        mask &= df["target"] == target
        mask &= _match(df, "layer", layer)
        mask &= _match(df, "expert", None if expert is None else int(expert))
    return df[mask].sort_values(["input", "position"], kind="stable").reset_index(drop=True)


def convergence_delta(rows: pd.DataFrame) -> float | None:
    """The IG convergence delta of one attribution's rows (sum of attributions minus the difference of
    the target between input and baseline); None when the method has none."""
    if rows is None or rows.empty or "delta" not in rows or rows["delta"].isna().all():
        return None
    return float(rows["delta"].dropna().iloc[0])


def patch_grid(rows: pd.DataFrame, column: str = "value") -> np.ndarray:
    """Patch attributions of one image input as a [rows, cols] grid, from labels "patch r,c" (else a
    square grid in position order)."""
    values = rows[column].to_numpy(dtype=float)
    labels = rows["label"].astype(str).tolist() if "label" in rows else []
    coords = []
    for lab in labels:
        try:
            r, c = lab.replace("patch", "").strip().split(",")
            coords.append((int(r), int(c)))
        except ValueError:
            coords = []
            break
    if coords and len(coords) == len(values):
        grid = np.full((max(r for r, _ in coords) + 1, max(c for _, c in coords) + 1), np.nan)
        for (r, c), v in zip(coords, values):
            grid[r, c] = v
        return grid
    side = int(np.ceil(np.sqrt(len(values))))
    grid = np.full(side * side, np.nan)
    grid[:len(values)] = values
    return grid.reshape(side, side)


# -- the embedding map

def majority_expert(store, layer: str, call: str | None = None) -> pd.DataFrame:
    """Per example: the expert most often top-1 over the example's positions in ``layer`` (optionally
    one call); ties go to the lower expert id. Columns example_index, expert, share (of positions)."""
    where, params = "layer = ?", [layer]
    if call is not None:
        where += " AND call = ?"
        params.append(call)
    counts = store.sql(f"SELECT example_index, top1 AS expert, count(*) AS n FROM routing WHERE {where} "
                       "GROUP BY example_index, top1", params)
    if counts.empty:
        return pd.DataFrame(columns=["example_index", "expert", "share"])
    counts = counts.sort_values(["example_index", "n", "expert"], ascending=[True, False, True], kind="stable")
    total = counts.groupby("example_index")["n"].transform("sum")
    counts["share"] = counts["n"] / total
    top = counts.groupby("example_index", sort=True).head(1)
    return top[["example_index", "expert", "share"]].reset_index(drop=True)


def layer_calls(store, layer: str) -> list[str]:
    """The calls a layer was recorded with in the run's routing table (e.g. "mention", "decoder")."""
    df = store.sql("SELECT DISTINCT call FROM routing WHERE layer = ? ORDER BY call", [layer])
    return [str(c) for c in df["call"] if c is not None]


def embedding_frame(store, layer: str | None = None, call: str | None = None) -> pd.DataFrame:
    """The run's projection joined with example fields and labels, correctness (``correct``) and, when a
    layer is given, the majority top-1 expert of each example over that layer's positions (all its calls, or
    ``call``): ``expert`` as a string ("expert 2", "none") and ``expert_share``."""
    proj = store.table("projection")
    ex = store.examples().rename(columns={"index": "example_index"})
    frame = proj.merge(ex, on="example_index", how="left")
    if store.has("predictions"):
        pred = store.table("predictions")
        pred = pred.rename(columns={"index": "example_index"}) if "example_index" not in pred else pred
        cols = [c for c in ("correct", "prediction", "rank", "answer") if c in pred and c not in frame]
        if cols:
            frame = frame.merge(pred[["example_index", *cols]], on="example_index", how="left")
    if "correct" in frame:
        frame["correct"] = frame["correct"].map({True: "correct", False: "wrong"}).fillna("no gold")
    if layer is not None:
        maj = majority_expert(store, layer, call)
        frame = frame.merge(maj.rename(columns={"share": "expert_share"}), on="example_index", how="left")
        frame["expert"] = frame["expert"].map(lambda e: "none" if pd.isna(e) else f"expert {int(e)}")
    return frame

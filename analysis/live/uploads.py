"""Upload checks and pictures for live runs: validate an uploaded image before anything decodes it,
draw a picture from attribute names, and find an example's picture from its declared image fields.

No Streamlit and no model here.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from analysis.live.pictures import MODEL_SIDE, THUMB_SIDE, UploadedPicture, fit_within, to_rgb
from mmoe_core.data.images import MAX_IMAGE_PIXELS, sniff_image_type  # shared with the dataset readers

__all__ = [
    "UploadError",
    "check_upload",
    "sniff_image_type",
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_MB",
    "MAX_UPLOAD_PIXELS",
    "drawing_options",
    "draw_image",
    "example_picture",
    "picture_keys",
]

# In Streamlit's unit (MiB): the widget's max_upload_size and .streamlit/config.toml's server.maxUploadSize
# (the server's own cap, which the widget's cannot raise) are both this number.
MAX_UPLOAD_MB = 5
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
MAX_UPLOAD_PIXELS = MAX_IMAGE_PIXELS  # 25 megapixels: the one pixel cap, dataset pictures too


class UploadError(ValueError):
    """An uploaded file is not an acceptable image; the message says why, in words for the user."""


def _human_bytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} bytes"


def check_upload(
    data: bytes, filename: str = "", max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS
):
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
        raise UploadError(
            f"{name} is not a PNG, JPEG or WebP image (its content does not start like one, "
            "whatever its extension says)"
        )
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
            raise UploadError(
                f"{name} is {w} x {h} = {w * h / 1e6:.1f} megapixels; the limit is "
                f"{max_pixels / 1e6:g} megapixels (a decompression bomb guard)"
            )
        try:
            img.load()
            rgb = to_rgb(img)  # 16-bit, palette and alpha images keep their tones (analysis.live.pictures)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UploadError(f"{name} declares too many pixels to decode safely ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UploadError(f"{name} is a damaged or truncated {kind} file ({exc})") from exc
    return rgb


# ------------------------------------------------------------------------------------------------
# Drawn pictures (the demo worlds' procedural drawing, from attribute pickers)
# ------------------------------------------------------------------------------------------------

# A neutral backdrop beside drawing.BACKGROUNDS (some worlds draw on plain grey).
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
    attrs = {
        "shape": "circle",
        "colour": "red",
        "pattern": "plain",
        "background": "white",
        "finish": "matte",
        "trim": "none",
        **{k: v for k, v in dict(attributes).items() if v is not None},
    }
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
    return drawing.draw_picture(
        attrs["shape"], attrs["colour"], attrs["pattern"], rgb, finish=attrs["finish"], trim=trim
    )


# ------------------------------------------------------------------------------------------------
# An example's picture
# ------------------------------------------------------------------------------------------------


def picture_keys(image_fields: Sequence[str]) -> list[str]:
    """Where an example keeps the picture of each image field: the field itself (a PIL image or a path)
    and ``<field>_path`` (a path, as datasets store it)."""
    return [key for name in image_fields for key in (name, f"{name}_path")]


def example_picture(example: Mapping[str, Any], image_fields: Sequence[str], size: int | None = None):
    """The picture of the first of ``image_fields`` (the names of the spec's image fields) the example has:
    an in-memory PIL image, else the image file at the path it names; None when it has none or the file
    cannot be read."""
    from PIL import Image

    for key in picture_keys(image_fields):
        value = example.get(key)
        if isinstance(value, Image.Image):
            return value.resize((size, size)) if size else value
        if isinstance(value, (str, os.PathLike)) and str(value):
            try:
                from mmoe_core.data.readers import load_image

                return load_image(value, size) if size else load_image(value)
            except Exception:  # a missing or unreadable file: the example shows no picture
                return None
    return None


def receive_upload(
    data: bytes, name: str = "", model_side: int = MODEL_SIDE, thumb_side: int = THUMB_SIDE
) -> UploadedPicture:
    """Check an uploaded file (:func:`~analysis.live.uploads.check_upload`: size, type, pixel cap, full
    decode; :class:`~analysis.live.uploads.UploadError` when refused) and keep it once: a copy for the
    model and a thumbnail, the decoded full-resolution picture dropped."""
    full = check_upload(data, name)
    try:
        size = full.size
        model = fit_within(full, model_side)
        if model is full:
            model = full.copy()
    finally:
        full.close()
        del full
    return UploadedPicture(
        name=name or "upload",
        digest=hashlib.sha256(bytes(data)).hexdigest(),
        original_size=tuple(size),
        model=model,
        thumb=fit_within(model, thumb_side),
    )

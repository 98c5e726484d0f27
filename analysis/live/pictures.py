"""Pictures for live runs and charts: any image mode to 8-bit RGB, an upload kept once at a bounded size,
and small thumbnails for what a page draws.

* :func:`to_rgb`: 16-bit and 32-bit grayscale scaled to 8 bits (PIL's own ``convert("RGB")`` clips them,
  so a 16-bit PNG shows almost white), palette and alpha images composited over white, CMYK and the rest
  converted;
* :func:`fit_within` / :func:`thumbnail`: a copy whose longer side is at most N pixels (aspect kept);
* :class:`UploadedPicture` (made by ``analysis.live.uploads.receive_upload``): an upload kept
  as one copy for the model (longer side <= :data:`MODEL_SIDE`, larger than any model input the
  project serves; the encoder resizes it to its own input size) and one display thumbnail
  (:data:`THUMB_SIDE`): the full-resolution picture is dropped as soon as both exist.

No Streamlit and no model here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MODEL_SIDE",
    "THUMB_SIDE",
    "to_rgb",
    "fit_within",
    "thumbnail",
    "thumbnail_array",
    "UploadedPicture",
]

MODEL_SIDE = 448  # the copy a live run sees: >= CLIP's 224 / 336 and the demo towers' 64
THUMB_SIDE = 256  # what pages and charts draw

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")


def _gray_to_8bit(values: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def to_rgb(image):
    """``image`` (any PIL mode) as an 8-bit RGB ``PIL.Image``, its tones kept.

    16-bit grayscale (``I;16*``) is scaled by 255/65535; 32-bit integer grayscale (``I``, which is how
    some 16-bit PNGs open) by the 16-bit range when its values fit it, else by its own maximum; float
    grayscale (``F``) as 0..1 when it is, else by its maximum; images with transparency (RGBA, LA, PA,
    and palette images with a transparent entry) are composited over white; the rest by PIL."""
    from PIL import Image

    mode = image.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        values = np.asarray(image)
        if mode in _SIXTEEN_BIT:
            scale = 65535.0
        elif mode == "I":
            top = int(values.max()) if values.size else 0
            scale = 255.0 if top <= 255 else 65535.0 if top <= 65535 else float(top)
            values = np.clip(values, 0, None)
        else:
            finite = values[np.isfinite(values)]
            top = float(finite.max()) if finite.size else 1.0
            scale = 1.0 if top <= 1.0 else top
            values = np.nan_to_num(np.clip(values, 0, None), nan=0.0, posinf=scale)
        gray = _gray_to_8bit(values, scale)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def fit_within(image, side: int):
    """A copy of ``image`` whose longer side is at most ``side`` pixels (aspect kept, Lanczos); the image
    itself when it already fits."""
    from PIL import Image

    w, h = image.size
    if max(w, h) <= side:
        return image
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing by an integer factor first (box filter) keeps a 25-megapixel resize quick
    factor = max(1, min(w // size[0], h // size[1]) // 2)
    small = image.reduce(factor) if factor > 1 else image
    return small.resize(size, Image.Resampling.LANCZOS)


def thumbnail(image, side: int = THUMB_SIDE):
    """A display copy of ``image`` (8-bit RGB, longer side <= ``side``); None for None."""
    if image is None:
        return None
    return fit_within(to_rgb(image), side)


def thumbnail_array(picture, side: int = THUMB_SIDE) -> np.ndarray | None:
    """``picture`` (a PIL image or an [H, W, 3] array) as a uint8 RGB array whose longer side is at most
    ``side``: what a chart may embed (a chart carrying a full-resolution picture is megabytes of JSON)."""
    if picture is None:
        return None
    from PIL import Image

    if isinstance(picture, np.ndarray):
        array = picture if picture.dtype == np.uint8 else np.clip(picture, 0, 255).astype(np.uint8)
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if max(array.shape[:2]) <= side:
            return array[..., :3]
        picture = Image.fromarray(array[..., :3])
    return np.asarray(thumbnail(picture, side))


@dataclass(frozen=True)
class UploadedPicture:
    """An accepted upload as a live run keeps it: the file's name, the sha256 of its bytes, its original
    size, the copy the model sees (longer side <= MODEL_SIDE) and a display thumbnail (<= THUMB_SIDE)."""

    name: str
    digest: str
    original_size: tuple[int, int]
    model: object
    thumb: object

    @property
    def caption(self) -> str:
        return f"uploaded: {self.name}"

    @property
    def detail(self) -> str:
        """ "<name>: 5000 x 5000 pixels, kept at 448 x 448 for the model" (what was kept of the upload)."""
        (w, h), (mw, mh) = self.original_size, self.model.size
        kept = "kept as it is" if (w, h) == (mw, mh) else f"kept at {mw} x {mh} for the model"
        return f"{self.name}: {w} x {h} pixels, {kept}"

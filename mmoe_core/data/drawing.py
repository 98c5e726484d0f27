"""Procedural drawing of the demo worlds' pictures: a shape with a colour and a pattern on a background.

Everything here is a pure function of its arguments (randomness comes in as an explicit
``numpy.random.Generator``), so the same world seed always gives the same pixels, and PNG / JPEG
files written by :func:`save_png` / :func:`save_jpeg` are byte-identical between runs.

Pictures are drawn at ``SUPERSAMPLE`` times the final size and downsampled with a fixed filter,
which gives clean anti-aliased edges at 64x64 px.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

Job = TypeVar("Job")

IMAGE_SIZE = 64
SUPERSAMPLE = 3

# Named RGB colours for shapes. Chosen to stay distinguishable from each other after mild noise,
# and to contrast with every entry of BACKGROUNDS.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "lime": (160, 230, 40),
    "green": (20, 130, 50),
    "blue": (30, 90, 230),
    "purple": (130, 50, 180),
    "pink": (250, 130, 200),
    "brown": (130, 75, 30),
    "cyan": (40, 210, 230),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 242),
    "black": (18, 18, 18),
    "grey": (128, 128, 128),
    "navy": (22, 28, 78),
    "beige": (222, 205, 165),
}

# The product QA world photographs every product on this flat light grey.
PRODUCT_BACKGROUND = (200, 200, 200)

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross", "ring", "crescent")
PATTERNS = ("plain", "striped", "dotted", "checked", "zigzag")
FINISHES = ("matte", "glossy", "metallic")


@dataclass(frozen=True)
class Pose:
    """Where the shape sits: centre offset (px at final size), scale of the radius, rotation (degrees)."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0


@dataclass(frozen=True)
class Corruption:
    """Post-drawing damage: Gaussian pixel noise (std, 0..255 units) and an optional occluding box."""

    noise_std: float = 0.0
    occluder: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 at final size
    occluder_grey: int = 90


def _regular_polygon(cx: float, cy: float, r: float, sides: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(math.radians(start_deg + 360.0 * i / sides)),
            cy + r * math.sin(math.radians(start_deg + 360.0 * i / sides)),
        )
        for i in range(sides)
    ]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = math.radians(-90 + 36 * i)
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    a = r * 0.36  # half width of each bar
    return [
        (cx - a, cy - r),
        (cx + a, cy - r),
        (cx + a, cy - a),
        (cx + r, cy - a),
        (cx + r, cy + a),
        (cx + a, cy + a),
        (cx + a, cy + r),
        (cx - a, cy + r),
        (cx - a, cy + a),
        (cx - r, cy + a),
        (cx - r, cy - a),
        (cx - a, cy - a),
    ]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    """An 'L' mask (255 inside) of ``shape`` centred at (cx, cy) with outer radius ``r`` (all in px)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.5
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        off = r * 0.55
        draw.ellipse((cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3), fill=0)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        draw.polygon(_regular_polygon(cx, cy + r * 0.15, r * 1.05, 3, -90), fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=255)
    elif shape == "pentagon":
        draw.polygon(_regular_polygon(cx, cy, r, 5, -90), fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, 0), fill=255)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=255)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def pattern_ink(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The colour a pattern is drawn in on top of ``rgb``: darker on light colours, lighter on dark ones."""
    luminance = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255.0
    if luminance > 0.4:
        return tuple(int(c * 0.45) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * 0.6) for c in rgb)  # type: ignore[return-value]


def pattern_fill(pattern: str, size: int, rgb: tuple[int, int, int], period: int) -> Image.Image:
    """A full canvas of ``rgb`` with ``pattern`` drawn over it (axis aligned, ``period`` px repeat)."""
    fill = Image.new("RGB", (size, size), rgb)
    if pattern == "plain":
        return fill
    ink = pattern_ink(rgb)
    draw = ImageDraw.Draw(fill)
    half = period // 2
    if pattern == "striped":
        for y in range(0, size, period):
            draw.rectangle((0, y, size, y + half - 1), fill=ink)
    elif pattern == "dotted":
        dot = period * 0.28
        for y in range(half, size, period):
            for x in range(half, size, period):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=ink)
    elif pattern == "checked":
        for y in range(0, size, half):
            for x in range(0, size, half):
                if (x // half + y // half) % 2 == 0:
                    draw.rectangle((x, y, x + half - 1, y + half - 1), fill=ink)
    elif pattern == "zigzag":
        width = max(2, period // 4)
        for y in range(0, size + period, period):
            points = [(x, y + (half if (x // half) % 2 else 0)) for x in range(0, size + half, half)]
            draw.line(points, fill=ink, width=width)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return fill


def _finish_overlay(finish: str, size: int, cx: float, cy: float, r: float) -> tuple[Image.Image, Image.Image] | None:
    """An (RGB, alpha) pair to composite over the shape for a finish, or None for matte."""
    if finish == "matte":
        return None
    if finish == "glossy":
        # A bright specular highlight in the upper left.
        alpha = Image.new("L", (size, size), 0)
        hr = r * 0.32
        hx, hy = cx - r * 0.35, cy - r * 0.35
        ImageDraw.Draw(alpha).ellipse((hx - hr, hy - hr * 0.7, hx + hr, hy + hr * 0.7), fill=215)
        return Image.new("RGB", (size, size), (255, 255, 255)), alpha
    if finish == "metallic":
        # Diagonal light-to-dark banding, like brushed metal.
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        band = (np.sin((xx + yy) / (r * 0.25)) + 1.0) / 2.0
        grey = (band * 255).astype(np.uint8)
        rgb = Image.fromarray(np.stack([grey, grey, grey], axis=-1), "RGB")
        alpha = Image.new("L", (size, size), 110)
        return rgb, alpha
    raise ValueError(f"unknown finish {finish!r}")


def draw_picture(
    shape: str,
    colour: str,
    pattern: str,
    background: tuple[int, int, int],
    pose: Pose = Pose(),
    corruption: Corruption = Corruption(),
    rng: np.random.Generator | None = None,
    *,
    finish: str = "matte",
    trim: str | None = None,
    size: int = IMAGE_SIZE,
) -> Image.Image:
    """Draw one RGB picture: ``shape`` filled with ``colour`` and ``pattern`` on a flat ``background``.

    ``trim`` (a colour name) adds a thick outline; ``finish`` adds a gloss highlight or metallic banding.
    ``rng`` is only needed when ``corruption.noise_std > 0``.
    """
    big = size * SUPERSAMPLE
    cx = big / 2 + pose.dx * SUPERSAMPLE
    cy = big / 2 + pose.dy * SUPERSAMPLE
    r = big * 0.34 * pose.scale
    canvas = Image.new("RGB", (big, big), background)

    if trim is not None:
        outline = _rotated(shape_mask(shape, big, cx, cy, r * 1.2), pose.angle, (cx, cy))
        canvas.paste(SHAPE_COLOURS[trim], mask=outline)

    mask = _rotated(shape_mask(shape, big, cx, cy, r), pose.angle, (cx, cy))
    body = pattern_fill(pattern, big, SHAPE_COLOURS[colour], period=max(8, int(r * 0.42)))
    overlay = _finish_overlay(finish, big, cx, cy, r)
    if overlay is not None:
        ink, alpha = overlay
        body = Image.composite(ink, body, alpha)
    canvas.paste(body, mask=mask)

    picture = canvas.reduce(SUPERSAMPLE)  # box-filter downsampling: the anti-aliasing step
    return corrupt(picture, corruption, rng)


def _rotated(mask: Image.Image, angle: float, center: tuple[float, float]) -> Image.Image:
    # Nearest is enough on the supersampled mask: the final reduce() smooths the edges.
    return mask if angle == 0 else mask.rotate(angle, Image.Resampling.NEAREST, center=center)


def corrupt(picture: Image.Image, corruption: Corruption, rng: np.random.Generator | None) -> Image.Image:
    """Apply noise and occlusion to a final-size picture (returns a new image)."""
    if corruption.noise_std <= 0 and corruption.occluder is None:
        return picture
    pixels = np.asarray(picture, dtype=np.float32).copy()
    if corruption.occluder is not None:
        x0, y0, x1, y1 = corruption.occluder
        pixels[y0:y1, x0:x1, :] = corruption.occluder_grey
    if corruption.noise_std > 0:
        if rng is None:
            raise ValueError("noise needs an rng")
        pixels += rng.normal(0.0, corruption.noise_std, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def random_pose(rng: np.random.Generator, shift: float, scale: tuple[float, float], angle: float) -> Pose:
    """A pose with uniform shift in [-shift, shift] px, scale in ``scale`` and angle in [-angle, angle] deg."""
    return Pose(
        dx=float(rng.uniform(-shift, shift)),
        dy=float(rng.uniform(-shift, shift)),
        scale=float(rng.uniform(*scale)),
        angle=float(rng.uniform(-angle, angle)),
    )


def random_corruption(
    rng: np.random.Generator, max_noise: float, occlusion_prob: float, max_box: int, size: int = IMAGE_SIZE
) -> Corruption:
    """Noise std in [0, max_noise]; with ``occlusion_prob`` a grey box of side <= ``max_box`` px somewhere."""
    noise = float(rng.uniform(0.0, max_noise))
    occluder = None
    if rng.random() < occlusion_prob:
        w, h = (int(v) for v in rng.integers(max_box // 2, max_box + 1, size=2))
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        occluder = (x0, y0, x0 + w, y0 + h)
    return Corruption(noise_std=noise, occluder=occluder, occluder_grey=int(rng.integers(60, 200)))


def save_png(picture: Image.Image, path: Path) -> None:
    """Write a PNG with fixed encoder settings and no metadata (byte-identical for identical pixels)."""
    picture.save(path, format="PNG", compress_level=6, optimize=False)


def save_jpeg(picture: Image.Image, path: Path) -> None:
    """Write a JPEG with fixed settings (quality 95, no chroma subsampling, no EXIF)."""
    picture.save(path, format="JPEG", quality=95, subsampling=0, optimize=False, progressive=False)


def write_pictures(
    jobs: Sequence[Job], write_one: Callable[[Job], None], *, desc: str = "pictures", progress: bool = True
) -> None:
    """Run ``write_one(job)`` for every job (each draws and saves one picture) under a progress bar on stderr.

    Each picture depends only on its job (its random generator is seeded from the job), never on the order.
    """
    for job in tqdm(jobs, desc=desc, unit="img", disable=not progress):
        write_one(job)

"""Opening untrusted pictures: inside their dataset folder, of a known format, of bounded size.

Dataset files name their pictures (``imgPath``, ``image_list``, ``image``); an upload hands over bytes.
Both end here, so that one set of limits holds everywhere:

* :func:`safe_relative_path`: a record's picture path must be relative and without ``..``, so that it
  names a file under the dataset folder; the picture folder itself may be a symbolic link (e.g. to another
  disk), but a link below it that leads out of it is refused;
* :func:`check_image_file`: at most :data:`MAX_IMAGE_FILE_BYTES` on disk, a PNG, JPEG or WebP by its
  first bytes (never by its name), and at most :data:`MAX_IMAGE_PIXELS` by its header (nothing decoded);
* :func:`open_image_checked`: the same checks, then a full decode (PIL's decompression-bomb guard armed as
  an error) to RGB.

Every refusal is a :class:`~mmoe_core.data.errors.DatasetError` naming the file (relative to its folder).
The upload limits of the live playground (``analysis.live.uploads``) import :data:`MAX_IMAGE_PIXELS` and
:func:`sniff_image_type` from here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath

from mmoe_core.data.errors import DatasetError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_FILE_BYTES",
    "IMAGE_FORMATS",
    "sniff_image_type",
    "safe_relative_path",
    "check_image_file",
    "open_image_checked",
]

MAX_IMAGE_PIXELS = 25_000_000  # 25 megapixels: uploads and dataset pictures alike
MAX_IMAGE_FILE_BYTES = 50 * 1024 * 1024  # a dataset picture on disk (an upload has its own, smaller cap)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def sniff_image_type(data: bytes) -> str | None:
    """ "PNG" / "JPEG" / "WEBP" from the file's first bytes (never from its name), else None."""
    head = bytes(data[:16])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _shown(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def safe_relative_path(root: str | os.PathLike, value: str, subdir: str = "") -> Path:
    """``root / subdir / value`` for a path a dataset record gives; DatasetError (without the record: the
    caller adds it) when ``value`` is absolute, empty, or has ``..``, a drive or a NUL."""
    root = Path(root)
    rel = PurePosixPath(str(value).replace("\\", "/"))
    parts = rel.parts
    if (
        not parts
        or rel.is_absolute()
        or str(value).startswith(("/", "~"))
        or ".." in parts
        or ":" in parts[0]
        or "\x00" in str(value)
    ):
        raise DatasetError(f"{value!r} must be a relative path inside the dataset folder (no '..', not absolute)")
    full = root / subdir / Path(*parts)
    # Symbolic links: the folder a picture's first component names may be one (the owner's layout: a picture
    # folder on another disk); below it, a link out of that folder is refused.
    base = Path(os.path.realpath(root / subdir / parts[0] if len(parts) > 1 else root / subdir))
    real = Path(os.path.realpath(full))
    if real != base and base not in real.parents:
        raise DatasetError(f"{value!r} leaves the data folder {root} (through a symbolic link)")
    return full


def check_image_file(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_FILE_BYTES,
) -> tuple[str, int, int]:
    """(format, width, height) of a picture file after the cheap checks (size on disk, type by magic
    bytes, pixel count from the header; nothing is decoded). DatasetError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    root = Path(root) if root is not None else None
    name = _shown(path, root)
    if root is not None and Path(os.path.abspath(root)) not in Path(os.path.abspath(path)).parents:
        raise DatasetError(f"{name}: the picture is outside the dataset folder {root}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise DatasetError(f"image not found: {name}") from None
    except OSError as exc:
        raise DatasetError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if size > max_bytes:
        raise DatasetError(f"{name} is {size / 1e6:.1f} MB; a picture may have at most {max_bytes / 1e6:.0f} MB")
    kind = sniff_image_type(head)
    if kind is None:
        raise DatasetError(
            f"{name} is not a PNG, JPEG or WebP picture (its first bytes say otherwise, whatever "
            "its name); convert it to one of these formats"
        )
    try:
        with Image.open(path, formats=[kind]) as img:  # lazy: the header only
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{name} looks like a {kind} file but its header cannot be read ({exc})") from None
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise DatasetError(
            f"{name} is {width} x {height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{max_pixels / 1e6:g} megapixels (a decompression-bomb guard): shrink the picture"
        )
    return kind, width, height


def open_image_checked(
    path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_FILE_BYTES,
    convert: bool = True,
):
    """Open a picture file after :func:`check_image_file`, fully decoded; RGB unless ``convert`` is False
    (then in its own mode, for a caller with its own conversion). ``root``: the dataset folder the file
    must lie in. DatasetError naming the file for anything refused or damaged."""
    from PIL import Image

    kind, _, _ = check_image_file(path, root, max_pixels, max_bytes)
    name = _shown(Path(path), Path(root) if root is not None else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=[kind]) as img:
                img.load()
                return img.convert("RGB") if convert else img.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DatasetError(f"{name} declares too many pixels to decode safely ({exc})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise DatasetError(f"{name} is a damaged or truncated {kind} file ({exc})") from None

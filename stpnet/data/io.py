"""Robust image and mask loading shared by the converters, the demo and the CLI.

Every failure raises :class:`DataError` (a ``ValueError``) whose message names the file and says what is accepted,
so a bad pair is never turned silently into a wrong training example.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# The image processor travels alone into every saved checkpoint (remote code cannot import this package), so the
# mask and alpha rules live there and this module calls them: a file means the same to the converters, the CLI and
# the Python API.
from modeling_stpnet.image_processing_stpnet import ACCEPTED_MASKS, mask_to_bool, pil_to_array, to_rgb_array

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
ACCEPTED_IMAGES = (
    "PNG/JPEG/BMP/TIFF/GIF/WebP in mode RGB, RGBA, L, LA, P (palette), 1, CMYK, YCbCr, HSV, LAB, I;16 (16-bit), I or F"
)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class DataError(ValueError):
    """A data file or annotation that cannot become a correct (image, mask, text) example."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file; raise :class:`DataError` naming the file if that is impossible."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as handle:
            handle.load()
            image = handle.copy()
            image.format = handle.format  # copy() drops the format, and we use it to decide re-encoding
            # ...and the file name, which mask errors must name; not as `filename`, which `datasets` would store
            # as a path instead of the bytes
            image._stpnet_source = str(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: unreadable image ({error}); accepted: {ACCEPTED_IMAGES}") from error
    return image


def _wide_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a >8-bit or float single-channel array to 0..255.

    Integer data is read as 16-bit (0..65535 -> 0..255) whenever it exceeds 255, so intensities mean the same across
    images of one dataset; per-image min-max stretching would make dark and bright scans look alike. Floats in
    [0, 1] are scaled by 255; other floats are treated like integers.
    """
    is_float = np.issubdtype(array.dtype, np.floating)
    array = array.astype(np.float64)
    if is_float and array.size and array.min() >= 0.0 and array.max() <= 1.0:
        return np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)
    peak = array.max() if array.size else 0
    if peak <= 255:
        scaled = array
    elif peak <= 65535:
        scaled = array / 257.0
    else:  # 32-bit data wider than 16 bits: no convention exists, stretch it
        low = array.min()
        scaled = (array - low) * (255.0 / max(peak - low, 1e-12))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def to_rgb8(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit scaled by 1/257, palettes expanded, other colour spaces (CMYK,
    YCbCr, HSV, LAB) converted by PIL, alpha composited over black as the image processor does."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        gray = _wide_to_uint8(np.asarray(image))
        return Image.fromarray(gray, mode="L").convert("RGB")
    array = pil_to_array(image)  # L, 1, RGB or RGBA after conversion
    unit = (array.astype(np.float32) / (1.0 if array.dtype == np.bool_ else 255.0)).reshape(*array.shape[:2], -1)
    rgb = np.clip(np.round(to_rgb_array(unit) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image.

    Accepts RGB, RGBA/LA (alpha composited over black), palette, grayscale, 1-bit, CMYK, YCbCr, HSV, LAB, 16-bit
    grayscale (scaled 0..65535 -> 0..255) and 32-bit integer/float images. Raises :class:`DataError` naming the file
    otherwise.
    """
    image = open_image(path)
    try:
        return to_rgb8(image)
    except (OSError, ValueError) as error:
        raise DataError(
            f"{path}: cannot convert mode {image.mode} to RGB ({error}); accepted: {ACCEPTED_IMAGES}"
        ) from error


def mask_array(image: Image.Image, threshold: int = 127) -> np.ndarray:
    """Binary lesion mask (``np.bool_``, H x W) from a PIL image of any mode.

    The rule is the image processor's (:func:`~modeling_stpnet.image_processing_stpnet.mask_to_bool`), so training,
    conversion and evaluation read a mask alike: two values ``{0, v}`` -> lesion = ``v`` (0/1, 0/255, 0/4095...);
    more values -> thresholded at ``threshold`` (0..255 scale, i.e. half the range by default) only if near-binary,
    as JPEG masks are. Label maps (``{0, 1, 2}``), images and masks whose lesion would vanish raise
    :class:`DataError` naming the file (when the image came from :func:`open_image`), the values and what is accepted.
    """
    where = str(getattr(image, "_stpnet_source", "") or getattr(image, "filename", "") or "mask")
    try:
        return mask_to_bool(image, threshold / 255.0, where=where)
    except ValueError as error:
        message = str(error)
        raise DataError(message if message.startswith(where) else f"{where}: {message}") from error


def load_mask(path: str | os.PathLike, threshold: int = 127) -> np.ndarray:
    """Load a mask file of any mode as a binary ``np.bool_`` array (see :func:`mask_array` for the rules)."""
    image = open_image(path)
    try:
        return mask_array(image, threshold)
    except OSError as error:
        raise DataError(
            f"{path}: cannot read mode {image.mode} as a mask ({error}); accepted: {ACCEPTED_MASKS}"
        ) from error


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """Binary mask -> 'L' image with values 0/255, the form stored in the datasets."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def blocking_file(path: Path) -> Path | None:
    """The file (or dangling link) that sits where ``path`` or a folder above it should be, so that nothing could be
    written there; None when ``path`` is or can become a folder. Output checks call it before long work, which would
    otherwise end in a bare FileExistsError or NotADirectoryError at the first write."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


def find_by_stem(folder: Path, stem: str, prefixes: tuple[str, ...] = ("",)) -> Path | None:
    """The image file in ``folder`` named ``<prefix><stem>.<any image extension>``, or None."""
    for prefix in prefixes:
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            candidate = folder / f"{prefix}{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

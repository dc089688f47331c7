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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
ACCEPTED_IMAGES = (
    "PNG/JPEG/BMP/TIFF/GIF/WebP in mode RGB, RGBA, L, LA, P (palette), 1, CMYK, YCbCr, I;16 (16-bit), I or F"
)


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
    """Convert any PIL mode to 8-bit RGB (16-bit scaled by 1/257, alpha dropped, palettes expanded)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _wide_to_uint8(np.asarray(image))
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        # palette images may carry transparency; going through RGBA keeps PIL from warning and drops it cleanly
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load an image file as an 8-bit RGB PIL image.

    Accepts RGB, RGBA/LA (alpha dropped), palette, grayscale, 1-bit, CMYK, 16-bit grayscale (scaled 0..65535 ->
    0..255) and 32-bit integer/float images. Raises :class:`DataError` naming the file otherwise.
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

    Rules, so that common mask encodings all work:
      * 0/1 masks (maximum value 1, any bit depth) -> foreground = value > 0;
      * palette masks -> foreground = palette index > 0 (index 0 is background by convention);
      * 16-bit / 32-bit / float masks are scaled to 8 bit like images, then thresholded;
      * colour masks -> foreground where the brightest channel is above ``threshold`` (a red mask works);
      * RGBA/LA masks whose colour is constant use the alpha channel instead.
    ``threshold`` is on the 0..255 scale; JPEG masks need it because compression blurs the 0/255 edges.
    """
    if image.mode == "1":
        return np.asarray(image, dtype=bool).copy()
    if image.mode == "P":
        return np.asarray(image) > 0
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        raw = np.asarray(image)
        if raw.size and raw.max() <= 1:
            return raw > 0
        return _wide_to_uint8(raw) > threshold
    if image.mode in ("RGBA", "LA", "PA"):
        colour = np.asarray(image.convert("RGB" if image.mode != "LA" else "L"))
        alpha = np.asarray(image.getchannel("A"))
        if colour.size and colour.min() == colour.max() and alpha.min() != alpha.max():
            return alpha > threshold
        image = image.convert("RGB" if image.mode != "LA" else "L")
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    values = np.asarray(image)
    if values.ndim == 3:
        values = values.max(axis=2)
    if values.size and values.max() <= 1:
        return values > 0
    return values > threshold


def load_mask(path: str | os.PathLike, threshold: int = 127) -> np.ndarray:
    """Load a mask file of any mode as a binary ``np.bool_`` array (see :func:`mask_array` for the rules)."""
    image = open_image(path)
    try:
        return mask_array(image, threshold)
    except (OSError, ValueError) as error:
        raise DataError(
            f"{path}: cannot read mode {image.mode} as a binary mask ({error}); accepted: {ACCEPTED_IMAGES}"
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

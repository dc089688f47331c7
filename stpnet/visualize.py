"""Mask overlays: the one place STPNet draws masks on images (demo, ``stpnet-predict`` and evaluation).

One colour code everywhere: the **prediction is green** (``LESION_COLOUR``), the **ground truth blue**
(``TRUTH_COLOUR``). Pure numpy + PIL, so it works wherever the model does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LESION_COLOUR = (0, 255, 128)  # the prediction; spring green stands out on red/pink endoscopy and gray X-rays alike
TRUTH_COLOUR = (40, 120, 255)  # the ground truth; blue, so that green always means "the model's mask"
TRUE_POSITIVE = (40, 200, 70)
FALSE_POSITIVE = (255, 72, 0)
FALSE_NEGATIVE = TRUTH_COLOUR  # truth the prediction missed


def mask_boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` that touch the background (4-neighbourhood), grown inwards to ``width`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(max(int(width), 1)):
        # Erode by one pixel; pad with background so lesions touching the border still get an outline there.
        padded = np.pad(inner, 1, constant_values=False)
        inner = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )  # fmt: skip
    return mask & ~inner


def _check(image: Image.Image, mask: np.ndarray, what: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape != (image.height, image.width):
        raise ValueError(
            f"The {what} is {tuple(mask.shape)} but the image is {image.height}x{image.width} (height x width)"
        )
    return mask.astype(bool)


def _line_width(image: Image.Image) -> int:
    # About 0.4 % of the short side, so outlines stay visible on both 128 px thumbnails and 4k scans.
    return max(1, round(min(image.size) / 250))


def overlay_mask(
    image: Image.Image,
    mask: np.ndarray,
    colour: tuple[int, int, int] = LESION_COLOUR,
    alpha: float = 0.4,
    outline: bool = True,
) -> Image.Image:
    """The image (RGB) with the mask tinted in ``colour`` and, by default, outlined in full colour.

    Args:
        image: any PIL image; it is converted to RGB.
        mask: ``(H, W)`` boolean/0-1 array matching the image.
        alpha: opacity of the tint inside the lesion.
        outline: draw the lesion boundary opaque, so small lesions stay visible under a light tint.
    """
    return overlay_masks(image, [(mask, colour)], alpha=alpha, outline=outline)


def overlay_masks(
    image: Image.Image,
    layers: list[tuple[np.ndarray, tuple[int, int, int]]],
    alpha: float = 0.4,
    outline: bool = True,
) -> Image.Image:
    """Several ``(mask, colour)`` layers tinted on one image, later layers on top."""
    rgb = image.convert("RGB")
    out = np.asarray(rgb, dtype=np.float32).copy()
    width = _line_width(rgb)
    for mask, colour in layers:
        mask = _check(rgb, mask)
        tint = np.asarray(colour, dtype=np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * tint
        if outline:
            out[mask_boundary(mask, width)] = tint
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), mode="RGB")


def comparison_overlay(
    image: Image.Image, prediction: np.ndarray, truth: np.ndarray, alpha: float = 0.45
) -> Image.Image:
    """Prediction against ground truth: true positives green, false positives red, false negatives blue."""
    rgb = image.convert("RGB")
    prediction, truth = _check(rgb, prediction, "prediction"), _check(rgb, truth, "ground truth")
    layers = [
        (prediction & truth, TRUE_POSITIVE),
        (prediction & ~truth, FALSE_POSITIVE),
        (~prediction & truth, FALSE_NEGATIVE),
    ]
    # Outlines of the three disjoint regions would draw spurious edges between them; outline the truth instead.
    tinted = overlay_masks(rgb, layers, alpha=alpha, outline=False)
    out = np.asarray(tinted).copy()
    out[mask_boundary(truth, _line_width(rgb))] = FALSE_NEGATIVE
    return Image.fromarray(out, mode="RGB")


def side_by_side(
    images: list[Image.Image], gap: int = 4, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Images pasted left to right at a common height (for reports and figures)."""
    if not images:
        raise ValueError("No images to place side by side")
    height = max(im.height for im in images)
    scaled = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), background)
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def titled(
    image: Image.Image, title: str, swatch: tuple[int, int, int] | None = None, font_size: int | None = None
) -> Image.Image:
    """The image under a white band holding ``title``, after a square of ``swatch`` when given (the legend of the
    mask colour drawn in the image). The font scales with the image (at least 11 px) and shrinks, down to 8 px,
    until the title fits the width."""
    rgb = image.convert("RGB")
    size = font_size or max(11, round(rgb.height / 14))
    font = ImageFont.load_default(size=size)
    box = size if swatch else 0
    while size > 8 and box + size // 2 + font.getlength(title) > rgb.width - 4:
        size -= 1
        font, box = ImageFont.load_default(size=size), size if swatch else 0
    band = size + size // 2 + 4
    canvas = Image.new("RGB", (rgb.width, rgb.height + band), (255, 255, 255))
    canvas.paste(rgb, (0, band))
    draw = ImageDraw.Draw(canvas)
    x = 2
    if swatch:
        top = (band - box) // 2
        draw.rectangle([x, top, x + box - 1, top + box - 1], fill=swatch, outline=(0, 0, 0))
        x += box + size // 2
    draw.text((x, band // 2), title, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas

"""Inference with a trained STPNet: images in; masks, overlays and a CSV of descriptions and lesion areas out.

Command line (:mod:`stpnet.inference.cli`; also ``python -m stpnet.inference.cli``)::

    stpnet-predict sample/kvasir-seg-mini/images --output-dir predictions      # checkpoints/stpnet-kvasir-seg

Python (the Gradio demo uses the same functions; :func:`load_checkpoint` is also the loader of evaluation and
ONNX export)::

    predictor = load_predictor("checkpoints/stpnet-kvasir-seg")
    prediction = predictor.predict([prepare_image("polyp.jpg").image])[0]
    prediction.description, prediction.lesion_percent
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modeling_stpnet.image_processing_stpnet import MIN_SIDE
from stpnet.data.io import DataError, load_image, mask_to_image
from stpnet.inference.checkpoint_loading import (  # noqa: F401  (re-exported: the public import path of these names)
    CHECKPOINT_ENV,
    DEFAULT_CHECKPOINT,
    PROCESSOR_FILE,
    REPO_ROOT,
    SHAPELESS_FIELDS,
    WEIGHT_FILES,
    CheckpointError,
    is_hub_id,
    load_checkpoint,
    missing_checkpoint_help,
    resolve_checkpoint,
    resolve_device,
)
from stpnet.optimize import optimize_for_inference
from stpnet.visualize import overlay_mask

# The network sees ~128-224 px, so larger inputs only cost memory: they are downscaled to this many pixels first.
MAX_PIXELS = 4096 * 4096
# Refused before decoding; PIL itself refuses twice its MAX_IMAGE_PIXELS (~179 MP) as a decompression bomb.
MAX_DECODE_PIXELS = 100_000_000


@dataclass
class PreparedImage:
    """An RGB image ready for the model, with notes on what was done to it."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) of the file
    notes: list[str] = field(default_factory=list)


def prepare_image(
    path: str | os.PathLike, max_pixels: int = MAX_PIXELS, max_decode_pixels: int = MAX_DECODE_PIXELS
) -> PreparedImage:
    """Load any supported image file as RGB (via :func:`~stpnet.data.io.load_image`), guarding its size.

    Images above ``max_pixels`` are downscaled (the mask then matches the downscaled image and a note says so);
    images above ``max_decode_pixels`` and decompression bombs are refused before decoding. Raises
    :class:`~stpnet.data.io.DataError` with a message for people otherwise.
    """
    name = Path(path).name
    size = _peek_size(path)
    if size is not None and size[0] * size[1] > max_decode_pixels:
        raise DataError(
            f"{name}: the image is {size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} megapixels), more than "
            f"the {max_decode_pixels / 1e6:.0f} megapixels accepted; downscale it first"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # sizes were checked above
        image = load_image(path)
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise DataError(f"{name}: the image is only {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    notes = []
    if width * height > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        new_size = (max(MIN_SIDE, int(width * scale)), max(MIN_SIDE, int(height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        notes.append(
            f"downscaled from {width}x{height} to {new_size[0]}x{new_size[1]} pixels (limit {max_pixels / 1e6:.2g} "
            "megapixels); the mask and areas refer to the downscaled image"
        )
    return PreparedImage(image=image, original_size=(width, height), notes=notes)


def _peek_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from the header without decoding, or None where the header is unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                return handle.size
    except Image.DecompressionBombError as error:  # not an OSError, so load_image would not catch it
        raise DataError(f"{Path(path).name}: the image is too large to open safely ({error})") from error
    except Exception:
        return None  # load_image reports precisely why the file is unreadable


# ---------------------------------------------------------------------------------------------- prediction
@dataclass
class Prediction:
    """The model's answer for one image."""

    image: Image.Image  # the RGB image the mask belongs to
    mask: np.ndarray  # (H, W) bool, True = lesion
    # the mask's verdict first: NO_LESION_DESCRIPTION when the mask is empty, else the retrieved sentences joined by
    # the repository's template; None for a checkpoint without text
    description: str | None
    categories: list[dict[str, Any]]  # per category: category, sentence, probability, probabilities
    seconds: float  # inference time of this image (its share of the batch), model loading excluded
    notes: list[str] = field(default_factory=list)
    retrieved_description: str | None = None  # the retrieved sentences, also when the mask is empty

    @property
    def lesion_pixels(self) -> int:
        return int(self.mask.sum())

    @property
    def lesion_percent(self) -> float:
        return 100.0 * self.lesion_pixels / max(self.mask.size, 1)

    def overlay(self) -> Image.Image:
        return overlay_mask(self.image, self.mask)

    def mask_image(self) -> Image.Image:
        return mask_to_image(self.mask)


class FlipAveraged(torch.nn.Module):
    """Test-time augmentation: the mask logits averaged (as probabilities) over the image and its horizontal and
    vertical mirrors, three forward passes in all. Everything else, the retrieved sentences included, comes from the
    unmirrored pass: a mirror swaps left and right (and top and bottom) in the descriptions.

    Forward: ``pixel_values`` ``(B, C, H, W)`` → the wrapped model's output with ``logits`` ``(B, 1, H, W)`` replaced.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, pixel_values: torch.Tensor) -> Any:
        outputs = self.model(pixel_values=pixel_values)
        probabilities = outputs.logits.float().sigmoid()
        for dims in ((-1,), (-2,)):
            mirrored = self.model(pixel_values=pixel_values.flip(dims)).logits
            probabilities = probabilities + mirrored.float().sigmoid().flip(dims)
        outputs.logits = torch.logit(probabilities / 3, eps=1e-6).to(outputs.logits.dtype)
        return outputs


class STPNetPredictor:
    """A loaded checkpoint (model + image processor) that turns RGB images into :class:`Prediction` objects."""

    def __init__(self, model: torch.nn.Module, processor: Any, name: str, notes: Sequence[str] = ()) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.notes = list(notes)
        self._lock = threading.Lock()  # one forward at a time: Gradio serves requests from several threads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self) -> Any:
        return self.model.config

    @classmethod
    def from_pretrained(cls, name_or_path: str, device: str | torch.device | None = "auto") -> STPNetPredictor:
        """Load through :func:`load_checkpoint` (local folder or Hub id) onto ``device``."""
        target = resolve_device(device)
        model, processor, notes = load_checkpoint(name_or_path)
        return cls(optimize_for_inference(model.to(target), target.type == "cpu"), processor, str(name_or_path), notes)

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image], threshold: float = 0.5, tta: bool = False) -> list[Prediction]:
        """One :class:`Prediction` per RGB image, in order (one batch; split long lists yourself); ``tta`` averages
        the mask over mirrored copies (:class:`FlipAveraged`, three times the compute)."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
        if not images:
            return []
        with self._lock:
            start = time.perf_counter()
            inputs = self.processor(list(images), return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self.model.dtype)
            outputs = (FlipAveraged(self.model) if tta else self.model)(pixel_values=pixel_values)
            sizes = [(im.height, im.width) for im in images]
            masks = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, threshold=threshold)
            masks = [m.cpu().numpy().astype(bool) for m in masks]
            if getattr(outputs, "retrieval_logits", None) is not None:
                described = self.processor.post_process_description(outputs, self.model.config, masks=masks)
            else:  # a checkpoint trained without text (use_text=False) retrieves nothing
                described = [{"description": None, "categories": []}] * len(images)
            seconds = (time.perf_counter() - start) / len(images)
        return [
            Prediction(
                image=im,
                mask=m,
                description=d["description"],
                categories=d["categories"],
                seconds=seconds,
                retrieved_description=d.get("retrieved_description"),
            )
            for im, m, d in zip(images, masks, described)
        ]


def _cache_key(name: str) -> tuple[str, float]:
    """Checkpoint name plus the modification time of its weights, so a re-trained checkpoint is reloaded."""
    weights = Path(name) / "model.safetensors"
    return name, weights.stat().st_mtime if weights.is_file() else 0.0


@functools.lru_cache(maxsize=3)
def _load_cached(name: str, mtime: float, device: str) -> STPNetPredictor:
    predictor = STPNetPredictor.from_pretrained(name, device=device)
    # The first forward pays one-off costs (allocator, kernel selection); pay them here so reported times are typical.
    predictor.predict([Image.new("RGB", (64, 64), (128, 64, 64))])
    return predictor


_load_lock = threading.Lock()


def load_predictor(name_or_path: str | os.PathLike | None = None, device: str = "auto") -> STPNetPredictor:
    """The cached predictor for a checkpoint (see :func:`resolve_checkpoint` for how ``None`` is resolved)."""
    name = resolve_checkpoint(name_or_path)
    with _load_lock:  # two first requests must not load the same checkpoint twice
        return _load_cached(*_cache_key(name), str(resolve_device(device)))

"""Image processor of STPNet: any image in, normalised `pixel_values` out; logits back to masks and sentences."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MIN_SIDE = 8
ACCEPTED = (
    "PIL images (RGB, L, LA, RGBA, P, I;16, I, F, 1), numpy arrays or torch tensors shaped (H, W), (H, W, C) or "
    "(C, H, W) with C in {1, 3, 4}, of dtype uint8, uint16, bool, integer or float in [0, 1]"
)


def to_float_array(image: Any, what: str = "image") -> np.ndarray:
    """Any supported image → `(H, W, C)` float32 in [0, 1], C in {1, 3, 4}. Raises `ValueError` saying why not."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow ships with every install of ours
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            array = np.asarray(image, dtype=np.uint16)
        elif image.mode in ("P", "LA", "PA"):
            array = np.asarray(image.convert("RGBA"))
        elif image.mode == "CMYK":
            array = np.asarray(image.convert("RGB"))
        else:
            array = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(f"Unsupported {what} type {type(image).__name__}; accepted: {ACCEPTED}")

    if array.size == 0:
        raise ValueError(f"The {what} is empty (shape {array.shape})")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first → last
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Unsupported {what} shape {array.shape}; accepted: {ACCEPTED}")
    if min(array.shape[:2]) < MIN_SIDE:
        raise ValueError(
            f"The {what} is {array.shape[1]}x{array.shape[0]} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed"
        )
    return _scale_to_unit(array, what)


def _scale_to_unit(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(f"Integer {what} values must lie in [0, 65535], got [{low}, {high}]")
        return array.astype(np.float32) / (255.0 if high <= 255 else 65535.0)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"The {what} contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise ValueError(f"Float {what} values must lie in [0, 1], got [{low:.3g}, {high:.3g}]")
        return array
    raise ValueError(f"Unsupported {what} dtype {array.dtype}; accepted: {ACCEPTED}")


def _to_rgb(array: np.ndarray) -> np.ndarray:
    """`(H, W, C)` in [0, 1] → `(H, W, 3)`: gray is repeated, alpha composited over black."""
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        return array[..., :3] * array[..., 3:]
    return array


def _to_binary_mask(array: np.ndarray, threshold: float) -> np.ndarray:
    """`(H, W, C)` in [0, 1] → `(H, W)` float {0, 1}. 0/1 label images count as binary, not as dark grays."""
    gray = array[..., :3].max(-1) if array.shape[-1] >= 3 else array[..., 0]
    top = float(gray.max())
    if 0 < top <= 1 / 255 + 1e-6:  # stored 0/1 in an 8-bit image
        return (gray > 0).astype(np.float32)
    return (gray > threshold).astype(np.float32)


class STPNetImageProcessor(BaseImageProcessor):
    r"""Prepares images (and masks) for STPNet and turns its outputs back into masks and sentences.

    Args:
        size (`dict`, defaults to `{"height": 224, "width": 224}`): model input size (multiples of 32).
        do_resize (`bool`): resize to `size` (bilinear with antialiasing; masks are thresholded after resizing).
        do_normalize (`bool`), image_mean, image_std: normalisation after scaling to [0, 1] (ImageNet statistics).
        mask_threshold (`float`, defaults to 0.5): masks are binarised at this fraction of their range, so JPEG
            masks with values near 0/255 come out clean.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        do_resize: bool = True,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        mask_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        if self.size.get("height", 0) % 32 or self.size.get("width", 0) % 32 or min(self.size.values()) < 32:
            raise ValueError(f"size must have height and width that are positive multiples of 32, got {self.size}")
        self.do_resize = do_resize
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.mask_threshold = mask_threshold

    def __call__(self, images: Any, segmentation_maps: Any = None, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, segmentation_maps=segmentation_maps, **kwargs)

    def _resize(self, tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(tensor.shape[-2:]) == size:
            return tensor
        return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)

    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any = None,
        size: dict[str, int] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Images (one or a list) → `pixel_values` `(B, 3, H, W)` float32; masks → `labels` `(B, H, W)` in {0, 1}.

        Also returns `original_sizes` `(B, 2)` (height, width before resizing) for post-processing.
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("No images were given")
        size = size or self.size
        target = (int(size["height"]), int(size["width"]))
        pixel_values, original_sizes = [], []
        for i, image in enumerate(images):
            array = _to_rgb(to_float_array(image, what=f"image {i}"))
            original_sizes.append(array.shape[:2])
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
            if self.do_resize:
                tensor = self._resize(tensor, target)
            if self.do_normalize:
                mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
                std = torch.tensor(self.image_std).view(1, 3, 1, 1)
                tensor = (tensor - mean) / std
            pixel_values.append(tensor[0])
        data: dict[str, Any] = {
            "pixel_values": torch.stack(pixel_values).float(),
            "original_sizes": torch.tensor(original_sizes),
        }
        if segmentation_maps is not None:
            masks = list(segmentation_maps) if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
            if len(masks) != len(images):
                raise ValueError(f"Got {len(images)} images but {len(masks)} masks")
            labels = []
            for i, (mask, image_size) in enumerate(zip(masks, original_sizes)):
                binary = _to_binary_mask(to_float_array(mask, what=f"mask {i}"), self.mask_threshold)
                if binary.shape != tuple(image_size):
                    raise ValueError(
                        f"Mask {i} is {binary.shape[1]}x{binary.shape[0]} but its image is "
                        f"{image_size[1]}x{image_size[0]} (width x height); a mask must match its image"
                    )
                tensor = torch.from_numpy(binary)[None, None]
                if self.do_resize:
                    tensor = (self._resize(tensor, target) > 0.5).float()
                labels.append(tensor[0, 0])
            data["labels"] = torch.stack(labels)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------ post-processing
    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: list[tuple[int, int]] | torch.Tensor | None = None, threshold: float = 0.5
    ) -> list[torch.Tensor]:
        """Model outputs → one `(H, W)` long mask per image (1 = lesion), at `target_sizes` if given."""
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(logits)} predictions but {len(target_sizes)} target sizes")
        masks = []
        for i in range(len(logits)):
            item = logits[i : i + 1].float()
            if target_sizes is not None:
                h, w = (int(v) for v in target_sizes[i])
                item = F.interpolate(item, size=(h, w), mode="bilinear", align_corners=False)
            masks.append((torch.sigmoid(item[0, 0]) > threshold).long())
        return masks

    def post_process_description(self, outputs: Any, config: Any) -> list[dict[str, Any]]:
        """What the model sees: per image, the retrieved sentence and its probability per category.

        Args:
            outputs: model outputs with `retrieval_logits`.
            config: the model's `STPNetConfig` (it holds the repository's sentences).

        Returns:
            per image `{"description": str, "categories": [{"category", "index", "sentence", "probability",
            "probabilities": {sentence: p}}]}`.
        """
        retrieval = outputs.retrieval_logits if hasattr(outputs, "retrieval_logits") else outputs["retrieval_logits"]
        if retrieval is None:
            raise ValueError("These outputs carry no retrieval logits (a model built with use_text=False)")
        probs = [r.float().softmax(-1).cpu() for r in retrieval]
        results = []
        for b in range(len(probs[0])):
            categories, chosen = [], {}
            for name, sentences, p in zip(config.text_categories, config.text_sentences, probs):
                index = int(p[b].argmax())
                chosen[name] = sentences[index]
                categories.append({
                    "category": name,
                    "index": index,
                    "sentence": sentences[index],
                    "probability": float(p[b, index]),
                    "probabilities": {s: float(v) for s, v in zip(sentences, p[b])},
                })  # fmt: skip
            template = config.text_description_template or ", ".join("{" + c + "}" for c in chosen) + "."
            results.append({"description": template.format(**chosen), "categories": categories})
        return results


STPNetImageProcessor.register_for_auto_class("AutoImageProcessor")

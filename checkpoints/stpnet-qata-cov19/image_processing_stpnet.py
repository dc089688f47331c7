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
# What post_process_description says when the mask is empty: the retrieval network always picks a sentence per
# category ("one polyp, small polyp, ..."), and a description of a lesion the mask does not show would contradict it.
NO_LESION_DESCRIPTION = "No lesion found: the predicted mask is empty."
ACCEPTED = (
    "PIL images (RGB, L, LA, RGBA, P, PA, 1, I;16, I, F, and CMYK, YCbCr, HSV, LAB converted to RGB), numpy arrays "
    "or torch tensors shaped (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}, of dtype uint8, uint16, bool, "
    "integer or float in [0, 1]; alpha is composited over black"
)
# A near-binary mask (JPEG noise around 0 and the top of the range) has almost no pixels in the middle half of its
# range; a photo, an X-ray or a gradient has a fifth or more there, so 5% separates them with a wide margin.
MASK_MIDDLE_TOLERANCE = 0.05
ACCEPTED_MASKS = (
    "a binary mask with exactly two values {0, v}, v being the lesion (0/1, 0/255, 0/4095, 0/65535, 0/0.3...), or a "
    "near-binary one (e.g. a JPEG mask: values near 0 and near the top of the range, at most "
    f"{MASK_MIDDLE_TOLERANCE:.0%} of pixels in the middle half); gray, colour (the brightest channel counts), "
    "RGBA/LA with a constant colour (the alpha channel counts), palette (index > 0 is lesion), 1-bit, 8/16-bit "
    "or float"
)


def pil_to_array(image: Any, palette_as_index: bool = False) -> np.ndarray:
    """A PIL image as a numpy array in a mode the rest understands: L/RGB/RGBA (uint8), 1 (bool), 16-bit, I or F.

    Colour spaces other than RGB (CMYK, YCbCr, HSV, LAB...) are converted by PIL, because their bands read as RGB
    would give wrong colours (HSV red would become cyan); modes PIL cannot convert raise a `ValueError` saying so.
    Palette images are expanded to RGBA, or kept as indices when ``palette_as_index`` (masks: index 0 is background).
    """
    mode = image.mode
    if mode in ("1", "L", "RGB", "RGBA", "I", "F") or (mode == "P" and palette_as_index):
        return np.asarray(image)
    if mode.startswith("I;16"):
        return np.asarray(image, dtype=np.uint16)
    bands = image.getbands()
    target = "RGBA" if ("A" in bands or "a" in bands or mode == "P") else "RGB"
    try:
        return np.asarray(image.convert(target))
    except (ValueError, OSError) as error:
        raise ValueError(f"Cannot convert PIL mode {mode} to {target} ({error}); accepted: {ACCEPTED}") from error


def _as_hwc(image: Any, what: str, palette_as_index: bool = False, min_side: int = MIN_SIDE) -> np.ndarray:
    """Any supported image → its raw values as `(H, W, C)`, C in {1, 3, 4}, dtype unchanged."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow ships with every install of ours
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        array = pil_to_array(image, palette_as_index)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float32, torch.float64):
            tensor = tensor.float()  # numpy has no bfloat16 or float8; float32 holds their values exactly
        try:
            array = tensor.numpy()
        except (TypeError, RuntimeError) as error:  # sparse, quantized or other tensors numpy cannot view
            raise ValueError(
                f"Unsupported {what} tensor ({tensor.dtype}, {tensor.layout}); accepted: {ACCEPTED}"
            ) from error
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
    if min(array.shape[:2]) < min_side:
        raise ValueError(
            f"The {what} is {array.shape[1]}x{array.shape[0]} pixels; at least {min_side}x{min_side} is needed"
        )
    return array


def to_float_array(image: Any, what: str = "image") -> np.ndarray:
    """Any supported image → `(H, W, C)` float32 in [0, 1], C in {1, 3, 4}. Raises `ValueError` saying why not."""
    return _scale_to_unit(_as_hwc(image, what), what)


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


def to_rgb_array(array: np.ndarray) -> np.ndarray:
    """`(H, W, C)` in [0, 1] → `(H, W, 3)`: gray is repeated, alpha (C = 2 or 4) composited over black.

    The one alpha rule of the package (``data.io.to_rgb8`` uses it too), so a file gives the same model input from
    the CLI and from the Python API. Black, because the colour under a transparent pixel is undefined and STPNet's
    training images have black borders (and rotations pad with black).
    """
    channels = array.shape[-1]
    if channels in (2, 4):
        array = array[..., :-1] * array[..., -1:]
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array


# ---------------------------------------------------------------------------------------------------- masks
def _mask_channel(array: np.ndarray) -> np.ndarray:
    """`(H, W, C)` mask values → `(H, W)`: the brightest colour channel (a red mask works), or alpha when the
    colour is constant and alpha is not (a lesion drawn as opacity)."""
    if array.shape[-1] == 1:
        return array[..., 0]
    colour = array[..., :3]
    if array.shape[-1] == 4:
        alpha = array[..., 3]
        if colour.min() == colour.max() and alpha.min() != alpha.max():
            return alpha
    return colour.max(axis=-1)


def _mask_range(values: np.ndarray, where: str) -> float:
    """Full scale of a mask's values: 1 for bool and floats in [0, 1], else the bit depth (8, 12 or 16 bit)."""
    if values.dtype == np.bool_:
        return 1.0
    is_float = np.issubdtype(values.dtype, np.floating)
    if not is_float and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{where}: unsupported mask dtype {values.dtype}; accepted: {ACCEPTED_MASKS}")
    if is_float and not np.isfinite(values).all():
        raise ValueError(f"{where}: the mask contains NaN or infinite values; accepted: {ACCEPTED_MASKS}")
    low, high = values.min(), values.max()
    if low < 0:
        raise ValueError(f"{where}: negative mask values (minimum {low:g}); accepted: {ACCEPTED_MASKS}")
    if is_float and high <= 1.0:
        return 1.0
    for bits in (8, 12, 16):  # 12-bit masks (0/4095 in uint16) are common in medical imaging
        if high <= 2**bits - 1:
            return float(2**bits - 1)
    raise ValueError(f"{where}: mask values up to {high} exceed 16 bits; accepted: {ACCEPTED_MASKS}")


def _distinct(values: np.ndarray) -> np.ndarray:
    if values.dtype == np.uint8:  # the common case, and much faster than sorting
        return np.flatnonzero(np.bincount(values.ravel(), minlength=256)).astype(np.uint8)
    return np.unique(values)


def _format_values(distinct: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in distinct[:8].tolist())
    if distinct.size > 8:
        return f"{{{shown}, ..., {distinct[-1]:g}}}, {distinct.size} distinct values"
    return f"{{{shown}}}"


def mask_to_bool(mask: Any, threshold: float = 0.5, where: str = "mask", min_side: int = 1) -> np.ndarray:
    """Binary lesion mask `(H, W)` bool from a mask in any supported form: the one mask rule of the package.

    * exactly two values ``{0, v}`` → lesion where the value is ``v``, whatever ``v`` (0/1, 0/255, 0/4095, 0/65535,
      a soft 0/0.3), so no encoding loses its lesion to a fixed threshold; one value → empty if 0, else all lesion;
    * more values → lesion above ``threshold`` (a fraction of the range: 1, or 255/4095/65535 by bit depth), only
      if the mask is near-binary (at most `MASK_MIDDLE_TOLERANCE` of pixels in the middle half, like JPEG noise);
    * anything else raises a `ValueError` starting with ``where`` that names the values found and what is accepted:
      several small labels (``{0, 1, 2}``: a multi-class label map), nothing reaching the threshold, or an image.
    Colour masks use their brightest channel; RGBA with constant colour uses alpha; palette masks use the index.
    """
    values = _mask_channel(_as_hwc(mask, where, palette_as_index=True, min_side=min_side))
    scale = _mask_range(values, where)
    distinct = _distinct(values)
    if distinct.size == 1:
        return np.full(values.shape, bool(distinct[0] > 0))
    if distinct.size == 2 and distinct[0] == 0:
        return values > 0
    unit = values.astype(np.float32) / scale
    lesion = unit > threshold
    middle = float(((unit > 0.25) & (unit < 0.75)).mean())
    # A few integer values with no lesion above the threshold ({0, 1, 2}) or with whole regions mid-range
    # ({0, 128, 255}) are class labels, not compression noise, which spreads over many values.
    labels = bool(np.all(distinct == np.round(distinct))) and distinct.size >= 3
    if labels and (
        (not lesion.any() and distinct[-1] <= 32) or (middle > MASK_MIDDLE_TOLERANCE and distinct.size <= 8)
    ):
        raise ValueError(
            f"{where}: the mask values {_format_values(distinct)} look like a label map with several classes; "
            "STPNet segments one lesion class: map your lesion label to 255 and every other value to 0 "
            f"(e.g. np.where(mask == label, 255, 0)). Accepted: {ACCEPTED_MASKS}"
        )
    if not lesion.any():
        raise ValueError(
            f"{where}: no mask value is above {threshold * scale:.4g} ({threshold:.0%} of the range 0..{scale:g}; "
            f"values found: {_format_values(distinct)}), so the lesion is ambiguous and would be lost; accepted: "
            f"{ACCEPTED_MASKS}"
        )
    if middle > MASK_MIDDLE_TOLERANCE:
        raise ValueError(
            f"{where}: not a binary mask: {middle:.0%} of its pixels lie in the middle of the range 0..{scale:g} "
            f"(values found: {_format_values(distinct)}; at most {MASK_MIDDLE_TOLERANCE:.0%} is accepted as "
            f"compression noise). Is this an image rather than a mask? Accepted: {ACCEPTED_MASKS}"
        )
    return lesion


class STPNetImageProcessor(BaseImageProcessor):
    r"""Prepares images (and masks) for STPNet and turns its outputs back into masks and sentences.

    Args:
        size (`dict`, defaults to `{"height": 224, "width": 224}`): model input size (multiples of 32).
        do_resize (`bool`): resize to `size` (bilinear with antialiasing; masks are thresholded after resizing).
        do_normalize (`bool`), image_mean, image_std: normalisation after scaling to [0, 1] (ImageNet statistics).
        mask_threshold (`float`, defaults to 0.5): near-binary masks (e.g. JPEG masks with values near 0/255) are
            binarised at this fraction of their range; see `mask_to_bool` for the whole rule.
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
            array = to_rgb_array(to_float_array(image, what=f"image {i}"))
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
                binary = mask_to_bool(mask, self.mask_threshold, where=f"mask {i}", min_side=MIN_SIDE)
                if binary.shape != tuple(image_size):
                    raise ValueError(
                        f"Mask {i} is {binary.shape[1]}x{binary.shape[0]} but its image is "
                        f"{image_size[1]}x{image_size[0]} (width x height); a mask must match its image"
                    )
                tensor = torch.from_numpy(binary.astype(np.float32))[None, None]
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

    def post_process_description(
        self, outputs: Any, config: Any, masks: list[Any] | None = None, threshold: float = 0.5
    ) -> list[dict[str, Any]]:
        """What the model sees: per image, the retrieved sentence and its probability per category, and the mask's
        verdict first: where the predicted mask is empty the description says that no lesion was found.

        Args:
            outputs: model outputs with `retrieval_logits` (and `logits`, for the verdict).
            config: the model's `STPNetConfig` (it holds the repository's sentences).
            masks: the masks of `post_process_semantic_segmentation`, when the verdict must follow them exactly
                (e.g. after resizing); by default the logits at the model's resolution, thresholded at `threshold`.
            threshold: the lesion probability threshold of the default verdict.

        Returns:
            per image `{"description": str, "retrieved_description": str, "lesion_found": bool or None,
            "categories": [{"category", "index", "sentence", "probability", "probabilities": {sentence: p}}]}`:
            `description` is `NO_LESION_DESCRIPTION` where the mask is empty, else the retrieved sentences joined
            (`retrieved_description`, always given); `lesion_found` is None for outputs without `logits`.
        """
        retrieval = outputs.retrieval_logits if hasattr(outputs, "retrieval_logits") else outputs["retrieval_logits"]
        if retrieval is None:
            raise ValueError("These outputs carry no retrieval logits (a model built with use_text=False)")
        found = self._lesion_found(outputs, masks, threshold, len(retrieval[0]))
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
            retrieved = template.format(**chosen)
            results.append({
                "description": NO_LESION_DESCRIPTION if found[b] is False else retrieved,
                "retrieved_description": retrieved,
                "lesion_found": found[b],
                "categories": categories,
            })  # fmt: skip
        return results

    @staticmethod
    def _lesion_found(outputs: Any, masks: list[Any] | None, threshold: float, count: int) -> list[bool | None]:
        """Per image, whether the predicted mask has any lesion pixel (None where the outputs carry no logits)."""
        if masks is not None:
            if len(masks) != count:
                raise ValueError(f"Got {count} predictions but {len(masks)} masks")
            return [bool(torch.as_tensor(np.asarray(m)).any()) for m in masks]
        logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        if logits is None:
            return [None] * count
        # Bilinear resizing never exceeds the largest logit, so a mask empty here is empty at every target size.
        return [bool((torch.sigmoid(item.float()) > threshold).any()) for item in logits]


STPNetImageProcessor.register_for_auto_class("AutoImageProcessor")

"""Inference with a trained STPNet: images in; masks, overlays and a CSV of descriptions and lesion areas out.

Command line (:mod:`modeling_stpnet.predict_cli`; also ``python -m modeling_stpnet.predict``)::

    stpnet-predict --model outputs/sample-tiny/best sample/kvasir-seg-mini/images --output-dir predictions

Python (the Gradio demo uses the same functions; :func:`load_checkpoint` is also the loader of evaluation and
ONNX export)::

    predictor = load_predictor("outputs/sample-tiny/best")
    prediction = predictor.predict([prepare_image("polyp.jpg").image])[0]
    prediction.description, prediction.lesion_percent
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data.io import DataError, load_image, mask_to_image
from .image_processing_stpnet import MIN_SIDE, STPNetImageProcessor
from .messages import first_few
from .optimize import optimize_for_inference
from .visualize import overlay_mask

# The Kvasir-SEG model committed with the repository (its card: checkpoints/stpnet-kvasir-seg/README.md).
DEFAULT_CHECKPOINT = "checkpoints/stpnet-kvasir-seg"
CHECKPOINT_ENV = "STPNET_CHECKPOINT"
# The network sees ~128-224 px, so larger inputs only cost memory: they are downscaled to this many pixels first.
MAX_PIXELS = 4096 * 4096
# Refused before decoding; PIL itself refuses twice its MAX_IMAGE_PIXELS (~179 MP) as a decompression bomb.
MAX_DECODE_PIXELS = 100_000_000
REPO_ROOT = Path(__file__).resolve().parents[1]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
PROCESSOR_FILE = "preprocessor_config.json"
# safetensors only: a pickled pytorch_model.bin can run code when it is loaded, and this package never writes one
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# Config fields that change what the network computes but no weight's name or shape, so weights load under an
# edited value without any report; they are compared with the training recipe instead.
SHAPELESS_FIELDS = ("num_attention_heads", "ssa_dilations")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or loaded; the message says what to do."""


# ---------------------------------------------------------------------------------------------- checkpoints
def missing_checkpoint_help(name: str) -> str:
    """What to do when there is no checkpoint at ``name`` (Markdown; shared by the demo and the CLI)."""
    return (
        f"No STPNet checkpoint at `{name}`. The demo and `stpnet-predict` need a trained checkpoint:\n"
        f"1. The trained Kvasir-SEG model `{DEFAULT_CHECKPOINT}` comes with the repository (a full clone has it), and "
        "`bash scripts/main.sh` trains a small sample model into `outputs/sample-tiny/best` (CPU, a few minutes).\n"
        "2. Or point to another checkpoint, a local folder or a Hugging Face Hub id: "
        f"`python demo/app.py --checkpoint PATH_OR_ID`, the environment variable `{CHECKPOINT_ENV}`, the Checkpoint "
        "box of the demo, or `stpnet-predict --model PATH_OR_ID`.\n\n"
        "A checkpoint folder holds `config.json`, `model.safetensors` and `preprocessor_config.json` "
        "(written by `save_pretrained`)."
    )


def resolve_checkpoint(name: str | os.PathLike | None = None) -> str:
    """The checkpoint to use: ``name``, else ``$STPNET_CHECKPOINT``, else the committed Kvasir-SEG model.

    Relative folders are looked up in the working directory first, then in the repository root, so the demo
    finds ``checkpoints/stpnet-kvasir-seg`` whether it is started from the repository or from ``demo/``.
    """
    value = str(name or os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT).strip()
    path = Path(value).expanduser()
    if path.exists() or path.is_absolute():
        return str(path.resolve()) if path.exists() else str(path)
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else value


def is_hub_id(name: str) -> bool:
    """True for ``owner/name``-shaped strings that are not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).exists() and not name.startswith(".")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available here; use --device cpu")
    return resolved


def load_checkpoint(
    name_or_path: str | os.PathLike, model_types: Sequence[str] = ("stpnet",)
) -> tuple[torch.nn.Module, Any, list[str]]:
    """(model, image processor, notes) of a checkpoint: the one loader of the CLI, the demo, evaluation and export.

    Loads with ``AutoModel``/``AutoImageProcessor`` and ``trust_remote_code=True``. Raises :class:`CheckpointError`
    naming the checkpoint and what to do when it is missing or damaged, when its weights do not fit its
    ``config.json`` (missing, unexpected or reshaped weights) or when its ``preprocessor_config.json`` is invalid.
    """
    name = str(name_or_path)
    model = _load_model(name, tuple(model_types))
    processor, notes = _load_processor(name, model.config)
    return model, processor, notes


def _load_model(name: str, model_types: tuple[str, ...]) -> torch.nn.Module:
    from transformers import AutoModel

    folder = Path(name)
    local = folder.is_dir()
    if not local and not is_hub_id(name):
        raise CheckpointError(missing_checkpoint_help(name))
    if local and not (folder / "config.json").is_file():
        raise CheckpointError(
            f"`{name}` exists but holds no `config.json`, so it is not a saved checkpoint (training may "
            "still be running).\n\n" + missing_checkpoint_help(name)
        )
    if local and not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise CheckpointError(
            f"`{name}` holds `config.json` but no weights (`model.safetensors`): the copy is incomplete or training "
            "has not saved yet.\n\n" + missing_checkpoint_help(name)
        )
    try:
        with _quiet_load_report():  # our own message below names the keys; transformers' table would repeat them
            model, info = AutoModel.from_pretrained(
                name,
                trust_remote_code=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                use_safetensors=True,
            )
    except Exception as error:  # transformers and safetensors raise OSError, ValueError, SafetensorError...
        if local:  # the files are there, so help on finding a checkpoint would only mislead
            raise CheckpointError(
                f"Could not load the checkpoint `{name}`: {type(error).__name__}: {error}\nIts files are damaged or "
                "do not belong together (e.g. a truncated `model.safetensors` from an interrupted copy): copy or save "
                "the checkpoint again."
            ) from error
        raise CheckpointError(
            f"Could not load the checkpoint `{name}` (no local folder of that name; it was tried as a Hugging Face "
            f"Hub id): {error}\n\n" + missing_checkpoint_help(name)
        ) from error
    model_type = getattr(model.config, "model_type", None)
    if model_type not in model_types:
        raise CheckpointError(
            f"`{name}` is a {model_type!r} model; accepted here: {', '.join(repr(t) for t in model_types)}"
        )
    problems = _loading_problems(info) + _sentence_mismatch(model.config)
    problems += _recipe_mismatches(folder, model.config) if local else []
    if problems:
        raise CheckpointError(
            f"The weights of `{name}` do not fit its `config.json`:\n- " + "\n- ".join(problems) + "\nThe config "
            "was probably edited after training (use_text, use_ssa, num_attention_heads, base_channels...) or comes "
            "from another checkpoint. Restore the `config.json` saved with these weights, or train a model with the "
            "new settings; the weights are not used as they are."
        )
    return model


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    # A filter, not a higher level: transformers 5 checks this logger's level to decide other warnings.
    logger = logging.getLogger("transformers.modeling_utils")

    def drop_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


def _loading_problems(info: dict[str, Any]) -> list[str]:
    """Readable lines for every weight transformers could not load as saved."""
    problems = []
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the file (they would be random): {first_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} weight(s) in the file that the model does not use: {first_few(unexpected)}")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shapes = [f"{key} (file {tuple(saved)}, model {tuple(wanted)})" for key, saved, wanted in mismatched]
        problems.append(f"{len(mismatched)} weight(s) of another shape: {first_few(shapes)}")
    problems += [str(message) for message in info.get("error_msgs") or ()]
    return problems


def _sentence_mismatch(config: Any) -> list[str]:
    """The stored text embeddings were encoded from other sentences than ``config.json`` lists (an edited
    ``text_sentences``/``text_categories``): no shape shows it while the counts agree, but every retrieved
    description would be wrong. Checkpoints saved before the fingerprint existed have none and are not checked."""
    from .configuration_stpnet import repository_fingerprint

    stored = getattr(config, "text_embeddings_fingerprint", None)
    if not stored or not getattr(config, "use_text", True):
        return []
    if repository_fingerprint(config.text_categories, config.text_sentences) == stored:
        return []
    return [
        "`text_categories`/`text_sentences` in config.json are not the ones the stored text embeddings were encoded "
        f"from (fingerprint {stored}); re-encode them (training does) instead of editing the sentences"
    ]


def _recipe_mismatches(folder: Path, config: Any) -> list[str]:
    """Fields of ``SHAPELESS_FIELDS`` where ``config.json`` differs from the training recipe that training saves
    beside the weights (``train_config.yaml``: preset + overrides); nothing when the recipe cannot be read."""
    recipe = folder / "train_config.yaml"
    if not recipe.is_file():
        return []
    try:
        import yaml  # a dependency of transformers

        section = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}
        # A fine-tuned model's architecture came from its init_from checkpoint, not from the (unused) preset.
        preset = "" if section.get("init_from") else str(section.get("preset") or "")
        candidates = [Path(preset), REPO_ROOT / preset, REPO_ROOT / "configuration" / "models" / f"{preset}.json"]
        found = next((p for p in candidates if preset and p.is_file()), None)
        expected = json.loads(found.read_text(encoding="utf-8")) if found else {}
        expected.update(section.get("overrides") or {})
    except Exception:  # an unreadable recipe proves nothing either way; the weights were checked already
        return []

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    return [
        f"`{key}` is {plain(getattr(config, key))!r} in config.json but {plain(expected[key])!r} in the "
        "training recipe (train_config.yaml); no weight shows this, yet the network computes something else"
        for key in SHAPELESS_FIELDS
        if key in expected and hasattr(config, key) and plain(getattr(config, key)) != plain(expected[key])
    ]


def _load_processor(name: str, config: Any) -> tuple[Any, list[str]]:
    """The checkpoint's image processor; the training size with ImageNet statistics (and a note) when it has none."""
    from transformers import AutoImageProcessor

    size = int(getattr(config, "image_size", 224))
    source = _processor_file(name)
    if source is None:  # a checkpoint saved without its processor still works at the training resolution
        note = f"the checkpoint has no {PROCESSOR_FILE}; using {size}x{size} and ImageNet statistics"
        return STPNetImageProcessor(size={"height": size, "width": size}), [note]
    try:
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=True)
        problem = _processor_problem(processor)
    except Exception as error:  # invalid JSON, a size the processor refuses...
        problem = f"{type(error).__name__}: {error}"
    if problem:
        # Falling back to defaults would silently drop the file's settings (its statistics, its size).
        raise CheckpointError(
            f"`{source}` is invalid: {problem}\nAccepted: `size` with `height` and `width` positive multiples of 32, "
            "`image_mean` and `image_std` three numbers each (std above 0). Fix the file, or delete it to use the "
            f"model's training size ({size}x{size}) with ImageNet statistics."
        )
    return processor, []


def _processor_file(name: str) -> Path | None:
    if Path(name).is_dir():
        path = Path(name) / PROCESSOR_FILE
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(name, PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
    except Exception:  # offline without a cached copy: the model loaded, so only the processor is unavailable
        return None
    return Path(found) if found else None


def _processor_problem(processor: Any) -> str | None:
    """What is wrong with a loaded processor's settings, or None."""
    size = getattr(processor, "size", None) or {}
    if not isinstance(size, dict) or not all(
        isinstance(size.get(side), int) and size[side] >= 32 and size[side] % 32 == 0 for side in ("height", "width")
    ):
        return f"`size` is {size!r}"
    for field_name, low in (("image_mean", None), ("image_std", 0.0)):
        values = getattr(processor, field_name, None)
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            return f"`{field_name}` is {values!r}"
        if len(numbers) != 3 or not all(np.isfinite(numbers)) or (low is not None and min(numbers) <= low):
            return f"`{field_name}` is {values!r}"
    return None


# ---------------------------------------------------------------------------------------------- images
@dataclass
class PreparedImage:
    """An RGB image ready for the model, with notes on what was done to it."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) of the file
    notes: list[str] = field(default_factory=list)


def prepare_image(
    path: str | os.PathLike, max_pixels: int = MAX_PIXELS, max_decode_pixels: int = MAX_DECODE_PIXELS
) -> PreparedImage:
    """Load any supported image file as RGB (via :func:`~modeling_stpnet.data.io.load_image`), guarding its size.

    Images above ``max_pixels`` are downscaled (the mask then matches the downscaled image and a note says so);
    images above ``max_decode_pixels`` and decompression bombs are refused before decoding. Raises
    :class:`~modeling_stpnet.data.io.DataError` with a message for people otherwise.
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


def main(argv: Sequence[str] | None = None) -> int:
    """``stpnet-predict`` (see :mod:`modeling_stpnet.predict_cli`); kept here for ``python -m`` and old installs."""
    from .predict_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

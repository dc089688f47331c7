"""Inference with a trained STPNet: images in; masks, overlays and a CSV of descriptions and lesion areas out.

Command line (also ``python -m modeling_stpnet.predict``)::

    stpnet-predict --model outputs/sample-tiny/best sample/kvasir-seg-mini/images --output-dir predictions

Python (the Gradio demo uses the same functions)::

    predictor = load_predictor("outputs/sample-tiny/best")
    prediction = predictor.predict([prepare_image("polyp.jpg").image])[0]
    prediction.description, prediction.lesion_percent

Unreadable inputs are skipped and reported; the exit status is non-zero only when nothing could be processed.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .cpu_memory import keep_freed_memory
from .data.io import DataError, load_image, mask_to_image
from .image_processing_stpnet import MIN_SIDE, STPNetImageProcessor
from .visualize import overlay_mask

DEFAULT_CHECKPOINT = "outputs/sample-tiny/best"
CHECKPOINT_ENV = "STPNET_CHECKPOINT"
# The network sees ~128-224 px, so larger inputs only cost memory: they are downscaled to this many pixels first.
MAX_PIXELS = 4096 * 4096
# Refused before decoding; PIL itself refuses twice its MAX_IMAGE_PIXELS (~179 MP) as a decompression bomb.
MAX_DECODE_PIXELS = 100_000_000
REPO_ROOT = Path(__file__).resolve().parents[1]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or loaded; the message says what to do."""


# ---------------------------------------------------------------------------------------------- checkpoints
def missing_checkpoint_help(name: str) -> str:
    """What to do when there is no checkpoint at ``name`` (Markdown; shared by the demo and the CLI)."""
    return (
        f"No STPNet checkpoint at `{name}`. The demo and `stpnet-predict` need a trained checkpoint:\n"
        f"1. Train the small sample model (CPU, a few minutes): `bash scripts/main.sh` writes `{DEFAULT_CHECKPOINT}`.\n"
        "2. Or point to another checkpoint, a local folder or a Hugging Face Hub id: "
        f"`python demo/app.py --checkpoint PATH_OR_ID`, the environment variable `{CHECKPOINT_ENV}`, the Checkpoint "
        "box of the demo, or `stpnet-predict --model PATH_OR_ID`.\n\n"
        "A checkpoint folder holds `config.json`, `model.safetensors` and `preprocessor_config.json` "
        "(written by `save_pretrained`)."
    )


def resolve_checkpoint(name: str | os.PathLike | None = None) -> str:
    """The checkpoint to use: ``name``, else ``$STPNET_CHECKPOINT``, else the sample job's output.

    Relative folders are looked up in the working directory first, then in the repository root, so the demo
    finds ``outputs/sample-tiny/best`` whether it is started from the repository or from ``demo/``.
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
            f"downscaled from {width}x{height} to {new_size[0]}x{new_size[1]} pixels (limit {max_pixels / 1e6:.1f} "
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
    description: str | None  # the retrieved sentences joined by the repository's template
    categories: list[dict[str, Any]]  # per category: category, sentence, probability, probabilities
    seconds: float  # inference time of this image (its share of the batch), model loading excluded
    notes: list[str] = field(default_factory=list)

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
        """Load with ``AutoModel``/``AutoImageProcessor`` and ``trust_remote_code=True`` (local folder or Hub id)."""
        from transformers import AutoImageProcessor, AutoModel

        target = resolve_device(device)
        local = Path(name_or_path).is_dir()
        if not local and not is_hub_id(name_or_path):
            raise CheckpointError(missing_checkpoint_help(name_or_path))
        if local and not (Path(name_or_path) / "config.json").is_file():
            raise CheckpointError(
                f"`{name_or_path}` exists but holds no `config.json`, so it is not a saved checkpoint (training may "
                "still be running).\n\n" + missing_checkpoint_help(name_or_path)
            )
        try:
            model = AutoModel.from_pretrained(name_or_path, trust_remote_code=True)
        except Exception as error:  # transformers raises OSError, ValueError, ImportError... all mean "unusable"
            where = "" if local else " (no local folder of that name; it was tried as a Hugging Face Hub id)"
            raise CheckpointError(
                f"Could not load the checkpoint `{name_or_path}`{where}: {error}\n\n"
                + missing_checkpoint_help(name_or_path)
            ) from error
        if getattr(model.config, "model_type", None) != "stpnet":
            raise CheckpointError(f"`{name_or_path}` is a {model.config.model_type!r} model, not an STPNet checkpoint")
        notes = []
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=True)
        except Exception:  # a checkpoint saved without its processor still works at the training resolution
            size = int(model.config.image_size)
            processor = STPNetImageProcessor(size={"height": size, "width": size})
            notes.append(f"the checkpoint has no preprocessor_config.json; using {size}x{size} and ImageNet statistics")
        return cls(model.to(target), processor, name_or_path, notes)

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image], threshold: float = 0.5) -> list[Prediction]:
        """One :class:`Prediction` per RGB image, in order (one batch; split long lists yourself)."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
        if not images:
            return []
        with self._lock:
            start = time.perf_counter()
            inputs = self.processor(list(images), return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self.model.dtype)
            outputs = self.model(pixel_values=pixel_values)
            sizes = [(im.height, im.width) for im in images]
            masks = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, threshold=threshold)
            masks = [m.cpu().numpy().astype(bool) for m in masks]
            if getattr(outputs, "retrieval_logits", None) is not None:
                described = self.processor.post_process_description(outputs, self.model.config)
            else:  # a checkpoint trained without text (use_text=False) retrieves nothing
                described = [{"description": None, "categories": []}] * len(images)
            seconds = (time.perf_counter() - start) / len(images)
        return [
            Prediction(image=im, mask=m, description=d["description"], categories=d["categories"], seconds=seconds)
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


# ---------------------------------------------------------------------------------------------- command line
def collect_inputs(
    inputs: Iterable[str | os.PathLike], recursive: bool = False
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to try (every visible file of a folder, so non-images get reported) and inputs that do not exist."""
    files, missing, seen = [], [], set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            candidates = sorted(p for p in found if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            candidates = [path]
        else:
            missing.append((str(path), "not found"))
            continue
        for candidate in candidates:
            if candidate.resolve() not in seen:
                seen.add(candidate.resolve())
                files.append(candidate)
    return files, missing


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}-{n}"
    used.add(stem)
    return stem


class _Writer:
    """Writes masks, overlays and CSV rows as predictions arrive, so an interrupted run keeps what it did."""

    def __init__(self, output_dir: Path, categories: list[str]) -> None:
        self.output_dir = output_dir
        (output_dir / "masks").mkdir(parents=True, exist_ok=True)
        (output_dir / "overlays").mkdir(parents=True, exist_ok=True)
        self.used: set[str] = set()
        columns = ["file", "mask", "overlay", "width", "height", "lesion_pixels", "lesion_percent", "description"]
        columns += [c for name in categories for c in (name, f"{name}_probability")]
        columns += ["seconds", "notes"]
        self.handle = open(output_dir / "predictions.csv", "w", newline="", encoding="utf-8")
        self.rows = csv.DictWriter(self.handle, fieldnames=columns)
        self.rows.writeheader()

    def write(self, path: Path, prediction: Prediction) -> None:
        stem = _unique_stem(path, self.used)
        mask_file, overlay_file = Path("masks") / f"{stem}.png", Path("overlays") / f"{stem}.png"
        prediction.mask_image().save(self.output_dir / mask_file)
        prediction.overlay().save(self.output_dir / overlay_file)
        row = {
            "file": str(path),
            "mask": mask_file.as_posix(),
            "overlay": overlay_file.as_posix(),
            "width": prediction.mask.shape[1],
            "height": prediction.mask.shape[0],
            "lesion_pixels": prediction.lesion_pixels,
            "lesion_percent": f"{prediction.lesion_percent:.3f}",
            "description": prediction.description or "",
            "seconds": f"{prediction.seconds:.4f}",
            "notes": "; ".join(prediction.notes),
        }
        for item in prediction.categories:
            row[item["category"]] = item["sentence"]
            row[f"{item['category']}_probability"] = f"{item['probability']:.4f}"
        self.rows.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def run(
    predictor: STPNetPredictor,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    threshold: float = 0.5,
    batch_size: int = 8,
    recursive: bool = False,
    max_pixels: int = MAX_PIXELS,
    progress: bool | None = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Predict every readable image of ``inputs``; returns (number processed, [(file, why skipped)])."""
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    files, skipped = collect_inputs(inputs, recursive)
    categories = list(predictor.config.text_categories) if getattr(predictor.config, "use_text", True) else []
    writer = _Writer(output_dir, categories)
    processed = 0
    bar = tqdm(total=len(files), unit="image", disable=None if progress is None else not progress)

    def skip(name: str, reason: str) -> None:
        skipped.append((name, reason))
        if not bar.disable:  # live news for long runs; the full list is printed at the end anyway
            bar.write(f"skipped {name}: {reason}", file=sys.stderr)

    def flush(batch: list[tuple[Path, PreparedImage]]) -> None:
        nonlocal processed
        try:
            predictions = predictor.predict([p.image for _, p in batch], threshold)
        except (RuntimeError, ValueError) as error:
            if len(batch) > 1:  # one image can break a batch (e.g. out of memory on a big one): isolate it
                for item in batch:
                    flush([item])
            else:
                skip(str(batch[0][0]), f"inference failed: {error}")
                bar.update(1)
            return
        for (path, prepared), prediction in zip(batch, predictions):
            prediction.notes = prepared.notes + prediction.notes
            writer.write(path, prediction)
            processed += 1
        bar.update(len(batch))

    batch: list[tuple[Path, PreparedImage]] = []
    try:
        for path in files:
            try:
                batch.append((path, prepare_image(path, max_pixels=max_pixels)))
            except DataError as error:
                skip(str(path), str(error).removeprefix(f"{path}: ").removeprefix(f"{path.name}: "))
                bar.update(1)
                continue
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
        writer.close()
    with open(output_dir / "skipped.csv", "w", newline="", encoding="utf-8") as handle:
        table = csv.writer(handle)
        table.writerow(["file", "reason"])
        table.writerows(skipped)
    return processed, skipped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stpnet-predict",
        description="Segment lesions with a trained STPNet: masks, overlays and predictions.csv (description and "
        "lesion area per image). Unreadable files are skipped and listed in skipped.csv.",
    )
    parser.add_argument("inputs", nargs="+", help="image files and/or folders (every file in a folder is tried)")
    parser.add_argument(
        "--model",
        default=None,
        help=f"checkpoint folder or Hugging Face Hub id (default: ${CHECKPOINT_ENV} or {DEFAULT_CHECKPOINT})",
    )
    parser.add_argument("--output-dir", default="predictions", help="where masks/, overlays/ and the CSVs go")
    parser.add_argument("--threshold", type=float, default=0.5, help="lesion probability threshold (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--recursive", action="store_true", help="also look into sub-folders of input folders")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"downscale larger images to this size (default {MAX_PIXELS})",
    )
    parser.add_argument(
        "--release-memory",
        action="store_true",
        help="on CPU, let the allocator return freed memory after every batch (slower; see cpu_memory.py)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``stpnet-predict``; returns the exit status (0 when at least one image was processed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    name = resolve_checkpoint(args.model)
    try:
        predictor = load_predictor(name, device=args.device)
    except (CheckpointError, ValueError) as error:
        print(f"stpnet-predict: {error}", file=sys.stderr)
        return 2
    if predictor.device.type == "cpu" and not args.release_memory:
        keep_freed_memory()
    processed, skipped = run(
        predictor,
        args.inputs,
        args.output_dir,
        threshold=args.threshold,
        batch_size=args.batch_size,
        recursive=args.recursive,
        max_pixels=args.max_pixels,
    )
    out = Path(args.output_dir)
    if skipped:
        print(f"Skipped {len(skipped)} input(s):", file=sys.stderr)
        for file, reason in skipped:
            print(f"  {file}: {reason}", file=sys.stderr)
    print(
        f"stpnet-predict: {processed} processed, {len(skipped)} skipped; results in {out / 'predictions.csv'}"
        + (f", skipped files listed in {out / 'skipped.csv'}" if skipped else "")
    )
    return 0 if processed else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Evaluate a trained segmentation checkpoint: per-image and pooled Dice/IoU, retrieval accuracy, overlays.

Examples::

    python hub_scripts/evaluate.py --model outputs/sample-tiny/best --output-dir outputs/sample-tiny/tta --tta
    python hub_scripts/evaluate.py --model outputs/kvasir/best --dataset outputs/data/kvasir-seg --split test \
        --output-dir outputs/kvasir/test

Without ``--dataset`` it evaluates on the bundled Kvasir-SEG sample's test split. Writes ``metrics.json`` (``dice``
and ``iou``: per-image means at the original mask resolution; ``input_resolution``: the same at the model's input
size), ``per_image.csv`` and ``overlays/`` (PNG panels of the best and worst images); an earlier evaluation in
``--output-dir`` is only replaced with ``--overwrite``. Bad arguments, checkpoints or data exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# This script's folder comes first on sys.path and its name would shadow the `evaluate` package: put the checkout
# root there instead (which also lets it run from a checkout without installing).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
else:
    sys.path.insert(0, str(ROOT))

from stpnet.extras import TRAIN_MODULES, exit_unless_installed  # noqa: E402

if __name__ == "__main__":  # the install line instead of an import traceback
    exit_unless_installed("hub_scripts/evaluate.py", "train", TRAIN_MODULES)

from stpnet.data import DataError, load_stpnet_dataset  # noqa: E402
from stpnet.data.io import blocking_file  # noqa: E402
from stpnet.inference.predict import CheckpointError, FlipAveraged, load_checkpoint  # noqa: E402
from stpnet.training.evaluation import (  # noqa: E402
    EVALUATION_FILES,
    OVERLAY_FILE,
    evaluate_split,
    retrieval_report,
)

DEFAULT_DATASET = ROOT / "sample" / "kvasir-seg-mini"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (save_pretrained output)")
    parser.add_argument(
        "--dataset", default=None, help="dataset folder, raw layout or Hub id (default: the bundled sample)"
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--output-dir", required=True, type=Path, help="where metrics.json etc. are written")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier evaluation in --output-dir (metrics.json, per_image.csv and its best_*/worst_* "
        "overlays; other files are kept)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="model input size in px, a multiple of 32 (default: the checkpoint's own); the model runs at any such "
        "size, so this scores a model trained at one size at another",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="score the mask averaged over horizontally and vertically mirrored copies (3x the compute; retrieval "
        "is scored on the image as given)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--overlays", type=int, default=4, help="best and worst images drawn (default 4 each)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def earlier_overlays(output_dir: Path) -> list[Path]:
    """The overlay panels an earlier evaluation wrote into ``output_dir / "overlays"`` (none of the user's files)."""
    folder = output_dir / "overlays"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and OVERLAY_FILE.fullmatch(p.name))


def output_dir_problem(output_dir: Path, overwrite: bool) -> str | None:
    """Why ``output_dir`` cannot take the results, checked before the evaluation runs; None when it can."""
    blocking = blocking_file(output_dir)
    if blocking is not None:
        return f"--output-dir {output_dir} cannot be used: {blocking} is a file; give a folder"
    if (output_dir / "overlays").exists() and not (output_dir / "overlays").is_dir():
        return f"--output-dir {output_dir} cannot be used: {output_dir / 'overlays'} is a file, where overlays go"
    for name in EVALUATION_FILES:
        if (output_dir / name).is_dir():
            return f"--output-dir {output_dir} cannot be used: {output_dir / name} is a folder, where a file goes"
    earlier = [name for name in EVALUATION_FILES if (output_dir / name).exists()]
    earlier += ["overlays/"] if earlier_overlays(output_dir) else []
    if earlier and not overwrite:
        return (
            f"--output-dir {output_dir} already holds an evaluation ({', '.join(earlier)}); pass --overwrite to "
            "replace it, or choose another folder"
        )
    return None


def missing_text_columns(model: Any, split: Any) -> list[str]:
    """Text categories of the model that the split has no label column for (their retrieval cannot be scored)."""
    config = model.config
    if not getattr(config, "use_text", False):
        return []
    return [c for c in getattr(config, "text_categories", []) or [] if c not in split.features]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.overlays < 0:
        parser.error(f"--overlays must be 0 or more, got {args.overlays}")
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        parser.error(f"--image-size must be a positive multiple of 32, got {args.image_size}")
    import torch

    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} is not a checkpoint folder (no config.json)", file=sys.stderr)
        return 2
    # Checked first, so a wrong folder fails now rather than after the whole evaluation.
    problem = output_dir_problem(args.output_dir, args.overwrite)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, processor, notes = load_checkpoint(args.model, model_types=("stpnet", "stpnet-unet"))
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model = model.eval().to(torch.float32)
    if args.tta:
        model = FlipAveraged(model)
    if args.image_size is not None:
        processor.size = {"height": args.image_size, "width": args.image_size}
    dataset_path = args.dataset or str(DEFAULT_DATASET)
    try:
        dataset = load_stpnet_dataset(dataset_path, progress=not args.no_progress)
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.split not in dataset:
        print(f"error: {dataset_path} has splits {list(dataset)}, not {args.split!r}", file=sys.stderr)
        return 2
    split = dataset[args.split]
    missing = missing_text_columns(model, split)
    if missing:
        notes.append(
            f"the {args.split} split has no label column {', '.join(repr(c) for c in missing)} (the model's text "
            f"categories: {', '.join(model.config.text_categories)}), so retrieval accuracy is left out"
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    shown = args.dataset or str(DEFAULT_DATASET.relative_to(ROOT))
    extra = {
        "model": str(args.model),
        "dataset": shown,
        "split": args.split,
        "test_time_augmentation": "flips" if args.tta else None,
        **({"notes": notes} if notes else {}),
    }
    if args.overwrite:  # else a smaller --overlays leaves old panels; other files in overlays/ are the user's
        for old in earlier_overlays(args.output_dir):
            old.unlink()
    metrics = evaluate_split(
        model,
        processor,
        split,
        args.output_dir,
        batch_size=args.batch_size,
        device=device,
        num_overlays=args.overlays,
        progress=not args.no_progress,
        extra=extra,
    )
    summary = {k: metrics[k] for k in ("dice", "iou", "micro_dice", "micro_iou", "num_images")}
    print(json.dumps({"split": args.split, **summary, "input_resolution_dice": metrics["input_resolution"]["dice"]}))
    for line in retrieval_report(metrics):
        print(line)
    print(f"written: {args.output_dir / 'metrics.json'}, per_image.csv, overlays/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

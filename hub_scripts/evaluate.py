#!/usr/bin/env python
"""Evaluate a trained segmentation checkpoint: per-image and pooled Dice/IoU, retrieval accuracy, overlays.

Examples::

    python hub_scripts/evaluate.py --model outputs/sample-tiny/best --output-dir outputs/sample-tiny/evaluation
    python hub_scripts/evaluate.py --model outputs/kvasir/best --dataset outputs/data/kvasir-seg --split test \
        --output-dir outputs/kvasir/test

Without ``--dataset`` it evaluates on the bundled Kvasir-SEG sample's test split. Writes ``metrics.json`` (``dice``
and ``iou``: per-image means at the original mask resolution; ``input_resolution``: the same at the model's input
size), ``per_image.csv`` and ``overlays/`` (PNG panels of the best and worst images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This script's folder comes first on sys.path and its name would shadow the `evaluate` package: put the checkout
# root there instead (which also lets it run from a checkout without installing).
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
else:
    sys.path.insert(0, str(ROOT))

from modeling_stpnet.data import DataError, load_stpnet_dataset  # noqa: E402
from modeling_stpnet.training.evaluation import evaluate_split  # noqa: E402

DEFAULT_DATASET = ROOT / "sample" / "kvasir-seg-mini"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (save_pretrained output)")
    parser.add_argument(
        "--dataset", default=None, help="dataset folder, raw layout or Hub id (default: the bundled sample)"
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--output-dir", required=True, type=Path, help="where metrics.json etc. are written")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlays", type=int, default=4, help="best and worst images drawn (default 4 each)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def load_checkpoint(folder: Path):
    """Model and image processor of a checkpoint folder, through the Auto classes and the folder's own code."""
    import torch
    from transformers import AutoImageProcessor, AutoModel

    from modeling_stpnet import STPNetImageProcessor

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    if (folder / "preprocessor_config.json").is_file():
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    else:  # a checkpoint saved without its processor: the model's training size
        size = int(getattr(model.config, "image_size", 224))
        processor = STPNetImageProcessor(size={"height": size, "width": size})
    return model.eval().to(torch.float32), processor


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not (args.model / "config.json").is_file():
        print(f"error: {args.model} is not a checkpoint folder (no config.json)", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset_path = args.dataset or str(DEFAULT_DATASET)
    try:
        dataset = load_stpnet_dataset(dataset_path, progress=not args.no_progress)
    except (DataError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.split not in dataset:
        print(f"error: {dataset_path} has splits {list(dataset)}, not {args.split!r}", file=sys.stderr)
        return 2
    model, processor = load_checkpoint(args.model)
    shown = args.dataset or str(DEFAULT_DATASET.relative_to(ROOT))
    extra = {"model": str(args.model), "dataset": shown, "split": args.split}
    metrics = evaluate_split(
        model,
        processor,
        dataset[args.split],
        args.output_dir,
        batch_size=args.batch_size,
        device=device,
        num_overlays=args.overlays,
        progress=not args.no_progress,
        extra=extra,
    )
    summary = {k: metrics[k] for k in ("dice", "iou", "micro_dice", "micro_iou", "num_images")}
    print(json.dumps({"split": args.split, **summary, "input_resolution_dice": metrics["input_resolution"]["dice"]}))
    accuracy, floor = metrics["retrieval_accuracy"], metrics["retrieval_majority_baseline"]
    if accuracy:
        pairs = ", ".join(f"{c} {v:.3f} ({floor[c]:.3f})" for c, v in accuracy.items() if v is not None)
        print(f"retrieval accuracy (majority-class baseline): {pairs}")
    print(f"written: {args.output_dir / 'metrics.json'}, per_image.csv, overlays/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Export a trained STPNet (or U-Net baseline) checkpoint to ONNX and check it against PyTorch with onnxruntime.

    python hub_scripts/export_onnx.py --model outputs/sample-tiny/best --output stpnet.onnx
    python hub_scripts/export_onnx.py --model DIR --output model.onnx --image-size 352 --dynamic --overwrite

Inputs: `pixel_values` (B, 3, H, W), normalised as `STPNetImageProcessor` does (H, W multiples of 32).
Outputs: `logits` (B, 1, H, W); for STPNet also `retrieval_logits_<category>` (B, n_k) per text category and
`retrieved_indices` (B, K) int64. The config (categories, sentences, image size) is stored in the ONNX metadata
under `stpnet_config`, so the retrieved indices can be turned into sentences without this package.

Exporter: torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, the default) first; if it fails the
TorchScript exporter (`dynamo=False`). Verification runs both on a sample (a processed image with --image, else
a fixed random tensor) and prints the max abs logit difference and the mask agreement (sigmoid > 0.5).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_stpnet import STPNetImageProcessor  # noqa: E402
from stpnet.extras import EXPORT_MODULES, exit_unless_installed  # noqa: E402
from stpnet.inference.predict import CheckpointError, load_checkpoint  # noqa: E402
from stpnet.onnx_export import DEFAULT_OPSET, agrees, export, verify  # noqa: E402
from stpnet.optimize import optimize_for_inference  # noqa: E402


def load_model(path: str | Path) -> nn.Module:
    """STPNet or the U-Net baseline from a `save_pretrained` folder, checked like every other tool loads it, with the
    rewrites of `optimize_for_inference` that keep a graph of standard operators for every input size.

    Raises `CheckpointError` saying what is wrong with the checkpoint."""
    model, _, _ = load_checkpoint(path, model_types=("stpnet", "stpnet-unet"))
    return optimize_for_inference(model, cpu_kernels=False)


def checkpoint_file_problem(model: str, output: Path) -> str | None:
    """Why ``output`` must not be written: it is a file of the checkpoint folder ``model`` (its weights or config),
    which even --overwrite must not replace; None when it is not. Paths are resolved, so a symlink or a "../"
    spelling of the folder is caught too. Writing over model.safetensors also corrupts the model being checked:
    its weights are memory-mapped from that file, so PyTorch then gives NaN logits."""
    folder = Path(model)
    if not folder.is_dir():
        return None  # a Hub id: nothing local to protect
    folder = folder.resolve()
    candidates = {output.resolve(), output.parent.resolve() / output.name}  # the link's target, and the link itself
    for candidate in candidates:
        if candidate.is_relative_to(folder) and (candidate.exists() or candidate.is_symlink()):
            return (
                f"--output {output} is the file {candidate.relative_to(folder)} of the checkpoint folder --model "
                f"{model}; it is never replaced, even with --overwrite: write the .onnx file elsewhere or under a "
                "new name"
            )
    return None


def sample_input(model: nn.Module, image_size: int, image: str | None, batch: int = 1) -> torch.Tensor:
    if image:
        from PIL import Image

        processor = STPNetImageProcessor(size={"height": image_size, "width": image_size})
        return processor([Image.open(image)] * batch)["pixel_values"]
    return torch.randn(
        batch, model.config.num_channels, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (save_pretrained) of STPNet or the U-Net")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output when it exists")
    parser.add_argument("--image-size", type=int, help="export (and check) resolution; default: the config's")
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    parser.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--image", help="an image file to check on (default: a fixed random tensor)")
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="accepted max abs logit difference, relative to max(1, |logits|)"
    )
    args = parser.parse_args(argv)
    # Before the checkpoint loads: without onnxscript the dynamo exporter fails only after the model is traced.
    exit_unless_installed("hub_scripts/export_onnx.py", "export", EXPORT_MODULES)

    output = Path(args.output)
    if output.is_dir():
        parser.error(f"--output {output} is a folder; give the .onnx file to write")
    problem = checkpoint_file_problem(args.model, output)
    if problem:
        parser.error(problem)
    if output.exists() and not args.overwrite:
        parser.error(f"--output {output} exists; pass --overwrite to replace it, or choose another file")
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        parser.error(f"--image-size must be a positive multiple of 32, got {args.image_size}")
    try:
        model = load_model(args.model)
    except CheckpointError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    size = args.image_size or model.config.image_size
    if size % 32:
        parser.error(f"the checkpoint's image_size {size} is not a multiple of 32; pass --image-size")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. a file where a folder of the path should be
        parser.error(f"--output {output}: cannot create its folder ({error})")
    # Written under a temporary name and moved into place only once it agrees with PyTorch: a failed export or
    # check must neither leave a file that looks valid nor have replaced the one --overwrite was about.
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial.onnx")
    try:
        started = time.perf_counter()
        kind = export(model, partial, size, args.dynamic, args.exporter, args.opset)
        print(f"exported ({partial.stat().st_size / 2**20:.1f} MiB) with the {kind} exporter in "
              f"{time.perf_counter() - started:.1f} s; saved as {output} once onnxruntime agrees")  # fmt: skip

        checks = [sample_input(model, size, args.image)]
        if args.dynamic:  # another batch and size than the export sample
            checks.append(sample_input(model, size + 32, args.image, batch=2))
        reports = [verify(model, partial, x) for x in checks]
        for r in reports:
            print(
                f"onnxruntime vs PyTorch on {r['input_shape']}: max abs logit diff {r['max_abs_logit_diff']:.3g} "
                f"(logits up to {r['max_abs_logit']:.3g}), mask agreement {r['mask_agreement']:.6f}"
                + (
                    f", retrieved indices equal: {r['retrieved_indices_equal']}"
                    if "retrieved_indices_equal" in r
                    else ""
                )
            )
        failed = [r for r in reports if not agrees(r, args.tolerance)]
        if failed:
            nan = any(not math.isfinite(r["max_abs_logit_diff"] + r["max_abs_logit"]) for r in failed)
            why = (
                "NaN logits (PyTorch or onnxruntime)"
                if nan
                else f"logits differ beyond the tolerance {args.tolerance} x max(1, max |logit|) or the retrieved "
                "indices differ"
            )
            kept = f"; {output} was left as it was" if output.exists() else ""
            raise SystemExit(
                f"{parser.prog}: error: onnxruntime disagrees with PyTorch on {failed[0]['input_shape']}: {why}. "
                f"The export was discarded{kept}. Try another --image-size (the checkpoint's is "
                f"{model.config.image_size}) or --exporter"
            )
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return {"exporter": kind, "output": str(output), "checks": reports}


if __name__ == "__main__":
    main()

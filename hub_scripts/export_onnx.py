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
import contextlib
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from modeling_stpnet import STPNetImageProcessor  # noqa: E402
from modeling_stpnet.extras import EXPORT_MODULES, exit_unless_installed  # noqa: E402
from modeling_stpnet.optimize import optimize_for_inference  # noqa: E402
from modeling_stpnet.predict import CheckpointError, load_checkpoint  # noqa: E402

DEFAULT_OPSET = 18


class ExportWrapper(nn.Module):
    """Plain tensors out (ONNX has no dataclasses): logits, then per-category retrieval logits and the indices."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values)
        if out.retrieval_logits is None:
            return (out.logits,)
        return (out.logits, *out.retrieval_logits, out.retrieved_indices)


def load_model(path: str | Path) -> nn.Module:
    """STPNet or the U-Net baseline from a `save_pretrained` folder, checked like every other tool loads it, with the
    rewrites of `optimize_for_inference` that keep a graph of standard operators for every input size.

    Raises `CheckpointError` saying what is wrong with the checkpoint."""
    model, _, _ = load_checkpoint(path, model_types=("stpnet", "stpnet-unet"))
    return optimize_for_inference(model, cpu_kernels=False)


def output_names(model: nn.Module) -> list[str]:
    if not getattr(model.config, "use_text", False):
        return ["logits"]
    return ["logits", *(f"retrieval_logits_{c}" for c in model.config.text_categories), "retrieved_indices"]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hides two messages of torch's exporter that nobody can act on and that bury the real ones: "torchvision is not
    installed. Skipping torchvision::nms" (four times; torchvision is left out on purpose, it breaks the CPU torch
    build, and STPNet uses none of its operators) and a ``FutureWarning`` about ``LeafSpec`` that torch's own pytree
    code triggers. Every other warning and error still shows."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")

    def no_torchvision(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")

    logger.addFilter(no_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        logger.removeFilter(no_torchvision)


def _dynamo_shapes() -> dict[str, Any]:
    # The model checks that H and W are multiples of 32, so the symbolic sizes are declared as 32 * n.
    dim = torch.export.Dim
    return {"pixel_values": {0: dim("batch", min=1, max=1024), 2: 32 * dim("h32", min=1, max=128),
                             3: 32 * dim("w32", min=1, max=128)}}  # fmt: skip


def export(
    model: nn.Module,
    output: str | Path,
    image_size: int,
    dynamic: bool = False,
    exporter: str = "auto",
    opset: int = DEFAULT_OPSET,
) -> str:
    """Write the ONNX file; returns the exporter that worked ("dynamo" or "torchscript")."""
    wrapper = ExportWrapper(model).eval()
    sample = torch.zeros(1, 3, image_size, image_size)
    names = output_names(model)
    errors = []
    for kind in ["dynamo", "torchscript"] if exporter == "auto" else [exporter]:
        try:
            if kind == "dynamo":
                with _quiet_exporter():
                    program = torch.onnx.export(
                        wrapper,
                        (sample,),
                        dynamo=True,
                        input_names=["pixel_values"],
                        output_names=names,
                        opset_version=opset,
                        dynamic_shapes=_dynamo_shapes() if dynamic else None,
                        external_data=False,
                        verbose=False,
                    )
                program.save(str(output))
            else:
                axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}} if dynamic else None
                if axes:
                    axes.update({n: {0: "batch"} for n in names})
                    axes["logits"] = {0: "batch", 2: "height", 3: "width"}
                torch.onnx.export(
                    wrapper,
                    (sample,),
                    str(output),
                    dynamo=False,
                    input_names=["pixel_values"],
                    output_names=names,
                    opset_version=min(opset, 17),
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
            add_metadata(output, model, kind)
            return kind
        except Exception as error:  # noqa: BLE001 - any exporter failure means: try the next one
            errors.append(f"{kind}: {type(error).__name__}: {error}")
            print(f"{kind} exporter failed: {type(error).__name__}: {str(error)[:500]}", file=sys.stderr)
            if exporter != "auto":
                traceback.print_exc()
    raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))


def add_metadata(path: str | Path, model: nn.Module, exporter: str) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in {
        "stpnet_config": model.config.to_json_string(use_diff=False),
        "exporter": exporter,
        "torch_version": torch.__version__,
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def verify(model: nn.Module, path: str | Path, pixel_values: torch.Tensor) -> dict[str, Any]:
    """Run PyTorch and onnxruntime on the same input and compare every output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = [t.numpy() for t in ExportWrapper(model)(pixel_values)]
    got = session.run(None, {"pixel_values": pixel_values.numpy()})
    logits, ort_logits = expected[0], got[0]
    report: dict[str, Any] = {
        "input_shape": list(pixel_values.shape),
        "max_abs_logit_diff": float(np.abs(logits - ort_logits).max()),
        "max_abs_logit": float(np.abs(logits).max()),
        "mask_agreement": float(((logits > 0) == (ort_logits > 0)).mean()),
        "masks_equal": bool(((logits > 0) == (ort_logits > 0)).all()),
    }
    if len(expected) > 1:
        report["max_abs_retrieval_logit_diff"] = max(
            float(np.abs(a - b).max()) for a, b in zip(expected[1:-1], got[1:-1])
        )
        report["retrieved_indices_equal"] = bool(np.array_equal(expected[-1], got[-1]))
    return report


def agrees(report: dict[str, Any], tolerance: float) -> bool:
    """Float32 kernels differ in summation order, so the logit tolerance scales with the logits' magnitude
    (random-weight checkpoints reach hundreds); retrieved entries must match exactly. NaN never agrees."""
    diff, largest = report["max_abs_logit_diff"], report["max_abs_logit"]
    if not (math.isfinite(diff) and math.isfinite(largest)):
        return False
    close = diff <= tolerance * max(1.0, largest)
    return close and report.get("retrieved_indices_equal", True)


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

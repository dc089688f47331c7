"""ONNX export of STPNet and the U-Net baseline, and the check of an exported file against PyTorch.

`hub_scripts/export_onnx.py` is the command line; `benchmarks/speed.py` times the exported models with onnxruntime.
Inputs: `pixel_values` (B, 3, H, W). Outputs: `logits`, then for STPNet `retrieval_logits_<category>` per text
category and `retrieved_indices`. The config travels in the ONNX metadata (`stpnet_config`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
    batch: int = 1,
) -> str:
    """Write the ONNX file for `(batch, 3, image_size, image_size)` inputs (`dynamic`: any batch and size); returns
    the exporter that worked ("dynamo" or "torchscript")."""
    wrapper = ExportWrapper(model).eval()
    sample = torch.zeros(batch, 3, image_size, image_size)
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

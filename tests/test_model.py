"""STPNet model: shapes, training signal, gradient flow, save/load, remote code, pipeline, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_stpnet import (
    ScaleAwareTextRepository,
    STPNetConfig,
    STPNetForSemanticSegmentation,
    STPNetImageProcessor,
)
from modeling_stpnet.blocks import ConvToOneChannel

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configuration" / "models"


@cache
def encoded_qata() -> tuple[torch.Tensor, ...]:
    """The QaTa repository encoded by the offline MiniLM encoder (real text embeddings, computed once)."""
    repo = ScaleAwareTextRepository.from_json_file(ROOT / "configuration" / "text" / "qata-cov19.json")
    return tuple(repo.encode())


def tiny_config(**overrides) -> STPNetConfig:
    config = STPNetConfig.from_json_file(str(PRESETS / "stpnet-tiny.json"))
    for key, value in overrides.items():
        setattr(config, key, value)
    config.validate()
    return config


def build(seed: int = 0, **overrides) -> STPNetForSemanticSegmentation:
    torch.manual_seed(seed)
    model = STPNetForSemanticSegmentation(tiny_config(**overrides))
    if model.use_text:
        model.set_text_embeddings(list(encoded_qata()), "sentence-transformers/all-MiniLM-L6-v2")
    return model


def blob_batch(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with one bright disc each, its mask, and plausible text labels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for _ in range(batch):
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=g)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2).float()
        images.append(mask[None].repeat(3, 1, 1) * 1.5 + 0.3 * torch.randn(3, size, size, generator=g))
        masks.append(mask)
    text = torch.tensor([[0, 0, 1, 0], [1, 1, 3, 7], [0, 0, 0, 2]])[:batch]
    return torch.stack(images), torch.stack(masks), text


@pytest.mark.parametrize("size", [224, 256])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(size: int, batch: int) -> None:
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert out.logits.shape == (batch, 1, size, size)
    assert [r.shape for r in out.retrieval_logits] == [(batch, n) for n in (2, 2, 8, 8)]
    assert [c.shape for c in out.classifier_logits] == [(batch, n) for n in (2, 2, 8, 8)]
    assert out.retrieved_indices.shape == (batch, 4)
    assert out.loss is None
    assert torch.isfinite(out.logits).all()


def test_non_square_and_shared_backbone_shapes() -> None:
    model = build(retrieval_backbone="shared").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 160, 96))
    assert out.logits.shape == (2, 1, 160, 96)


def test_loss_parts_and_weights() -> None:
    model = build().train()
    x, y, t = blob_batch(2, 128)
    out = model(x, labels=y, text_labels=t)
    cfg = model.config
    expected = (
        cfg.dice_weight * out.dice_loss
        + cfg.bce_weight * out.bce_loss
        + cfg.retrieval_weight * out.retrieval_loss
        + cfg.classifier_weight * out.classifier_loss
    )
    assert torch.allclose(out.loss, expected)
    seg_only = model(x, labels=y)
    assert seg_only.retrieval_loss is None and seg_only.loss > 0


def test_loss_decreases_on_a_tiny_batch() -> None:
    model = build(seed=1).train()
    x, y, t = blob_batch(3, 128, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(16):
        optimizer.zero_grad()
        out = model(x, labels=y, text_labels=t)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # Batch statistics (train mode): running BatchNorm statistics are not settled after a dozen steps.
    assert (out.retrieved_indices == t).float().mean() > 0.9  # retrieval learned the true entries


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"retrieval_backbone": "shared"},
        {"use_ssa": False},
        {"use_text": False},
        {"teacher_forcing_prob": 1.0},
        {"encoder_text_channel": False},
    ],
    ids=["resnet18", "shared", "no-ssa", "no-text", "teacher-forcing", "no-encoder-text-channel"],
)
def test_no_dead_parameters(overrides: dict) -> None:
    # zero_init_ssa blocks the first step's gradient into each SSA's branch by design (its last scale is zero),
    # which would hide a branch that is really disconnected
    model = build(**{"zero_init_ssa": False, **overrides}).train()
    x, y, t = blob_batch(2, 128)
    model(x, labels=y, text_labels=t).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_encoder_text_channel_ablation() -> None:
    """Without the encoder's text channel the separate backbone still retrieves from the pixels (its gradients are
    checked by test_no_dead_parameters) and the prompts still reach the transformer branch; the down blocks take no
    extra channel."""
    full, ablated = build(), build(encoder_text_channel=False)
    assert hasattr(full, "text_maps") and not hasattr(ablated, "text_maps")
    assert full.down_blocks[0].conv[0][0].in_channels == ablated.down_blocks[0].conv[0][0].in_channels + 1
    assert ablated.retrieval.backbone is not None
    x, _, _ = blob_batch(2, 128)
    with torch.no_grad():
        out = ablated.eval()(x)
        ablated.utrans.down_blocks[0].text_to_positions.kv.bias.add_(1.0)  # the prompt's path into UTrans
        assert not torch.allclose(ablated(x).logits, out.logits)
    assert out.retrieved_indices.shape == (2, ablated.config.num_text_categories)


def test_ssa_dilations_reach_the_modules_and_survive_save_load(tmp_path: Path) -> None:
    """The dilations are a config field (scaled for small inputs); configs saved before the field existed load
    with the paper's 6, 12, 18."""
    model = build(ssa_dilations=[2, 4, 6])
    assert all([conv.dilation[0] for conv in ssa.dilated] == [2, 4, 6] for ssa in model.ssa)
    model.save_pretrained(tmp_path)
    reloaded = STPNetForSemanticSegmentation.from_pretrained(tmp_path)
    assert reloaded.config.ssa_dilations == [2, 4, 6]
    assert [conv.dilation[0] for conv in reloaded.ssa[2].dilated] == [2, 4, 6]
    old = json.loads((tmp_path / "config.json").read_text())
    del old["ssa_dilations"]
    assert STPNetConfig(**old).ssa_dilations == [6, 12, 18]


def test_zero_init_ssa_starts_every_ssa_as_the_identity_and_keeps_trained_weights(tmp_path: Path) -> None:
    """`zero_init_ssa` zeroes the fusing BatchNorm's scale of a fresh model only: each SSA then returns its input
    exactly (train and eval), the scale still gets a gradient, and a saved model loads with its trained scale."""
    model = build().train()  # the default
    inputs = []
    hooks = [ssa.register_forward_hook(lambda m, i, o: inputs.append((i[0], o))) for ssa in model.ssa]
    x, y, t = blob_batch(2, 128)
    model(x, labels=y, text_labels=t).loss.backward()
    assert len(inputs) == 3 and all(torch.equal(i, o) for i, o in inputs)
    assert all(ssa.fuse[1].weight.grad.abs().sum() > 0 for ssa in model.ssa)
    model.eval()
    with torch.no_grad():
        ssa = model.ssa[0]
        features = torch.randn(1, ssa.reduce[0].in_channels, 16, 16)
        torch.testing.assert_close(ssa(features), features)
        ssa.fuse[1].weight.fill_(0.5)  # as if trained
    for hook in hooks:
        hook.remove()
    model.save_pretrained(tmp_path)
    reloaded = STPNetForSemanticSegmentation.from_pretrained(tmp_path)
    assert reloaded.config.zero_init_ssa
    assert torch.equal(reloaded.ssa[0].fuse[1].weight, torch.full_like(reloaded.ssa[0].fuse[1].weight, 0.5))
    assert all(torch.equal(s.fuse[1].weight, torch.ones_like(s.fuse[1].weight)) for s in build(zero_init_ssa=False).ssa)


def test_one_channel_conv_init_scales_the_head_and_gates_by_their_input_width(tmp_path: Path) -> None:
    """A conv to one channel has a fan_out of 1, so He init in `fan_out` mode gives it weights of std sqrt(2) at
    any width and a fresh model's logits a std of 3-6. `fan_in` draws the same numbers scaled by 1/sqrt(C), leaves every
    other weight as it was, and starts the logits near zero; a saved model keeps the setting and its weights."""
    fan_in, fan_out = build(one_channel_conv_init="fan_in"), build(one_channel_conv_init="fan_out")
    convs_in, convs_out = (
        [m for m in model.modules() if isinstance(m, ConvToOneChannel)] for model in (fan_in, fan_out)
    )
    assert len(convs_in) == 4  # the mask head and the three SSAs' spatial gates
    for a, b in zip(convs_in, convs_out):
        torch.testing.assert_close(a.weight * a.in_channels**0.5, b.weight)
    changed = {id(c.weight) for c in convs_in}
    for (name, p), q in zip(fan_in.state_dict(keep_vars=True).items(), fan_out.state_dict().values()):
        assert id(p) in changed or torch.equal(p, q), name
    x, _, _ = blob_batch(2, 128)
    with torch.no_grad():
        small, large = (float(model.train()(x).logits.std()) for model in (fan_in, fan_out))
    assert small < 1.5 < 3 * small < large

    assert STPNetConfig().one_channel_conv_init == "fan_in"  # the default
    fan_in.save_pretrained(tmp_path)
    reloaded = STPNetForSemanticSegmentation.from_pretrained(tmp_path)
    assert reloaded.config.one_channel_conv_init == "fan_in"
    assert torch.equal(reloaded.head.weight, fan_in.head.weight)
    with pytest.raises(ValueError, match=r"one_channel_conv_init must be 'fan_in' or 'fan_out', got 'xavier'"):
        tiny_config(one_channel_conv_init="xavier")


def test_init_weights_has_no_branch_that_transformers_skips() -> None:
    """transformers never calls `_init_weights` on a remote-code module without parameters of its own, so a branch
    for one would be dead code (a `trunc_normal_` of the position embeddings was, until this test). Applying it to
    every module by hand must leave a fresh model exactly as built."""
    model = build(zero_init_ssa=True)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    skipped = [m for m in model.modules() if not list(m.parameters(recurse=False)) and not list(m.buffers(False))]
    with torch.no_grad():
        for module in skipped:
            model._init_weights(module)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_segmentation_loss_reaches_retrieval() -> None:
    """The straight-through choice lets the mask loss train the retrieval network (the authors' code did not)."""
    model = build().train()
    x, y, _ = blob_batch(2, 128)
    model(x, labels=y).loss.backward()
    assert model.retrieval.token_mlp[0].weight.grad.abs().sum() > 0
    assert model.retrieval.logit_scale.grad is not None


@pytest.mark.parametrize("detach", [False, True])
def test_shared_retrieval_detach_keeps_retrieval_gradients_out_of_the_encoder(detach: bool) -> None:
    """With the shared backbone the retrieval losses reach the encoder unless `shared_retrieval_detach` is set;
    the retrieval network itself trains either way."""
    model = build(retrieval_backbone="shared", shared_retrieval_detach=detach).train()
    x, _, t = blob_batch(2, 128)
    out = model(x, text_labels=t)  # retrieval and classifier losses only
    out.loss.backward()
    assert model.retrieval.token_mlp[0].weight.grad.abs().sum() > 0
    encoder_grad = model.down_blocks[3].conv[0][0].weight.grad
    assert (encoder_grad is None or encoder_grad.abs().sum() == 0) == detach


def test_teacher_forcing_uses_the_true_text() -> None:
    model = build(teacher_forcing_prob=1.0).train()
    x, y, t = blob_batch(2, 128)
    forced = model._select_text([torch.zeros(2, n) for n in (2, 2, 8, 8)], t[:2])
    for k, emb in enumerate(model.text_embeddings()):
        assert torch.allclose(forced[k], emb[t[:2, k]])


def test_save_load_round_trip_identical_logits(tmp_path: Path) -> None:
    model = build().eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        before = model(x)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_stpnet.py", "configuration_stpnet.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForSemanticSegmentation"]
    loaded = STPNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = loaded(x)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.retrieved_indices, after.retrieved_indices)
    for a, b in zip(model.text_embeddings(), loaded.text_embeddings()):
        assert torch.equal(a, b)


# What a checkpoint carries: the configuration, the modeling files and the image processor. Text encoding, data
# preparation, training and the inference rewrites (`stpnet.optimize`) stay in the package.
MODEL_CODE = [
    "backbone_stpnet.py",
    "blocks.py",
    "configuration_stpnet.py",
    "losses.py",
    "modeling_stpnet.py",
    "retrieval_stpnet.py",
    "transformer_stpnet.py",
]
CHECKPOINT_FILES = ["config.json", "image_processing_stpnet.py", "model.safetensors", "preprocessor_config.json"]


@pytest.mark.parametrize("model_type", ["stpnet", "unet"])
def test_a_checkpoint_carries_the_model_only(tmp_path: Path, model_type: str) -> None:
    from benchmarks.unet import UNetConfig, UNetForSemanticSegmentation

    model = build() if model_type == "stpnet" else UNetForSemanticSegmentation(UNetConfig(base_channels=8))
    model.save_pretrained(tmp_path)
    STPNetImageProcessor().save_pretrained(tmp_path)
    # The U-Net baseline lives with the benchmarks and imports its blocks from the installed `modeling_stpnet`.
    code = ["unet.py"] if model_type == "unet" else MODEL_CODE
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*code, *CHECKPOINT_FILES])


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    build().save_pretrained(tmp_path)
    other = tiny_config(base_channels=32)
    with pytest.raises(RuntimeError, match="size mismatch|mismatch"):
        STPNetForSemanticSegmentation.from_pretrained(tmp_path, config=other)


def test_wrong_text_embeddings_are_refused() -> None:
    model = build()
    with pytest.raises(ValueError, match="expects"):
        model.set_text_embeddings([torch.zeros(2, 30, 768)] * 4)


def test_bad_pixel_values_and_labels() -> None:
    model = build().eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 100, 128))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(1, 1, 128, 128))
    with pytest.raises(ValueError, match="labels must be"):
        model(torch.randn(1, 3, 128, 128), labels=torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="text_labels must be"):
        model(torch.randn(1, 3, 128, 128), text_labels=torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("image_size", 100, "multiple of 32"),
        ("retrieval_backbone", "vgg16", "retrieval_backbone"),
        ("base_channels", 0, "base_channels"),
        ("num_attention_heads", 7, "num_attention_heads"),
        ("teacher_forcing_prob", 1.5, "teacher_forcing_prob"),
        ("text_sentences", [["only one"], ["a", "b"], ["a", "b"], ["a", "b"]], "at least 2"),
        ("text_categories", ["a", "b"], "category names but"),
        ("ssa_dilations", [], "ssa_dilations"),
        ("ssa_dilations", [3, 0], "ssa_dilations"),
        ("use_text", "false", "use_text must be true or false, got 'false'"),
        ("dice_weight", "a", "dice_weight must be a number"),
        ("mlp_ratio", None, "mlp_ratio must be a number"),
    ],
)
def test_config_validation(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        STPNetConfig(**{field: value})


def test_presets_load_and_paper_size() -> None:
    names = {p.stem for p in PRESETS.glob("*.json")}
    assert {"stpnet-paper", "stpnet-small", "stpnet-tiny"} <= names
    for p in PRESETS.glob("*.json"):
        config = STPNetConfig.from_json_file(str(p))
        assert config.text_categories == ["laterality", "count", "left_location", "right_location"]
    from benchmarks.summary import count_parameters

    paper = STPNetForSemanticSegmentation(STPNetConfig.from_json_file(str(PRESETS / "stpnet-paper.json")))
    # The authors report 80 M used parameters (ResNet-101 42.5 M of them).
    assert 75e6 < count_parameters(paper) < 85e6
    assert 42e6 < count_parameters(paper.retrieval.backbone) < 43e6


def test_summary_gmacs_counts_real_work() -> None:
    from benchmarks.summary import count_gmacs

    small = count_gmacs(build(retrieval_backbone="shared"), 128)
    larger = count_gmacs(build(retrieval_backbone="shared"), 256)
    assert 0.3 < small < 3
    assert larger == pytest.approx(4 * small, rel=0.1)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys


    class HidePackage:
        # Act as a machine without this package: an editable install would otherwise stay importable.

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_stpnet":
                raise ImportError(f"{name} is hidden for this test")


    sys.meta_path.insert(0, HidePackage())
    try:
        import modeling_stpnet  # noqa: F401
        sys.exit("modeling_stpnet is importable: the remote-code test would prove nothing")
    except ImportError:
        pass
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline
    from PIL import Image
    ckpt = sys.argv[1]
    model = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    seg = AutoModelForSemanticSegmentation.from_pretrained(ckpt, trust_remote_code=True)
    assert type(model).__name__ == type(seg).__name__ == "STPNetForSemanticSegmentation"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    processor = AutoImageProcessor.from_pretrained(ckpt, trust_remote_code=True)
    x = torch.load(sys.argv[2])
    with torch.no_grad():
        logits = model(x).logits
    expected = torch.load(sys.argv[3])
    # Another process may pick other CPU kernels/thread splits: equal up to float32 summation order.
    diff = (logits - expected).abs().max()
    assert torch.allclose(logits, expected, atol=1e-3), f"remote-code logits differ by {diff}"
    image = Image.new("RGB", (150, 100), (90, 40, 30))
    inputs = processor(image)
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k == "pixel_values"})
    mask = processor.post_process_semantic_segmentation(out, target_sizes=[(100, 150)])[0]
    assert mask.shape == (100, 150)
    print(processor.post_process_description(out, model.config)[0]["description"])
    # The image-segmentation pipeline checks the model's class name against transformers' built-in *_MAPPING_NAMES
    # tables only; a remote-code model can join AutoModelForSemanticSegmentation (its auto_map) but never those
    # tables, so transformers logs "... is not supported for image-segmentation" for every remote-code model and then
    # runs it all the same. Dropped here, where we call the pipeline, so a real message would still show.
    import logging
    logging.getLogger("transformers.pipelines.base").addFilter(lambda r: "is not supported for" not in str(r.msg))
    result = pipeline("image-segmentation", model=ckpt, trust_remote_code=True)(image)
    assert {r["label"] for r in result} <= {"background", "lesion"} and result[0]["mask"].size == (150, 100)
    print("REMOTE OK")
    """
)


# A MobileNetV2 (width 0.35) as the encoder and the retrieval network: the checkpoint must carry the backbone too.
BACKBONE = {
    "backbone_config": {"model_type": "mobilenet_v2", "depth_multiplier": 0.35, "tf_padding": False},
    "backbone_kwargs": {"out_features": ["conv_stem", "layer.1", "layer.4", "layer.11", "conv_1x1"]},
    "decoder_channels": [32, 16, 16, 8],
    "retrieval_backbone": "backbone",
}


COMMITTED = {
    "kvasir-seg": ROOT / "checkpoints" / "stpnet-kvasir-seg",
    "qata-cov19": ROOT / "checkpoints" / "stpnet-qata-cov19",
}


@pytest.mark.parametrize("encoder", ["paper", "backbone", "kvasir-seg", "qata-cov19"])
def test_remote_code_in_a_clean_process(tmp_path: Path, encoder: str) -> None:
    """A fresh checkpoint of each encoder kind, and the committed models as they are in the repository."""
    ckpt = tmp_path / "checkpoint"
    if encoder in COMMITTED:
        ckpt, model = COMMITTED[encoder], STPNetForSemanticSegmentation.from_pretrained(COMMITTED[encoder]).eval()
    else:
        model = build(**(BACKBONE if encoder == "backbone" else {})).eval()
        model.save_pretrained(ckpt)
        STPNetImageProcessor(size={"height": 128, "width": 128}).save_pretrained(ckpt)
    x = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "logits.pt")
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "check.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    # -I: isolated mode, so neither the repo root nor the current folder is on sys.path.
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            str(tmp_path / "check.py"),
            str(ckpt),
            str(tmp_path / "x.pt"),
            str(tmp_path / "logits.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REMOTE OK" in result.stdout and "is not supported for" not in result.stderr


def test_image_processor_feeds_the_model() -> None:
    model = build().eval()
    processor = STPNetImageProcessor(size={"height": 128, "width": 128})
    image = Image.fromarray((np.random.default_rng(0).random((90, 140)) * 255).astype(np.uint8), mode="L")
    inputs = processor([image, image.convert("RGBA")])
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"])
    masks = processor.post_process_semantic_segmentation(out, target_sizes=inputs["original_sizes"].tolist())
    assert [m.shape for m in masks] == [(90, 140), (90, 140)]
    described = processor.post_process_description(out, model.config)
    assert described[0]["description"].endswith(".")
    first = described[0]["categories"][0]
    assert first["category"] == "laterality" and 0 < first["probability"] <= 1
    assert sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-5)

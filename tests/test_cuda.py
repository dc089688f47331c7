"""STPNet on a CUDA GPU (every test skips without one; `python benchmarks/device_checks.py` runs them on a GPU machine).

The model runs the same code on every device; the predictor rewrites it with `optimize_for_inference`, with the
CPU-only forms (SSA's shifted taps, matrix-product upsampling) on the CPU and without them on a GPU. The GPU's numbers
are checked against the CPU's here: eval logits and retrieval, a training step's loss and gradients, bf16, a compiled
model, and the predictor. No test here needs the text encoder or a dataset (the models keep their placeholder
text embeddings), so they run on a machine that has only torch and transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import common
from modeling_stpnet import STPNetForSemanticSegmentation, STPNetImageProcessor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    """TF32 (cuDNN's default for convolutions) would put the GPU's float32 results ~1e-3 away from the CPU's."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny(randomise_batchnorm, **overrides) -> STPNetForSemanticSegmentation:
    config = common.variant_config(common.preset_configs(["stpnet-tiny"])["stpnet-tiny"], "default", **overrides)
    torch.manual_seed(0)
    model = STPNetForSemanticSegmentation(config)
    with torch.no_grad():
        randomise_batchnorm(model)
    return model


def batch(size: tuple[int, int] = (160, 128)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, *size, generator=g)
    masks = (torch.rand(2, *size, generator=g) > 0.7).float()
    return images, masks, torch.tensor([[0, 1, 2, 0], [1, 0, 0, 3]])


@pytest.mark.parametrize("backbone", ["shared", "resnet18"])
def test_eval_logits_and_retrieval_match_the_cpu(backbone: str, randomise_batchnorm) -> None:
    model = tiny(randomise_batchnorm, retrieval_backbone=backbone).eval()
    images, _, _ = batch()  # non-square; the 1/8 maps are smaller than the largest dilation
    with torch.inference_mode():
        expected = model(images)
        got = copy.deepcopy(model).to(CUDA)(images.to(CUDA))
    scale = expected.logits.abs().max()
    assert (got.logits.cpu() - expected.logits).abs().max() <= 1e-4 * scale
    assert torch.equal(got.retrieved_indices.cpu(), expected.retrieved_indices)


def test_training_step_matches_the_cpu(randomise_batchnorm) -> None:
    """Loss and every gradient of one training step (batch statistics, both losses), CPU against GPU."""
    model = tiny(randomise_batchnorm, teacher_forcing_prob=0.0).train()
    gpu_model = copy.deepcopy(model).to(CUDA)
    images, masks, text = batch()
    expected = model(images, labels=masks, text_labels=text)
    expected.loss.backward()
    got = gpu_model(images.to(CUDA), labels=masks.to(CUDA), text_labels=text.to(CUDA))
    got.loss.backward()
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-4)
    cpu_grads = dict(model.named_parameters())
    largest = max(p.grad.abs().max() for p in cpu_grads.values() if p.grad is not None)
    for name, p in gpu_model.named_parameters():
        reference = cpu_grads[name].grad
        assert (p.grad is None) == (reference is None), name
        if reference is not None:
            assert (p.grad.cpu() - reference).abs().max() <= 1e-3 * largest, name


def test_bfloat16_weights_and_autocast_stay_close_to_float32(randomise_batchnorm) -> None:
    model = tiny(randomise_batchnorm, retrieval_backbone="shared").eval().to(CUDA)
    images = batch()[0].to(CUDA)
    with torch.inference_mode():
        reference = model(images).logits.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = model(images).logits.float()
        low = copy.deepcopy(model).to(torch.bfloat16)(images.to(torch.bfloat16)).logits.float()
    # bf16 keeps 8 significant bits: through this random network the logits move by about 7 % (relative norm) and
    # about 1.3 % of the mask pixels flip, on the CPU as well; a broken bf16 path is off by the logits' own size.
    for logits in (autocast, low):
        assert torch.isfinite(logits).all()
        assert (logits - reference).norm() <= 0.15 * reference.norm()
        assert ((logits > 0) == (reference > 0)).float().mean() > 0.95


def test_compiled_model_matches_eager(randomise_batchnorm) -> None:
    model = tiny(randomise_batchnorm, retrieval_backbone="shared").eval().to(CUDA)
    images = batch((128, 128))[0].to(CUDA)
    with torch.inference_mode():
        eager = model(images)
        compiled = torch.compile(model)(images)
    assert (compiled.logits - eager.logits).abs().max() <= 1e-3 * eager.logits.abs().max()
    assert torch.equal(compiled.retrieved_indices, eager.retrieved_indices)


def test_predictor_on_the_gpu_gives_the_cpu_masks(tmp_path: Path, randomise_batchnorm) -> None:
    from stpnet.inference.predict import STPNetPredictor

    model = tiny(randomise_batchnorm, retrieval_backbone="shared", base_channels=8).eval()
    model.save_pretrained(tmp_path)
    STPNetImageProcessor(size={"height": 128, "width": 128}).save_pretrained(tmp_path)
    image = Image.open(next((ROOT / "sample" / "kvasir-seg-mini" / "images").glob("*.jpg"))).convert("RGB")
    on_gpu = STPNetPredictor.from_pretrained(str(tmp_path), device="cuda")
    on_cpu = STPNetPredictor.from_pretrained(str(tmp_path), device="cpu")
    assert on_gpu.device.type == "cuda"
    (got,), (expected,) = on_gpu.predict([image]), on_cpu.predict([image])
    assert got.mask.shape == expected.mask.shape == (image.height, image.width)
    assert (got.mask == expected.mask).mean() > 0.999
    assert [c["sentence"] for c in got.categories] == [c["sentence"] for c in expected.categories]

"""Small training runs that several test files share: the tiny dataset, the ~1 M parameter run settings and a tiny
baseline model for ``model_factory``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput

from modeling_stpnet.losses import dice_loss
from stpnet.data import load_stpnet_dataset
from stpnet.training import load_train_config
from stpnet.training.model import load_repository

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = ROOT / "configuration" / "train" / "sample-tiny.yaml"


def hub_script(name: str) -> ModuleType:
    """``hub_scripts/<name>.py`` as a fresh module, so its ``main()`` runs in this process (no second interpreter)."""
    spec = importlib.util.spec_from_file_location(f"hub_scripts_{name}", ROOT / "hub_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_dataset(folder: Path) -> Path:
    """8 train / 4 validation / 4 test pairs of the bundled Kvasir-SEG sample, saved to disk in ``folder``."""
    repository = load_repository(load_train_config(SAMPLE_CONFIG))
    sample = load_stpnet_dataset(ROOT / "sample" / "kvasir-seg-mini", repository, progress=False)
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        sample[split] = sample[split].select(range(n))
    sample.save_to_disk(str(folder))
    return folder


def tiny_overrides(dataset: Path, output: Path, **extra) -> list[str]:
    """A ~1 M parameter STPNet at 64 px: fast enough for several runs per test on 2 busy cores."""
    settings = {
        "data.dataset": str(dataset),
        "output_dir": str(output),
        "data.image_size": 64,
        "data.test_split": "null",
        "model.overrides": "{base_channels: 8, retrieval_backbone: shared}",
        "train.batch_size": 2,
        "train.epochs": 2,
        "train.warmup_steps": 2,
        "train.checkpoint_every_steps": 0,
        "train.progress": "false",
        "train.tensorboard": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


class TinySegConfig(PretrainedConfig):
    model_type = "tiny-seg-test"


class TinySegModel(PreTrainedModel):
    """A BatchNorm-free two-conv segmenter with the baseline interface: forward(pixel_values, labels)."""

    config_class = TinySegConfig

    def __init__(self, config: TinySegConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SemanticSegmenterOutput:
        logits = self.net(pixel_values)
        loss = None
        if labels is not None:
            target = labels[:, None].float()
            loss = dice_loss(logits, target) + nn.functional.binary_cross_entropy_with_logits(logits, target)
        return SemanticSegmenterOutput(loss=loss, logits=logits)


def tiny_factory(config, repository) -> TinySegModel:
    return TinySegModel(TinySegConfig())

"""Small training runs that several test files share: the tiny dataset and the ~1 M parameter run settings."""

from __future__ import annotations

from pathlib import Path

from modeling_stpnet.data import load_stpnet_dataset
from modeling_stpnet.training import load_train_config
from modeling_stpnet.training.model import load_repository

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = ROOT / "configuration" / "train" / "sample-tiny.yaml"


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

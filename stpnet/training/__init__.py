"""Training, evaluation and checkpoint selection for STPNet (needs the ``train`` extra: Accelerate, datasets, ...).

    from stpnet.training import load_train_config, run_training
    result = run_training(load_train_config("configuration/train/sample-tiny.yaml", ["train.max_steps=20"]))

See :func:`run_training` for the returned dict and for training other models (``model_factory``).
"""

from stpnet.training.config import ConfigError, TrainConfig, config_from_dict
from stpnet.training.config_files import apply_overrides, load_train_config, read_config_file
from stpnet.training.evaluation import evaluate_split
from stpnet.training.model import build_model_config, build_stpnet_model, load_repository
from stpnet.training.resume import LoopState, TrainingInterrupted
from stpnet.training.trainer import run_training

__all__ = [
    "ConfigError",
    "LoopState",
    "TrainConfig",
    "TrainingInterrupted",
    "apply_overrides",
    "build_model_config",
    "build_stpnet_model",
    "config_from_dict",
    "evaluate_split",
    "load_repository",
    "load_train_config",
    "read_config_file",
    "run_training",
]

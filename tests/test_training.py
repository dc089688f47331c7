"""Training: smoke run, exact resume after SIGKILL and after SIGTERM, real 2-process DDP, gradient accumulation,
models without text, augmentation, data order, config errors (CPU, offline)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from runs import ROOT, SAMPLE_CONFIG, TinySegModel, hub_script, tiny_factory, tiny_overrides
from safetensors.torch import load_file
from transformers import AutoModel

from modeling_stpnet import STPNetForSemanticSegmentation
from modeling_stpnet.losses import IGNORE_INDEX
from stpnet.data import MaskDescriber
from stpnet.training import ConfigError, load_train_config, run_training
from stpnet.training.augment import TextLabelPolicy, augment_pair, sample_generator
from stpnet.training.config import AugmentSection
from stpnet.training.data import EpochBatchSampler
from stpnet.training.model import load_repository
from stpnet.training.schedule import lr_factor

TRAIN_SCRIPT = ROOT / "hub_scripts" / "train.py"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


def run_cli(
    args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable]) + [str(TRAIN_SCRIPT), "--config", str(SAMPLE_CONFIG), *args]
    result = subprocess.run(command, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def as_cli(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# ---------------------------------------------------------------------------- end to end
def test_training_smoke_writes_a_loadable_best_model(tiny_dataset: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tiny_dataset, tmp_path / "run", **{"data.test_split": "test", "train.tensorboard": "true"}
    )
    result = run_training(load_train_config(SAMPLE_CONFIG, overrides))
    run = tmp_path / "run"
    history = result["history"]
    assert [row["step"] for row in history] == [4, 8]  # one row per epoch
    assert all(np.isfinite(row["train_loss"]) and row["train_loss"] > 0 for row in history)
    assert {"train_dice_loss", "train_retrieval_loss", "val_dice", "val_iou", "val_retrieval_mean"} <= set(history[0])
    norms = history[0]["train_segmentation_grad_norm"], history[0]["train_retrieval_grad_norm"]
    assert all(np.isfinite(n) and n > 0 for n in norms) and history[0]["train_grad_norm"] <= sum(norms)
    assert result["best_val_dice"] == max(row["val_dice"] for row in history)
    for name in ("history.csv", "history.json", "training_curves.png", "run.json", "train.log", "train_config.yaml"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    assert 0 <= result["test_metrics"]["dice"] <= 1 and (run / "test" / "metrics.json").is_file()

    best = Path(result["best_dir"])
    saved = {p.name for p in best.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "configuration_stpnet.py"} <= saved
    assert "text_repository.py" not in saved and "optimize.py" not in saved  # toolkit code stays out
    selection = json.loads((best / "selection.json").read_text())  # the model card states the data sizes from it
    assert selection["train_examples"] == 8 and selection["validation_examples"] == 4
    model = STPNetForSemanticSegmentation.from_pretrained(best)
    assert model.config.text_categories == ["count", "size", "horizontal", "vertical"]
    assert model.config.image_size == 64 and model.config.text_hidden_size == 384
    # the stored repository embeddings are the encoder's, not the placeholder random ones
    assert model.text_embeddings()[0].abs().sum() > 0 and model.text_embeddings()[0][:, -1].abs().sum() == 0
    auto = AutoModel.from_pretrained(best, trust_remote_code=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(auto(x).logits, model.eval()(x).logits, atol=1e-5)


RESUME_SETTINGS = {"train.max_steps": 10, "train.checkpoint_every_steps": 3, "train.keep_checkpoints": 5}


@pytest.fixture(scope="module")
def straight_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run that the killed and the terminated runs must end like."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    run_cli(as_cli(tiny_overrides(tiny_dataset, straight, **RESUME_SETTINGS)))
    return straight


def interrupt_and_resume(tiny_dataset: Path, folder: Path, ready: Callable[[], bool], sig: int) -> str:
    """Starts the run, sends ``sig`` once ``ready()``, resumes it to the end; returns the interrupted run's log."""
    command = [sys.executable, str(TRAIN_SCRIPT), "--config", str(SAMPLE_CONFIG)]
    command += as_cli(tiny_overrides(tiny_dataset, folder, **RESUME_SETTINGS))
    log_file = folder.with_suffix(".log")
    with log_file.open("w") as log:  # a file, not a pipe: a full pipe would stall the run
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 200
        while not ready():
            assert process.poll() is None, log_file.read_text()[-3000:]
            assert time.time() < deadline, "the run never got ready to be interrupted"
            time.sleep(0.01)
        os.kill(process.pid, sig)
        process.wait(timeout=200)
    assert process.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), log_file.read_text()[-3000:]
    done = sorted(p.name for p in (folder / "checkpoints").glob("step-*"))
    assert done and "step-0000010" not in done, "the run finished before it could be interrupted"
    arguments = [
        "--output-dir",
        str(folder),
        "--resume",
        *as_cli(tiny_overrides(tiny_dataset, folder, **RESUME_SETTINGS)),
    ]
    resumed = run_cli(arguments)
    assert "resumed from" in resumed.stdout + resumed.stderr
    return log_file.read_text()


def assert_same_end(straight: Path, resumed: Path) -> None:
    final_straight = load_file(straight / "checkpoints" / "step-0000010" / "model.safetensors")
    final_resumed = load_file(resumed / "checkpoints" / "step-0000010" / "model.safetensors")
    assert final_straight.keys() == final_resumed.keys()
    for name, tensor in final_straight.items():
        torch.testing.assert_close(final_resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    rows = [json.loads((run / "history.json").read_text()) for run in (straight, resumed)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    assert [r["val_dice"] for r in rows[0]] == pytest.approx([r["val_dice"] for r in rows[1]], abs=1e-6)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_dataset: Path, tmp_path: Path, straight_run) -> None:
    """Checkpoint at step 3 of 4 per epoch (mid-epoch), kill -9, resume: same final weights as a straight run."""
    killed = tmp_path / "killed"
    interrupt_and_resume(tiny_dataset, killed, (killed / "checkpoints" / "step-0000003").is_dir, signal.SIGKILL)
    assert_same_end(straight_run, killed)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(
    tiny_dataset: Path, tmp_path: Path, straight_run
) -> None:
    """SIGTERM (a scheduler's notice) as soon as training starts: a checkpoint after the current step, exit 143, and
    the resumed run ends with the same weights and history as an uninterrupted one."""
    stopped = tmp_path / "stopped"

    def started() -> bool:
        log = stopped / "train.log"
        return log.is_file() and "start:" in log.read_text()

    output = interrupt_and_resume(tiny_dataset, stopped, started, signal.SIGTERM)
    assert "interrupted: stopped by SIGTERM after step" in output and "--resume" in output
    assert "Traceback" not in output
    assert "interrupted: stopped by SIGTERM" in (stopped / "train.log").read_text()
    assert_same_end(straight_run, stopped)


def test_two_process_cpu_ddp_really_has_two_ranks(tiny_dataset: Path, tmp_path: Path) -> None:
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    # without ACCELERATE_USE_CPU, --multi_gpu on a CPU machine runs two unsynchronised copies
    overrides = tiny_overrides(tiny_dataset, tmp_path / "ddp", **{"train.max_steps": 2})
    run_cli(as_cli(overrides), launcher=launcher, env={"ACCELERATE_USE_CPU": "true"})
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["ranks"] == [0, 1]
    assert run["distributed_type"].endswith("MULTI_CPU")
    assert run["global_batch_size"] == 4 and run["steps"] == 2
    best = tmp_path / "ddp" / "best" / "model.safetensors"
    weights = best.read_bytes()

    # Every rank refuses the finished run the same way, and nothing of it is touched...
    ddp = {"launcher": launcher, "env": {"ACCELERATE_USE_CPU": "true"}}
    refused = run_cli(as_cli(overrides), **ddp, check=False)
    assert refused.returncode != 0 and "already holds the results of a run" in refused.stderr
    assert best.read_bytes() == weights
    # ...and --overwrite replaces it with a run fine-tuned from a copy of it, on both ranks.
    shutil.copytree(tmp_path / "ddp" / "best", tmp_path / "start")
    run_cli([*as_cli(overrides), "--overwrite", "--init-from", str(tmp_path / "start")], **ddp)
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["ranks"] == [0, 1]
    assert best.read_bytes() != weights


# ---------------------------------------------------------------------------- models other than the default
def test_gradient_accumulation_equals_the_large_batch(tiny_dataset: Path, tmp_path: Path) -> None:
    """Batch 4 vs batch 2 x 2 accumulation: same examples per step, same (mean) loss, so the same weights."""
    finals = []
    for name, batch, accumulation in (("large", 4, 1), ("accumulated", 2, 2)):
        overrides = tiny_overrides(
            tiny_dataset,
            tmp_path / name,
            **{"train.batch_size": batch, "train.gradient_accumulation_steps": accumulation, "train.max_steps": 3},
        )
        result = run_training(load_train_config(SAMPLE_CONFIG, overrides), model_factory=tiny_factory)
        assert result["steps"] == 3
        assert "val_retrieval_mean" not in result["history"][0]  # no retrieval logits: no retrieval metrics
        finals.append(load_file(tmp_path / name / "checkpoints" / "step-0000003" / "model.safetensors"))
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=0, atol=1e-6, msg=key)
    assert TinySegModel.from_pretrained(tmp_path / "large" / "best") is not None


def test_early_stopping_counts_evaluations_without_a_better_dice(tiny_dataset: Path, tmp_path: Path) -> None:
    # a learning rate of 1e-12 leaves the (BatchNorm-free) model unchanged, so validation Dice never improves
    settings = {"train.lr": 1e-12, "train.min_lr": 0, "train.eval_every_steps": 1, "train.early_stopping_patience": 2}
    config = load_train_config(SAMPLE_CONFIG, tiny_overrides(tiny_dataset, tmp_path / "stop", **settings))
    result = run_training(config, model_factory=tiny_factory)
    assert result["stopped_early"] and result["steps"] == 3 and result["best_step"] == 1
    assert [row["is_best"] for row in result["history"]] == [True, False, False]
    assert (tmp_path / "stop" / "checkpoints" / "step-0000003").is_dir()


def test_model_without_text_trains_in_bf16(tiny_dataset: Path, tmp_path: Path) -> None:
    settings = {"model.overrides.use_text": "false", "train.max_steps": 2, "train.mixed_precision": "bf16"}
    result = run_training(
        load_train_config(SAMPLE_CONFIG, tiny_overrides(tiny_dataset, tmp_path / "no-text", **settings))
    )
    assert json.loads((tmp_path / "no-text" / "run.json").read_text())["mixed_precision"] == "bf16"
    row = result["history"][-1]
    assert np.isfinite(row["train_loss"]) and "train_retrieval_loss" not in row and "val_retrieval_mean" not in row
    model = STPNetForSemanticSegmentation.from_pretrained(result["best_dir"])
    assert model.config.use_text is False


def test_stpnet_trains_in_fp16(tiny_dataset: Path, tmp_path: Path) -> None:
    """fp16 autocast (with accelerate's loss scaling) through the whole model: retrieval, UTrans, decoder. CPU
    autocast supports fp16, so this is the code path a GPU run takes, minus the CUDA kernels."""
    settings = {"train.max_steps": 2, "train.mixed_precision": "fp16", "train.clip_retrieval_separately": "true"}
    result = run_training(load_train_config(SAMPLE_CONFIG, tiny_overrides(tiny_dataset, tmp_path / "fp16", **settings)))
    assert json.loads((tmp_path / "fp16" / "run.json").read_text())["mixed_precision"] == "fp16"
    row = result["history"][-1]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["train_retrieval_loss"])
    # the norms are taken after unscaling: those of the true gradients, not of the scaled loss's (scale 65536)
    assert 0 < row["train_segmentation_grad_norm"] < 1000 and 0 < row["train_retrieval_grad_norm"] < 1000
    model = STPNetForSemanticSegmentation.from_pretrained(result["best_dir"])
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stay fp32


# ---------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("use_text", [True, False])
def test_gradient_clipping_joint_and_by_group(use_text: bool) -> None:
    """Joint clipping is bit for bit torch's clip_grad_norm_; separate clipping brings each network's norm to the
    limit on its own; the reported norms are those before clipping."""
    from accelerate import Accelerator

    from modeling_stpnet import STPNetConfig
    from stpnet.training.gradients import clip_gradients, gradient_groups

    torch.manual_seed(0)
    config = STPNetConfig(base_channels=8, image_size=64, retrieval_backbone="resnet18", use_text=use_text)
    model = STPNetForSemanticSegmentation(config).train()
    text_labels = torch.zeros(2, config.num_text_categories, dtype=torch.long) if use_text else None
    model(torch.randn(2, 3, 64, 64), labels=torch.ones(2, 64, 64), text_labels=text_labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    accelerator = Accelerator(cpu=True)
    groups = gradient_groups(model, accelerator)
    if not use_text:
        assert groups is None
        norms = clip_gradients(accelerator, model, groups, 0.5)
        assert set(norms) == {"grad_norm"}
        return
    assert {n for n, p in model.named_parameters() if any(p is q for q in groups["retrieval"])} == {
        n for n, _ in model.named_parameters() if n.startswith("retrieval.")
    }

    def group_norm(name: str) -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for p in groups[name]]))

    norms = clip_gradients(accelerator, model, groups, 0.5)
    assert norms["retrieval_grad_norm"] > 10 * norms["segmentation_grad_norm"]  # the imbalance the option is for
    assert norms["grad_norm"] == pytest.approx(
        math.hypot(norms["retrieval_grad_norm"], norms["segmentation_grad_norm"])
    )
    joint = {n: g.clone() for n, g in grads.items()}
    reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in joint.values()]
    for p, g in zip(reference, joint.values()):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    assert all(torch.equal(p.grad, ref.grad) for p, ref in zip((model.get_parameter(n) for n in joint), reference))

    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].clone()
    separate = clip_gradients(accelerator, model, groups, 0.5, separately=True)
    assert separate == norms
    assert group_norm("retrieval") == pytest.approx(0.5, rel=1e-4)
    expected = min(norms["segmentation_grad_norm"], 0.5)
    assert group_norm("segmentation") == pytest.approx(expected, rel=1e-4)


def test_augmentation_moves_image_and_mask_together() -> None:
    mask = torch.zeros(64, 64)
    mask[10:30, 5:20] = 1
    image = mask[None].repeat(3, 1, 1) * 2.0 - 1.0  # the mask itself, in the image's value range
    settings = AugmentSection(hflip=0.5, vflip=0.5, rot90=0.5, rotation=0.5, scale=0.5, rotation_degrees=30)
    changed = 0
    for index in range(24):
        result = augment_pair(image, mask, settings, sample_generator(0, 0, index), torch.full((3,), -1.0))
        recovered = (result.pixel_values[0] > 0).float()
        agreement = (recovered == result.labels).float().mean()
        assert agreement > 0.99, index  # bilinear edges may differ by a pixel
        changed += int(result.changed)
        again = augment_pair(image, mask, settings, sample_generator(0, 0, index), torch.full((3,), -1.0))
        assert torch.equal(again.pixel_values, result.pixel_values)  # a function of (seed, epoch, index)
    assert changed > 12


def test_text_labels_follow_the_augmented_mask() -> None:
    repository = load_repository(load_train_config(SAMPLE_CONFIG))  # kvasir-seg: descriptions from masks
    describer = MaskDescriber(repository)
    mask = torch.zeros(64, 64)
    mask[40:60, 2:14] = 1  # lower left
    labels = torch.tensor(describer.describe(mask.numpy() > 0))
    flip = AugmentSection(hflip=1.0, vflip=0.0, rot90=0.0, rotation=0.0)
    result = augment_pair(mask[None].repeat(3, 1, 1), mask, flip, sample_generator(0, 0, 0))
    horizontal = repository.categories.index("horizontal")
    recomputed = TextLabelPolicy("auto", describer)(labels, result)
    assert labels[horizontal] == 0 and recomputed[horizontal] == 2  # left became right
    assert torch.equal(TextLabelPolicy("ignore", None)(labels, result), torch.full_like(labels, IGNORE_INDEX))
    assert torch.equal(TextLabelPolicy("keep", None)(labels, result), labels)
    with pytest.raises(ValueError, match="auto_description"):
        TextLabelPolicy("recompute", None)


def test_data_order_is_seeded_sharded_and_resumable() -> None:
    single = [key for batch in EpochBatchSampler(10, 3, seed=5) for key in batch]
    assert sorted(i for _, i in single) == list(range(10)) and [i for _, i in single] != list(range(10))
    assert single == [key for batch in EpochBatchSampler(10, 3, seed=5) for key in batch]
    resumed = EpochBatchSampler(10, 3, seed=5)
    resumed.set_epoch(0, start_batch=2)
    assert list(resumed) == list(EpochBatchSampler(10, 3, seed=5))[2:]
    shards = [EpochBatchSampler(10, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    assert shards[0].batches_per_epoch == shards[1].batches_per_epoch == 2
    seen = [i for s in shards for batch in s for _, i in batch]
    assert sorted(set(seen)) == list(range(10)) and len(seen) == 10
    other_epoch = EpochBatchSampler(10, 3, seed=5)
    other_epoch.set_epoch(1)
    assert [i for b in other_epoch for _, i in b] != [i for _, i in single]


def test_cosine_restart_schedule_follows_the_paper() -> None:
    train = load_train_config(None, ["train.lr=3e-4", "train.min_lr=1e-4", "train.restart_epochs=10"]).train
    lrs = [3e-4 * lr_factor(step, train, updates_per_epoch=5, total_steps=200) for step in range(101)]
    assert lrs[0] == pytest.approx(3e-4) and lrs[50] == pytest.approx(3e-4)  # restart every 10 epochs = 50 steps
    assert min(lrs) >= 1e-4 and lrs[49] == pytest.approx(1e-4, rel=0.01)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.lrr=1e-3"], "Unknown configuration key 'train.lrr'; did you mean 'train.lr'"),
        (["trian.lr=1e-3"], "Unknown configuration key 'trian'"),
        (["train.lr=fast"], "train.lr must be a number"),
        (["train.optimizer=sgd"], "train.optimizer must be adamw or adam"),
        (["augment.hflip=2"], "augment.hflip must be a probability"),
        (["data.image_size=100"], "data.image_size must be a positive multiple of 32"),
        (["train.lr"], "section.key=value"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(SAMPLE_CONFIG, overrides)


def test_config_overrides_and_shipped_configs_load() -> None:
    config = load_train_config(
        SAMPLE_CONFIG, ["train.lr=1e-3", "model.overrides.use_text=false", "augment.scale_range=[0.9, 1.2]"]
    )
    assert config.train.lr == 1e-3 and config.model.overrides == {"use_text": False}
    assert config.augment.scale_range == [0.9, 1.2]
    for path in (ROOT / "configuration" / "train").glob("*.yaml"):
        load_train_config(path)
    cpu = load_train_config(ROOT / "configuration" / "train" / "kvasir-seg-cpu.yaml")  # base: kvasir-seg.yaml
    assert cpu.model.preset == "stpnet-tiny" and cpu.text.definition == "kvasir-seg" and cpu.augment.rot90 == 0.5


def test_missing_dataset_column_and_split_are_clear(tiny_dataset: Path, tmp_path: Path) -> None:
    # the QaTa repository's categories (laterality, ...) are not columns of a Kvasir dataset
    overrides = tiny_overrides(tiny_dataset, tmp_path / "x", **{"text.definition": "qata-cov19"})
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['laterality'"):
        run_training(load_train_config(SAMPLE_CONFIG, overrides))
    overrides = tiny_overrides(tiny_dataset, tmp_path / "y", **{"data.validation_split": "dev"})
    with pytest.raises(ConfigError, match="not \\['dev'\\]"):
        run_training(load_train_config(SAMPLE_CONFIG, overrides))
    overrides = tiny_overrides(tiny_dataset, tmp_path / "z", **{"model.overrides.base_chanels": 8})
    with pytest.raises(ConfigError, match="unknown STPNetConfig field"):
        run_training(load_train_config(SAMPLE_CONFIG, overrides))


def test_train_cli_reports_config_errors(capsys, tmp_path) -> None:
    cli = hub_script("train")
    assert cli.main(["--config", str(SAMPLE_CONFIG), "--set", "train.lrr=1e-3"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    # a fresh output folder: the config's default (outputs/sample-tiny) may hold the main job's run, which is refused
    out = ["--output-dir", str(tmp_path / "run")]
    assert cli.main(["--config", str(SAMPLE_CONFIG), "--dataset", "./no/such/folder", *out]) == 2
    assert "no such folder" in capsys.readouterr().err

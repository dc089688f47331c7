"""Output folders are never lost: push_to_hub's --dry-run only replaces an earlier dry run, training refuses to run
into an earlier run without --resume or --overwrite, --overwrite removes only what a run writes, and checkpoint
pruning goes by step number (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from runs import SAMPLE_CONFIG, hub_script, tiny_factory
from safetensors.torch import save_file

from stpnet.training import ConfigError, load_train_config, run_training
from stpnet.training.checkpoints import (
    check_output_dir,
    check_resume_config,
    clear_run,
    find_checkpoint,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def push() -> ModuleType:
    return hub_script("push_to_hub")


# ---------------------------------------------------------------------------------------------- push_to_hub --dry-run
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """The least build_folder needs: config.json, weights, the image processor config; metrics beside the run."""
    best = tmp_path / "run" / "best"
    best.mkdir(parents=True)
    (best / "config.json").write_text(json.dumps({"base_channels": 8, "image_size": 64}))
    save_file({"conv.weight": torch.zeros(2, 2)}, str(best / "model.safetensors"))
    (best / "preprocessor_config.json").write_text("{}")
    (tmp_path / "metrics.json").write_text(json.dumps({"dice": 0.5, "iou": 0.4, "num_images": 2, "split": "test"}))
    return best


def dry_run(push: ModuleType, checkpoint: Path, folder: Path) -> int:
    metrics = checkpoint.parents[1] / "metrics.json"
    return push.main(["--model", str(checkpoint), "--metrics", str(metrics), "--dry-run", str(folder)])


def test_dry_run_refuses_a_folder_it_did_not_write(push, checkpoint: Path, tmp_path: Path, capsys) -> None:
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Results}")
    (thesis / "README.md").write_text("my notes")  # a name build_folder writes does not make it a dry run
    assert dry_run(push, checkpoint, thesis) == 2
    err = capsys.readouterr().err
    assert str(thesis) in err and "thesis.tex" in err and "not an earlier dry-run folder" in err
    assert (thesis / "thesis.tex").read_text() == "\\chapter{Results}"
    assert (thesis / "README.md").read_text() == "my notes"

    (thesis / "figures").mkdir()  # folders are never written by build_folder
    (thesis / "thesis.tex").unlink()
    assert dry_run(push, checkpoint, thesis) == 2
    assert "figures/" in capsys.readouterr().err and (thesis / "README.md").is_file()

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    assert dry_run(push, checkpoint, a_file) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep"


@pytest.mark.parametrize("where", ["itself", "parent", "inside"])
def test_dry_run_never_touches_the_checkpoint(push, checkpoint: Path, where: str, capsys) -> None:
    folder = {"itself": checkpoint, "parent": checkpoint.parent, "inside": checkpoint / "hub"}[where]
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    assert dry_run(push, checkpoint, folder) == 2
    assert "checkpoint folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before
    assert not (checkpoint / "hub").exists()


def test_dry_run_replaces_an_earlier_dry_run(push, checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run" / "hub"
    assert dry_run(push, checkpoint, folder) == 0
    first = {p.name for p in folder.iterdir()}
    assert {"README.md", "metrics.json", "config.json", "model.safetensors"} <= first
    (folder / "selection.json").write_text("{}")  # from an earlier checkpoint that had one: replaced, not kept
    (folder / "modeling_stpnet.py").write_text("# older remote code")
    assert dry_run(push, checkpoint, folder) == 0  # scripts/main.sh reruns exactly this
    assert {p.name for p in folder.iterdir()} == first

    empty = tmp_path / "empty"
    empty.mkdir()
    assert dry_run(push, checkpoint, empty) == 0 and (empty / "README.md").is_file()


def test_dry_run_keeps_the_old_folder_when_the_checkpoint_is_broken(push, checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "hub"
    assert dry_run(push, checkpoint, folder) == 0
    (checkpoint / "model.safetensors").unlink()
    assert dry_run(push, checkpoint, folder) == 2
    assert (folder / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- the output-folder guard
def test_output_folder_guard(tmp_path: Path, capsys) -> None:
    fresh = tmp_path / "fresh"
    assert check_output_dir(fresh, None, False) is None
    fresh.mkdir()
    (fresh / "train.log").write_text("killed before its first evaluation\n")
    (fresh / "notes.txt").write_text("mine")
    assert check_output_dir(fresh, None, False) is None  # no results to lose

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "history.json").write_text("[]")
    refused = r"already holds the results of a run \(best, history.json\).*--resume.*--overwrite"
    with pytest.raises(ConfigError, match=refused):
        check_output_dir(run, None, False)
    with pytest.raises(ConfigError, match="exclude each other"):
        check_output_dir(run, True, True)
    with pytest.raises(ConfigError, match="no checkpoint to continue from.*--overwrite"):
        check_output_dir(run, "latest", False)  # starting afresh would replace best/ unasked
    assert check_output_dir(run, None, True) is None
    step = run / "checkpoints" / "step-0000004"
    step.mkdir(parents=True)
    with pytest.raises(ConfigError, match="step-0000004: not a checkpoint folder written by train.py"):
        check_output_dir(run, True, False)
    for name in ("model.safetensors", "optimizer.bin"):  # what accelerator.save_state writes
        (step / name).write_text("")
    assert check_output_dir(run, True, False) == step
    assert check_output_dir(run, str(step), False) == step

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"not a checkpoint folder written by train.py \(expected model.safetensors"):
        check_output_dir(run, str(notes), False)
    with pytest.raises(ConfigError, match="looks like a run folder.*--output-dir.*--resume"):
        check_output_dir(run, str(run), False)  # the run, not one of its checkpoints
    capsys.readouterr()


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_that_is_a_file_is_refused_up_front(tmp_path: Path, overwrite: bool, capsys) -> None:
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep")
    with pytest.raises(ConfigError, match="results.txt is a file, not a folder"):
        check_output_dir(a_file, None, overwrite)
    with pytest.raises(ConfigError, match=r"results.txt \(a folder above output_dir .*run\) is a file"):
        check_output_dir(a_file / "run", None, overwrite)
    train = hub_script("train")
    argv = ["--config", str(SAMPLE_CONFIG), "--output-dir", str(a_file)] + (["--overwrite"] if overwrite else [])
    assert train.main(argv) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "keep"


def test_resume_refuses_another_model_config(tmp_path: Path) -> None:
    run_yaml = tiny_config(tmp_path / "run").to_yaml()
    step = tmp_path / "run" / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    (tmp_path / "run" / "train_config.yaml").write_text(run_yaml)  # checkpoints from before the config was saved in it
    check_resume_config(step, tiny_config(tmp_path / "run", **{"train.max_steps": 9}).to_yaml())  # longer: fine
    other = tiny_config(tmp_path / "run", **{"model.preset": "stpnet-small", "model.overrides.base_channels": 4})
    with pytest.raises(ConfigError, match=r"another model config.*model.overrides.base_channels: None in the run, 4 now"
                       r"; model.preset: 'stpnet-tiny' in the run, 'stpnet-small' now"):  # fmt: skip
        check_resume_config(step, other.to_yaml())
    (step / "train_config.yaml").write_text(other.to_yaml())  # the checkpoint's own record wins
    check_resume_config(step, other.to_yaml())
    loose = tmp_path / "elsewhere"
    loose.mkdir()
    check_resume_config(loose, other.to_yaml())  # no record to compare with: load_state decides


def test_clear_run_removes_only_what_a_run_writes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    written = ["best/model.safetensors", "checkpoints/step-0000002/model.safetensors", "history.json", "history.csv",
               "checkpoints/.staging-step-0000003/optimizer.bin", "run.json", "train.log", "train_config.yaml",
               "training_curves.png", "tensorboard/x/events", "test/metrics.json", "test/per_image.csv",
               "test/overlays/best_01_cju0qkwl35piu0993l0dewei2_dice0.912.png",
               "test/overlays/worst_04_a_b_dicenan.png"]  # fmt: skip
    kept = ["notes.txt", "thesis/thesis.tex", "test/my-analysis.ipynb", "evaluation/metrics.json",
            "test/overlays/figure-3.png", "test/overlays/best_case.png", "checkpoints/README.md",
            "checkpoints/step-final-export/model.safetensors"]  # fmt: skip
    for name in written + kept:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    clear_run(run)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == sorted(kept)
    assert not (run / "best").exists()

    for name in kept:  # folders a run's files emptied go too
        if name.startswith(("checkpoints/", "test/overlays/")):
            (run / name).unlink()
    (run / "checkpoints" / "step-final-export").rmdir()
    (run / "checkpoints" / "step-0000009").mkdir()
    (run / "test" / "overlays" / "best_01_x_dice0.500.png").write_text("")
    clear_run(run)
    assert not (run / "checkpoints").exists() and not (run / "test" / "overlays").exists()
    assert (run / "test" / "my-analysis.ipynb").is_file()

    only_ours = tmp_path / "only-ours"
    (only_ours / "test").mkdir(parents=True)
    (only_ours / "test" / "metrics.json").write_text("{}")
    clear_run(only_ours)
    assert list(only_ours.iterdir()) == []  # the emptied test/ goes too


# ---------------------------------------------------------------------------------------------- checkpoints by step
class FakeAccelerator(SimpleNamespace):
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_text("new")


def test_pruning_goes_by_step_and_spares_newer_numbers(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for name in ("step-0000001", "step-0005000", "step-10000000", "notes"):
        (root / name).mkdir(parents=True)
    save_checkpoint(FakeAccelerator(), tmp_path, 2, keep=1)
    # step-0005000 sorts after step-0000002 by name: it used to make the new checkpoint the one deleted
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-0000002", "step-0005000", "step-10000000"]
    for step in (9999999, 10000001):  # 8 digits sort before 7 by name
        (root / f"step-{step:07d}").mkdir()
    assert find_checkpoint(tmp_path, "latest").name == "step-10000001"
    save_checkpoint(FakeAccelerator(), tmp_path, 10000002, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-10000001", "step-10000002"]


# ---------------------------------------------------------------------------------------------- training end to end
def tiny_config(output: Path, **extra):
    settings = {
        "output_dir": str(output),
        "data.image_size": 32,
        "data.test_split": "null",
        "augment.enabled": "false",
        "train.batch_size": 8,
        "train.max_steps": 2,
        "train.eval_every_steps": 1,
        "train.warmup_steps": 0,
        "train.checkpoint_every_steps": 1,
        "train.keep_checkpoints": 1,
        "train.progress": "false",
        "train.tensorboard": "false",
        **extra,
    }
    return load_train_config(SAMPLE_CONFIG, [f"{k}={v}" for k, v in settings.items()])


def test_training_refuses_an_earlier_run_and_overwrite_replaces_only_it(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run_training(tiny_config(run, **{"train.max_steps": 3}), model_factory=tiny_factory)
    (run / "checkpoints" / "step-0005000").mkdir()  # a longer earlier run's checkpoint, as in the reported loss
    (run / "notes.txt").write_text("mine")
    best = (run / "best" / "model.safetensors").read_bytes()

    with pytest.raises(ConfigError, match="already holds the results of a run.*--resume.*--overwrite"):
        run_training(tiny_config(run), model_factory=tiny_factory)
    assert (run / "best" / "model.safetensors").read_bytes() == best
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step-0000003", "step-0005000"}

    train = hub_script("train")
    assert train.main(["--config", str(SAMPLE_CONFIG), "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "--resume" in err and "--overwrite" in err
    assert train.main(["--config", str(SAMPLE_CONFIG), "--output-dir", str(run), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    bad_preset = ["--config", str(SAMPLE_CONFIG), "--output-dir", str(run), "--overwrite", "--set"]
    assert train.main([*bad_preset, "model.preset=stpnet-tinny"]) == 2
    assert "model.preset='stpnet-tinny'" in capsys.readouterr().err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # checked before anything was cleared
    assert (run / "best" / "model.safetensors").read_bytes() == best

    result = run_training(tiny_config(run), model_factory=tiny_factory, overwrite=True)
    assert result["steps"] == 2 and [row["step"] for row in result["history"]] == [1, 2]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"step-0000002"}  # the new run's, kept
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "run.json").read_text())["steps"] == 2

    with pytest.raises(ConfigError, match="another model config.*model.preset: 'stpnet-tiny' in the run"):
        run_training(tiny_config(run, **{"model.preset": "stpnet-small"}), resume=True)
    result = run_training(tiny_config(run, **{"train.max_steps": 3}), tiny_factory, resume=True)
    assert result["steps"] == 3 and (run / "checkpoints" / "step-0000003" / "train_config.yaml").is_file()


def test_a_batch_larger_than_the_split_is_noted_and_recorded(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    config = tiny_config(run, **{"train.batch_size": 64, "train.max_steps": 1, "train.checkpoint_every_steps": 0})
    run_training(config, model_factory=tiny_factory)
    assert "train.batch_size=64" in capsys.readouterr().out
    info = json.loads((run / "run.json").read_text())
    assert info["global_batch_size"] == 64 and info["effective_global_batch_size"] == info["train_examples"] == 32


def test_quality_benchmark_resumes_only_an_interrupted_run_of_the_same_config(tmp_path: Path) -> None:
    from benchmarks import quality

    run = tmp_path / "row"
    assert not quality.interrupted_run(run, "config: a\n", {})  # nothing there: a fresh row
    run.mkdir()
    (run / "train_config.yaml").write_text("config: a\n")
    assert not quality.interrupted_run(run, "config: a\n", {})  # killed before a checkpoint: trained afresh
    (run / "checkpoints" / "step-0000003").mkdir(parents=True)
    assert quality.interrupted_run(run, "config: a\n", {})
    assert not quality.interrupted_run(run, "config: b\n", {})  # another config: replaced, not continued
    (run / "run.json").write_text("{}")
    assert not quality.interrupted_run(run, "config: a\n", {})  # finished: reused or replaced by finished_run

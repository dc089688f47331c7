"""Bad configuration input gets a clear error naming the key, file or folder, and never loses data: model presets
with unknown keys, --set values that are not YAML, duplicate YAML keys, values the validation table refuses, and
push_to_hub --dry-run into another checkpoint (CPU, offline, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import hub_script
from safetensors.torch import save_file

from modeling_stpnet.configuration_stpnet import STPNetConfig
from stpnet.training import ConfigError, build_model_config, load_repository, load_train_config
from stpnet.training.config import MODEL_PRESETS, REPO_ROOT
from stpnet.training.model import read_model_preset

TRAIN_CONFIGS = sorted((REPO_ROOT / "configuration" / "train").glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------- model presets
@pytest.mark.parametrize("preset", sorted(p.stem for p in MODEL_PRESETS.glob("*.json")))
def test_every_shipped_preset_loads(preset: str) -> None:
    expected = json.loads((MODEL_PRESETS / f"{preset}.json").read_text())
    config = read_model_preset(preset)
    for key in ("base_channels", "backbone_config", "retrieval_backbone"):
        if key in expected:
            assert getattr(config, key) == expected[key], key


def test_a_saved_checkpoint_config_loads_as_a_preset(tmp_path: Path) -> None:
    config = STPNetConfig(base_channels=8)
    config.architectures = ["STPNetForSemanticSegmentation"]
    config.auto_map = {"AutoConfig": "configuration_stpnet.STPNetConfig"}
    config.save_pretrained(tmp_path)
    assert read_model_preset(str(tmp_path / "config.json")).base_channels == 8


def test_a_misspelt_preset_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    data = json.loads((MODEL_PRESETS / "stpnet-tiny.json").read_text())
    data["base_chanels"] = data.pop("base_channels")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="base_chanels.*did you mean 'base_channels'") as error:
        read_model_preset(str(path))
    assert str(path) in str(error.value)


def test_a_file_that_is_not_a_model_config_is_refused(tmp_path: Path) -> None:
    config = load_train_config(None, ["model.preset=configuration/text/kvasir-seg.json"])
    with pytest.raises(ConfigError, match="not STPNetConfig fields") as error:
        build_model_config(config, load_repository(config))
    assert "kvasir-seg.json" in str(error.value) and "model.preset" in str(error.value)

    other = tmp_path / "bert.json"
    other.write_text(json.dumps({"model_type": "bert", "base_channels": 8}))
    with pytest.raises(ConfigError, match="'bert' config, not an STPNet one"):
        read_model_preset(str(other))
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_model_preset(str(listing))


def test_a_misspelt_model_override_gets_a_suggestion() -> None:
    config = load_train_config(None, ["model.overrides={base_chanels: 8}"])
    with pytest.raises(ConfigError, match="did you mean 'base_channels'"):
        build_model_config(config, load_repository(config))


# ---------------------------------------------------------------------------------------------- YAML and --set parsing
@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_train_config_loads(path: Path) -> None:
    load_train_config(path)


def test_a_set_value_that_is_not_yaml_names_the_override() -> None:
    with pytest.raises(ConfigError, match=r"--set 'train.betas=\[0.9,'.*not valid YAML"):
        load_train_config(None, ["train.betas=[0.9,"])


def test_train_script_reports_bad_set_values_without_a_traceback(capsys) -> None:
    train = hub_script("train")
    config = str(REPO_ROOT / "configuration" / "train" / "sample-tiny.yaml")
    assert train.main(["--config", config, "--set", "train.betas=[0.9,"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set 'train.betas=[0.9,'") and "Traceback" not in err


@pytest.mark.parametrize("override", ["output_dir=no", "output_dir=true", "data.dataset=5", "train.optimizer=[adam]"])
def test_a_string_field_refuses_other_types(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} must be a string"):
        load_train_config(None, [override])
    assert load_train_config(None, ["output_dir='no'"]).output_dir == "no"
    assert load_train_config(None, {"output_dir": "no"}).output_dir == "no"  # flags are taken verbatim


def test_a_mixed_precision_no_says_to_quote_it() -> None:
    with pytest.raises(ConfigError, match="train.mixed_precision must be a string, got the boolean False.*quote"):
        load_train_config(None, ["train.mixed_precision=no"])


@pytest.mark.parametrize("base", ["5", "[a.yaml]", "''"])
def test_base_must_be_a_path(tmp_path: Path, base: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"base: {base}\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match="'base' must be the path of another YAML config") as error:
        load_train_config(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 1.0e-2\n", "'lr'"),
        ("train:\n  lr: 1.0e-3\ndata:\n  image_size: 64\ntrain:\n  epochs: 2\n", "'train'"),
    ],
)
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"duplicate key {key}") as error:
        load_train_config(path)
    assert str(path) in str(error.value)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_train_config(None, ["model.overrides={a: 1, a: 2}"])


def test_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("model:\n  overrides: &o {base_channels: 8}\ntrain: {}\n")
    assert load_train_config(path).model.overrides == {"base_channels": 8}


@pytest.mark.parametrize("section", ["0", "[]", "1.5", "abc"])
def test_a_section_must_be_a_mapping(section: str) -> None:
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        load_train_config(None, [f"model={section}"])
    assert load_train_config(None, ["model=null"]).model.preset == "stpnet-tiny"  # an empty section: defaults


# ---------------------------------------------------------------------------------------------- the validation table
@pytest.mark.parametrize(
    "override, message",
    [
        ("data.eval_batch_size=0", r"data.eval_batch_size must be >= 1 or null \(same as train.batch_size\)"),
        ("data.eval_batch_size=-3", r"data.eval_batch_size must be >= 1 or null \(same as train.batch_size\)"),
        ("train.max_grad_norm=-1", "train.max_grad_norm must be a finite number >= 0 or null"),
        ("train.max_grad_norm=.inf", "train.max_grad_norm must be a finite number >= 0 or null"),
        ("train.weight_decay=-1e-4", "train.weight_decay must be a finite number >= 0"),
        ("train.betas=[0.9,1.0]", r"train.betas must be two numbers in \[0, 1\)"),
        ("train.betas=[-0.1,0.999]", r"train.betas must be two numbers in \[0, 1\)"),
        ("train.betas=[0.9]", "train.betas must be two numbers"),
        ("augment.rotation_degrees=-5", r"augment.rotation_degrees must be in \[0, 180\]"),
        ("augment.rotation_degrees=181", r"augment.rotation_degrees must be in \[0, 180\]"),
        ("train.lr=.inf", "train.lr must be a finite number > 0"),
        ("train.lr=.nan", "train.lr must be a finite number > 0"),
        ("text.num_hidden_layers=-1", "text.num_hidden_layers must be >= 1"),
        ("text.num_hidden_layers=0", "text.num_hidden_layers must be >= 1"),
    ],
)
def test_the_validation_table_refuses(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{message}; got"):
        load_train_config(None, [override])


def test_the_validation_table_accepts_the_edges() -> None:
    config = load_train_config(
        None,
        [
            "data.eval_batch_size=null",
            "train.max_grad_norm=null",
            "train.weight_decay=0",
            "train.betas=[0.0,0.999]",
            "augment.rotation_degrees=180",
        ],
    )
    assert config.data.eval_batch_size is None and config.train.max_grad_norm is None
    assert load_train_config(None, ["data.eval_batch_size=2", "train.max_grad_norm=0"]).data.eval_batch_size == 2


# ---------------------------------------------------------------------------------------------- push_to_hub --dry-run
def write_checkpoint(folder: Path, fill: float = 0.0) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"base_channels": 8, "image_size": 64}))
    save_file({"conv.weight": torch.full((2, 2), fill)}, str(folder / "model.safetensors"))
    (folder / "preprocessor_config.json").write_text("{}")
    (folder / "selection.json").write_text(json.dumps({"step": int(fill)}))
    (folder / "train_config.yaml").write_text("train:\n  lr: 0.001\n")
    return folder


def test_dry_run_refuses_another_checkpoint(tmp_path: Path, capsys) -> None:
    push = hub_script("push_to_hub")
    best = write_checkpoint(tmp_path / "run1" / "best")
    other = write_checkpoint(tmp_path / "otherbest", fill=7.0)
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"dice": 0.5, "iou": 0.4, "num_images": 2, "split": "test"}))
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    args = ["--model", str(best), "--metrics", str(metrics), "--dry-run"]
    assert push.main([*args, str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--dry-run {other} holds a checkpoint" in err and "not an earlier dry-run folder" in err
    assert "model card README.md and metrics.json" in err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before

    # a README.md of one's own beside the checkpoint files is not the model card a dry run writes
    (other / "README.md").write_text("# my run\nnotes")
    (other / "metrics.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert push.main([*args, str(other)]) == 2
    assert "lacks a model card README.md" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    assert push.main([*args, str(notes)]) == 2
    assert f"--dry-run {notes} is not empty" in capsys.readouterr().err
    assert (notes / "README.md").read_text() == "my notes"

    # an earlier dry run (card + metrics beside config.json) is still replaced, even one from another checkpoint
    hub = tmp_path / "hub"
    assert push.main(["--model", str(other), "--metrics", str(metrics), "--dry-run", str(hub)]) == 0
    assert push.main([*args, str(hub)]) == 0
    assert json.loads((hub / "selection.json").read_text()) == {"step": 0}

"""Bad input to the command-line tools gets a clear error and loses no data: checkpoints whose weights do not fit
their config, invalid preprocessor configs, damaged weights, output folders and arguments of stpnet-predict,
hub_scripts/evaluate.py and hub_scripts/export_onnx.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from modeling_stpnet.predict import CheckpointError, load_checkpoint
from modeling_stpnet.predict_cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_predict import SAMPLE_IMAGE, read_csv, tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@cache
def script(name: str) -> ModuleType:
    """A hub_scripts/ script as a module (its main() runs in this process: no second interpreter to start)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "hub_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cli-errors") / "checkpoint")


def edited_copy(checkpoint: Path, folder: Path, **changes: object) -> Path:
    """The checkpoint with ``changes`` written into its config.json (the weights stay as saved)."""
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------------- checkpoints
def test_saved_checkpoints_load_without_problems(checkpoint: Path, tmp_path: Path) -> None:
    model, processor, notes = load_checkpoint(checkpoint)
    assert notes == [] and processor.size == {"height": 128, "width": 128}
    # A trained model (weights and BatchNorm statistics moved), with the recipe training saves beside it.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 64, 64), labels=(torch.rand(2, 64, 64) > 0.5).float()).loss.backward()
    optimizer.step()
    model.eval().save_pretrained(tmp_path / "trained")
    overrides = "{base_channels: 8, retrieval_backbone: shared}"
    (tmp_path / "trained" / "train_config.yaml").write_text(
        f"model:\n  preset: stpnet-tiny\n  overrides: {overrides}\n"
    )
    loaded, _, notes = load_checkpoint(tmp_path / "trained")
    assert notes == [f"the checkpoint has no preprocessor_config.json; using {model.config.image_size}x"
                     f"{model.config.image_size} and ImageNet statistics"]  # fmt: skip
    saved, restored = model.state_dict(), loaded.state_dict()
    assert set(saved) == set(restored) and any(k.startswith("text_embeddings_") for k in saved)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"use_text": False}, "missing from the file"),
        ({"use_ssa": False}, "does not use: ssa.0."),
        ({"base_channels": 16}, "of another shape: "),
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused(
    checkpoint: Path, tmp_path: Path, change: dict, expected: str
) -> None:
    folder = edited_copy(checkpoint, tmp_path / "edited", **change)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(folder)
    message = str(raised.value)
    assert str(folder) in message and expected in message and "Restore the `config.json`" in message


def test_config_change_without_a_weight_to_show_it_is_found_through_the_recipe(
    checkpoint: Path, tmp_path: Path
) -> None:
    folder = edited_copy(checkpoint, tmp_path / "heads", num_attention_heads=2)
    load_checkpoint(folder)  # no recipe: nothing to compare with (the weights have the same shapes)
    (folder / "train_config.yaml").write_text(
        "model:\n  preset: stpnet-tiny\n  overrides: {base_channels: 8, retrieval_backbone: shared}\n"
    )
    with pytest.raises(CheckpointError, match=r"`num_attention_heads` is 2 in config.json but 4 in the training"):
        load_checkpoint(folder)


def test_damaged_weights_are_named_without_the_missing_checkpoint_help(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "truncated"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code = main(["--model", str(folder), str(SAMPLE_IMAGE), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and "truncated `model.safetensors`" in err
    assert "No STPNet checkpoint" not in err
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"size": {"height": 100, "width": 100}}, "positive multiples of 32"), ({"image_std": [0.2, 0.0, 0.2]}, "std")],
)
def test_an_invalid_preprocessor_config_is_an_error_not_replaced_by_defaults(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: dict, expected: str
) -> None:
    folder = tmp_path / "processor"
    shutil.copytree(checkpoint, folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings.update(image_mean=[0.5, 0.5, 0.5], **change)  # custom statistics must not be swapped for ImageNet's
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=expected) as raised:
        load_checkpoint(folder)
    assert str(folder / "preprocessor_config.json") in str(raised.value)
    code = main(["--model", str(folder), str(SAMPLE_IMAGE), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2 and "preprocessor_config.json` is invalid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- stpnet-predict
def predict(checkpoint: Path, *args: str) -> int:
    return main(["--model", str(checkpoint), "--device", "cpu", *args])


def test_predict_output_dir_is_checked_and_earlier_results_are_kept(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine\n")
    for target in (a_file, a_file / "sub"):
        assert predict(checkpoint, str(SAMPLE_IMAGE), "--output-dir", str(target)) == 2
        assert "is a file; give a folder" in capsys.readouterr().err
    assert a_file.read_text() == "mine\n"

    # Inputs and outputs in one folder, as after `stpnet-predict data --output-dir data/predictions`.
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGE, data / "more" / "polyp.jpg")
    out = data / "predictions"
    assert predict(checkpoint, str(data), "--recursive", "--output-dir", str(out)) == 0
    assert "1 processed, 0 skipped" in capsys.readouterr().out
    (out / "masks" / "old.png").write_bytes((out / "masks" / "polyp.png").read_bytes())
    before = (out / "predictions.csv").read_text()

    assert predict(checkpoint, str(data), "--recursive", "--output-dir", str(out)) == 2
    err = capsys.readouterr().err
    assert "already holds results of an earlier run (predictions.csv, skipped.csv, masks/, overlays/)" in err
    assert "--overwrite" in err and (out / "predictions.csv").read_text() == before

    assert predict(checkpoint, str(data), "--recursive", "--output-dir", str(out), "--overwrite") == 0
    assert "1 processed, 0 skipped" in capsys.readouterr().out  # its own masks and overlays were not inputs
    assert [Path(r["file"]).name for r in read_csv(out / "predictions.csv")] == ["polyp.jpg"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["polyp.png"]  # no mask of an earlier run left

    # The output folder may even be the input folder: its images are read, the results of a run are not.
    same = tmp_path / "same"
    same.mkdir()
    shutil.copy(SAMPLE_IMAGE, same / "polyp.jpg")
    for extra in ([], ["--overwrite"]):
        assert predict(checkpoint, str(same), "--output-dir", str(same), *extra) == 0
        assert "1 processed, 0 skipped" in capsys.readouterr().out
    assert (same / "polyp.jpg").read_bytes() == SAMPLE_IMAGE.read_bytes()


def test_predict_empty_folder_and_bad_max_pixels(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    Image.open(SAMPLE_IMAGE).save(tmp_path / "empty" / "nested" / "polyp.png")
    assert predict(checkpoint, str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")) == 1
    captured = capsys.readouterr()
    assert f"no images found in {tmp_path / 'empty'} (accepted: PNG/JPEG" in captured.err
    assert "--recursive" in captured.err and "0 processed, 1 skipped" in captured.out

    with pytest.raises(SystemExit) as raised:
        predict(checkpoint, str(SAMPLE_IMAGE), "--max-pixels", "0")
    assert raised.value.code == 2 and "--max-pixels must be at least 16384" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def small_split() -> object:
    from datasets import DatasetDict

    from modeling_stpnet.data import load_stpnet_dataset

    test = load_stpnet_dataset(str(ROOT / "sample" / "kvasir-seg-mini"), progress=False)["test"].select(range(2))
    return DatasetDict(test=test.remove_columns("size"))


def test_evaluate_refuses_bad_arguments_checkpoints_and_output_dirs(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    evaluate = script("evaluate").main
    with pytest.raises(SystemExit) as raised:
        evaluate(["--model", str(checkpoint), "--output-dir", str(tmp_path / "e"), "--batch-size", "0"])
    assert raised.value.code == 2 and "--batch-size must be at least 1" in capsys.readouterr().err

    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    assert evaluate(["--model", str(checkpoint), "--output-dir", str(a_file)]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"dice": 0.9}')
    assert evaluate(["--model", str(checkpoint), "--output-dir", str(earlier)]) == 2
    assert "already holds an evaluation (metrics.json)" in capsys.readouterr().err
    assert (earlier / "metrics.json").read_text() == '{"dice": 0.9}'

    wider = edited_copy(checkpoint, tmp_path / "wider", base_channels=16)
    assert evaluate(["--model", str(wider), "--output-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The weights of") and "of another shape" in err and "Traceback" not in err
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    (truncated / "model.safetensors").write_bytes(b"\x00" * 100)
    assert evaluate(["--model", str(truncated), "--output-dir", str(tmp_path / "e")]) == 2
    assert "Could not load the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evaluate_notes_a_missing_text_column_and_overwrites_on_request(
    checkpoint: Path,
    tmp_path: Path,
    small_split: object,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = script("evaluate")
    monkeypatch.setattr(module, "load_stpnet_dataset", lambda *args, **kwargs: small_split)
    out = tmp_path / "evaluation"
    (out / "overlays").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "overlays" / "worst_09.png").write_bytes(b"old")
    args = ["--model", str(checkpoint), "--output-dir", str(out), "--no-progress", "--overlays", "1", "--device", "cpu"]
    assert module.main([*args, "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "no label column 'size'" in err and "retrieval accuracy is left out" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and "no label column 'size'" in metrics["notes"][0]
    assert sorted(p.name for p in (out / "overlays").iterdir())[-1].startswith("worst_01")  # old panel gone


# ---------------------------------------------------------------------------------------------- export_onnx.py
def test_export_refuses_an_existing_output_and_bad_checkpoints(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    export = script("export_onnx").main
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"someone's model")
    with pytest.raises(SystemExit) as raised:
        export(["--model", str(checkpoint), "--output", str(existing)])
    assert raised.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"someone's model"

    edited = edited_copy(checkpoint, tmp_path / "no-ssa", use_ssa=False)
    with pytest.raises(SystemExit) as raised:
        export(["--model", str(edited), "--output", str(tmp_path / "new.onnx")])
    assert raised.value.code == 2 and "do not fit its `config.json`" in capsys.readouterr().err
    assert not (tmp_path / "new.onnx").exists()

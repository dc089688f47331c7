"""Faults while results are written: a full disk or a read-only folder while a checkpoint, the selected model or a
prediction is being written leaves the previous files whole and ends in the package's own error naming the file.

A full disk is the kernel's own write failure: RLIMIT_FSIZE makes every write past the limit fail (EFBIG), in this
process, for Python, PIL, torch and the Rust writer of safetensors alike; no root or tmpfs is needed. A read-only
folder is a read-only bind mount as root (permissions do not stop root), else a folder without write permission.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from properties import budget, outcome
from runs import SAMPLE_CONFIG, TinySegConfig, TinySegModel, hub_script, tiny_overrides

from modeling_stpnet import STPNetImageProcessor
from stpnet.inference.predict import Prediction
from stpnet.inference.prediction_files import PredictionWriter
from stpnet.safe_write import OutputWriteError, append_whole, save_image, write_text
from stpnet.training.checkpoints import save_best, save_checkpoint

resource = pytest.importorskip("resource")  # POSIX only
pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def full_disk(limit: int) -> Iterator[None]:
    """Every write of this process past ``limit`` bytes of a file fails, as on a full disk."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # pytest captures them into a file, which the limit would cut too
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode:
        pytest.skip("running as root without the right to mount: cannot make a folder read-only")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder), str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_leftovers(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if ".partial" in p.name or "staging" in p.name or "previous" in p.name]
    assert not left, left


# ---------------------------------------------------------------------------------------------- single files
def test_text_and_images_are_whole_or_absent(tmp_path: Path) -> None:
    target = tmp_path / "out" / "metrics.json"
    write_text(target, "old\n")
    with full_disk(1000), pytest.raises(OutputWriteError, match=r"metrics\.json.*previous version is kept") as error:
        write_text(target, "x" * 5000)
    assert error.value.filename == str(target) and "larger than this system allows" in str(error.value)
    assert target.read_text() == "old\n"
    picture = tmp_path / "out" / "mask.png"
    with full_disk(1000), pytest.raises(OutputWriteError, match="nothing was left under that name"):
        save_image(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), picture)
    assert not picture.exists()
    no_leftovers(tmp_path)


def test_appended_rows_are_cut_back_to_whole_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    rows = [f"{i},{'y' * 37}\r\n".encode() for i in range(100)]
    with open(path, "wb", buffering=0) as handle, full_disk(1000):
        with pytest.raises(OutputWriteError, match=r"rows\.csv.*rows before"):
            for row in rows:
                append_whole(handle, row, path, "the rows before are kept")
    data = path.read_bytes()
    assert 0 < len(data) <= 1000 and data.endswith(b"\r\n") and rows[0] + rows[1] == data[: 2 * len(rows[0])]


def test_a_failed_prediction_leaves_whole_rows_and_their_files(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    prediction = Prediction(Image.fromarray(image), image[..., 0] > 128, "a polyp.", [], 0.01)
    writer = PredictionWriter(tmp_path, [])
    writer.write(Path("first.jpg"), prediction)
    with full_disk(20_000), pytest.raises(OutputWriteError, match=r"overlays/second\.png"):
        writer.write(Path("second.jpg"), prediction)  # the mask fits, the noisy overlay does not
    writer.close()
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("first.jpg")
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["first.png"]  # second's mask taken back
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["first.png"]


# ---------------------------------------------------------------------------------------------- the selected model
@pytest.fixture
def best_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    save_best(TinySegModel(TinySegConfig()), STPNetImageProcessor(), run, {"step": 1}, "a: 1\n")
    return run


@pytest.mark.parametrize("fault", ["full disk", "read-only"])
def test_best_model_survives_a_failed_save(best_run: Path, fault: str) -> None:
    before = snapshot(best_run)
    torch.manual_seed(1)
    model = TinySegModel(TinySegConfig())
    if fault == "full disk":
        context, says = full_disk(400), "larger than this system allows"
    else:
        context, says = read_only(best_run), "ead-only|not writable|ermission"
    with context, pytest.raises(OutputWriteError, match=rf"Cannot write {best_run / 'best'}: .*({says})") as error:
        save_best(model, STPNetImageProcessor(), best_run, {"step": 2}, "a: 2\n")
    assert "previous version is kept" in str(error.value)
    assert snapshot(best_run) == before
    no_leftovers(best_run)


# ---------------------------------------------------------------------------------------------- a whole training run
def test_training_on_a_full_disk_keeps_the_earlier_checkpoint_and_model(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train = hub_script("train")
    run = tmp_path / "run"
    settings = {"train.max_steps": 2, "train.epochs": 1, "train.eval_every_steps": 1}
    arguments = [
        "--config",
        str(SAMPLE_CONFIG),
        *[a for o in tiny_overrides(tiny_dataset, run, **settings) for a in ("--set", o)],
    ]
    assert train.main(arguments) == 0
    before = snapshot(run / "checkpoints") | {f"best/{k}": v for k, v in snapshot(run / "best").items()}
    capsys.readouterr()
    with full_disk(100_000):  # the logs and the history fit, weights (~1 M parameters) do not
        status = train.main([*arguments, "--resume", "--max-steps", "4"])
    err = capsys.readouterr().err
    assert status == 1 and "error: Cannot write" in err and "larger than this system allows" in err, err
    assert "kept unchanged" in err and "Traceback" not in err
    after = snapshot(run / "checkpoints") | {f"best/{k}": v for k, v in snapshot(run / "best").items()}
    assert after == before
    no_leftovers(run)
    assert train.main([*arguments, "--resume", "--max-steps", "4"]) == 0  # with space again, the run continues
    assert (run / "checkpoints" / "step-0000004").is_dir()


def test_predict_cli_on_a_read_only_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_predict import SAMPLE_IMAGE, tiny_checkpoint

    from stpnet.inference.cli import main

    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    out = tmp_path / "predictions"
    out.mkdir()
    with read_only(out):
        status = main(["--model", str(checkpoint), str(SAMPLE_IMAGE), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and f"Cannot write {out}" in err and "Traceback" not in err, err
    assert not any(out.iterdir())


# ---------------------------------------------------------------------------------------------- a cut at any byte
def write_version(target: str, folder: Path, version: int) -> bool:
    """Version ``version`` of one kind of result in ``folder`` (other bytes than the version before); True."""
    torch.manual_seed(version)
    if target == "best model":
        save_best(TinySegModel(TinySegConfig()), STPNetImageProcessor(), folder, {"step": version}, f"v: {version}\n")
    elif target == "checkpoint":
        model = TinySegModel(TinySegConfig())
        accelerator = Accelerator(cpu=True)  # a fresh one: save_state saves every model prepared with it
        accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
        save_checkpoint(accelerator, folder, version, keep=2, config_yaml=f"v: {version}\n")
    else:
        writer = PredictionWriter(folder / f"predictions-{version}", [])
        image = np.random.default_rng(version).integers(0, 255, (60, 80, 3), dtype=np.uint8)
        for n in range(3):
            writer.write(Path(f"image{n}.jpg"), Prediction(Image.fromarray(image), image[..., n] > 99, "x.", [], 0.1))
        writer.close()
    return True


@budget(8)
@given(st.sampled_from(["best model", "checkpoint", "predictions"]), st.floats(0, 1.2))
def test_a_write_cut_off_at_any_byte_keeps_what_was_there(tmp_path_factory, target: str, cut: float) -> None:
    """A write that fails at any byte (the file size limit drawn from 0 to beyond the largest file) leaves every file
    that was there before as it was and nothing half written; or it succeeds whole."""
    folder = tmp_path_factory.mktemp("cut")
    write_version(target, folder, 1)
    before = snapshot(folder)
    limit = int(cut * max(len(data) for data in before.values()))
    with full_disk(max(limit, 1)):
        done = outcome("write faults", lambda: write_version(target, folder, 2), (OutputWriteError,),
                       [str(folder)])  # fmt: skip
    after = snapshot(folder)
    if target == "predictions":  # a run writes a new folder: the earlier one stays, the new one holds whole rows
        assert {k: v for k, v in after.items() if k.startswith("predictions-1")} == before
        rows = (folder / "predictions-2" / "predictions.csv").read_text().splitlines() if done is None else []
        for row in rows[1:]:
            assert (folder / "predictions-2" / row.split(",")[1]).is_file()
    elif done is None:
        assert after == before
    else:
        assert after != before
    no_leftovers(folder)

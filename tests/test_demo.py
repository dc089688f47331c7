"""The Gradio demo: its functions on bad and odd uploads, the gradio_client API, and a real headless Chromium."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import app  # noqa: E402
import screenshot  # noqa: E402
from test_predict import SAMPLE_IMAGE, png_header, tiny_checkpoint, write_bad_and_odd_files  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("demo") / "checkpoint")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    found = write_bad_and_odd_files(folder)
    found["bomb.png"] = folder / "bomb.png"
    found["bomb.png"].write_bytes(png_header(30_000, 30_000))
    found["tiny.png"] = folder / "tiny.png"
    Image.new("RGB", (1, 1)).save(found["tiny.png"])
    found["big.png"] = folder / "big.png"
    Image.new("RGB", (300, 200), (150, 60, 50)).save(found["big.png"])
    return found


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[str]:
    """The app launched on 127.0.0.1 (free port), as a user would reach it."""
    demo = app.build_demo(str(checkpoint))
    _, url, _ = app.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def assert_result(outputs: tuple, size: tuple[int, int]) -> None:
    overlay, mask_path, description, bars, measurements, details = outputs
    assert isinstance(overlay, Image.Image) and min(overlay.size) >= min(app.DISPLAY_MIN_SIDE, *size)
    assert overlay.width / overlay.height == pytest.approx(size[0] / size[1], rel=0.02)
    mask = Image.open(mask_path)
    assert mask.mode == "L" and mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert "What the model sees" in description and details["description"] in description
    assert 'id="stpnet-bars"' in bars and "%" in bars
    assert "Lesion area" in measurements and "pixels" in measurements and "Inference time" in measurements
    assert details["lesion_pixels"] == int((np.asarray(mask) > 0).sum())


# ---------------------------------------------------------------------------------------------- functions
@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("notes.txt", "unreadable image"),
        ("corrupt.jpg", "truncated"),
        ("tiny.png", "1x1"),
        ("bomb.png", "too large"),
    ],
)
def test_bad_uploads_get_a_message_and_the_app_keeps_working(
    checkpoint: Path, files: dict[str, Path], name: str, says: str
) -> None:
    overlay, mask, description, bars, measurements, details = app.segment(str(files[name]), str(checkpoint), 0.5)
    assert overlay is None and mask is None and bars == "" and measurements == ""
    assert description.startswith(f"### Cannot use `{name}`") and says in description
    assert str(files[name].parent) not in description  # no server folders in messages
    assert details == {"error": description}
    assert_result(app.segment(str(files["good.jpg"]), str(checkpoint), 0.5), Image.open(SAMPLE_IMAGE).size)


@pytest.mark.parametrize("name", ["rgba.png", "gray16.png"])
def test_rgba_and_16_bit_uploads_work(checkpoint: Path, files: dict[str, Path], name: str) -> None:
    assert_result(app.segment(str(files[name]), str(checkpoint), 0.5), Image.open(files[name]).size)


def test_huge_upload_is_downscaled_with_a_note(
    checkpoint: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "MAX_PIXELS", 15_000)  # a 300x200 file stands in for a 50-megapixel photo
    outputs = app.segment(str(files["big.png"]), str(checkpoint), 0.5)
    assert Image.open(outputs[1]).width * Image.open(outputs[1]).height <= 15_000  # the mask of the smaller image
    assert "downscaled from 300x200" in outputs[4] and outputs[5]["notes"]


def test_threshold_changes_the_mask(checkpoint: Path) -> None:
    low = app.segment(str(SAMPLE_IMAGE), str(checkpoint), 0.05)[5]["lesion_pixels"]
    high = app.segment(str(SAMPLE_IMAGE), str(checkpoint), 0.95)[5]["lesion_pixels"]
    assert low >= high


def test_without_a_checkpoint_the_app_starts_and_explains(tmp_path: Path) -> None:
    missing = str(tmp_path / "outputs" / "sample-tiny" / "best")
    status = app.checkpoint_status(missing)
    assert "No model loaded" in status and "scripts/main.sh" in status and "--checkpoint" in status
    assert "STPNET_CHECKPOINT" in status
    demo = app.build_demo(missing)  # builds (and would serve) without a model
    assert demo is not None
    message = app.segment(str(SAMPLE_IMAGE), missing, 0.5)[2]
    assert "No model loaded" in message and "scripts/main.sh" in message
    assert "Upload an image" in app.segment(None, missing, 0.5)[2]


def test_description_bars_escape_html() -> None:
    bars = app.description_bars(
        [{"category": "size", "sentence": "<b>big</b>", "probability": 0.7, "probabilities": {"<b>big</b>": 0.7}}]
    )
    assert "<b>big</b>" not in bars and "&lt;b&gt;big&lt;/b&gt;" in bars and "width:70.0%" in bars


def test_examples_are_test_split_images() -> None:
    examples = app.find_examples()
    assert examples and all(Path(p).is_file() for p in examples)
    test_stems = set((ROOT / "sample" / "kvasir-seg-mini" / "split_test.txt").read_text().split())
    assert {Path(p).stem for p in examples} <= test_stems


def test_space_staging(checkpoint: Path, tmp_path: Path) -> None:
    import deploy_space

    target = deploy_space.stage(tmp_path / "space", str(checkpoint))
    assert {"app.py", "README.md", "requirements.txt"} <= {p.name for p in target.iterdir()}
    assert (target / "stpnet" / "inference" / "predict.py").is_file() and (target / "modeling_stpnet").is_dir()
    assert (target / "checkpoint" / "config.json").is_file()
    assert list((target / "examples").glob("*.jpg"))
    metadata = (target / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in metadata and "app_file: app.py" in metadata
    assert "torch>=2.4,<2.14" in (target / "requirements.txt").read_text()


# ---------------------------------------------------------------------------------------------- served app
def test_gradio_client_api(served: str, checkpoint: Path, files: dict[str, Path]) -> None:
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    overlay, mask, description, bars, measurements, details = client.predict(
        handle_file(str(SAMPLE_IMAGE)), str(checkpoint), 0.5, api_name="/segment"
    )
    size = Image.open(SAMPLE_IMAGE).size
    assert Image.open(overlay).format == "PNG" and min(Image.open(overlay).size) >= app.DISPLAY_MIN_SIDE
    assert Image.open(mask).size == size and Image.open(mask).mode == "L"
    assert "What the model sees" in description and "Lesion area" in measurements
    assert details["width"] == size[0] and 0 <= details["lesion_percent"] <= 100
    error = client.predict(handle_file(str(files["notes.txt"])), str(checkpoint), 0.5, api_name="/segment")
    assert error[0] is None and "Cannot use" in error[2]
    again = client.predict(handle_file(str(files["gray16.png"])), str(checkpoint), 0.5, api_name="/segment")
    assert "What the model sees" in again[2]  # still serving after the bad upload


def test_locked_checkpoint_ignores_the_request(checkpoint: Path, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    demo = app.build_demo(str(checkpoint), lock_checkpoint=True)
    _, url, _ = app.launch(demo, server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        result = Client(url, verbose=False).predict(
            handle_file(str(SAMPLE_IMAGE)), "someone/untrusted-code", 0.5, api_name="/segment"
        )
    finally:
        demo.close()
    assert "What the model sees" in result[2] and result[5]["checkpoint"] == str(checkpoint)


NO_BROWSER = screenshot.why_no_browser()


@pytest.mark.skipif(NO_BROWSER is not None, reason=f"browser test needs Chromium and Playwright: {NO_BROWSER}")
def test_in_a_real_browser(served: str, files: dict[str, Path], tmp_path: Path) -> None:
    # A bad upload first (the page must say so and keep working), then an example from the gallery.
    seen = screenshot.drive(served, tmp_path / "example.png", bad_upload=files["notes.txt"])
    assert "Cannot use" in seen["bad_upload"] and "notes.txt" in seen["bad_upload"]
    assert "What the model sees" in seen["description"] and "Lesion area" in seen["measurements"]
    assert "%" in seen["bars"] and "kvasir-seg" in seen["status"]
    # A real upload of a 16-bit PNG through the file picker.
    seen = screenshot.drive(served, tmp_path / "upload.png", upload=files["gray16.png"])
    assert "What the model sees" in seen["description"] and "70x50" in seen["measurements"]
    for shot in ("example.png", "upload.png"):
        image = Image.open(tmp_path / shot)
        assert image.width >= 1000 and np.asarray(image.convert("L")).std() > 5  # a rendered page, not blank


def test_console_names_the_apps_share_option(monkeypatch, capsys) -> None:
    launched = {}

    class Blocks:
        def block_thread(self) -> None:
            launched["blocked"] = True

    def fake_launch(demo, **kwargs):
        launched.update(kwargs)
        return None, "http://127.0.0.1:7860/", None

    monkeypatch.setattr(app, "build_demo", lambda *args, **kwargs: Blocks())
    monkeypatch.setattr(app, "launch", fake_launch)
    monkeypatch.delenv("SPACE_ID", raising=False)
    app.main([])
    out = capsys.readouterr().out
    assert launched["quiet"] and launched["blocked"] and not launched["share"]  # Gradio's own hint is off
    assert "http://127.0.0.1:7860/" in out and "--share" in out and "share=True" not in out
    assert "Public link (temporary):  https://x.gradio.live" in app.launch_message("u", "https://x.gradio.live")
    assert "--share" not in app.launch_message("u", None, in_space=True)

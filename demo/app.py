"""STPNet lesion segmentation demo: a Gradio Blocks app that runs locally and as a Hugging Face Space.

    python demo/app.py                         # checkpoint: $STPNET_CHECKPOINT or checkpoints/stpnet-kvasir-seg
    python demo/app.py --checkpoint user/stpnet-kvasir   # a local folder or a Hub id

Upload an image (or click an example): the app shows the predicted mask over the image, offers the mask as a PNG,
and prints what the model itself retrieved from its text repository (one sentence per category, with its
probability), the lesion area and the inference time. Unreadable uploads get a message; the app keeps serving.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# In the repository the packages lie one folder up; in a Space they are copied next to this file.
for _root in (HERE, HERE.parent):
    if (_root / "stpnet").is_dir():
        if str(_root) not in sys.path:
            sys.path.insert(0, str(_root))
        break

from stpnet.extras import DEMO_MODULES, exit_unless_installed  # noqa: E402

if __name__ == "__main__":  # the install line instead of an import traceback
    exit_unless_installed("demo/app.py", "demo", DEMO_MODULES)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from stpnet.cpu_memory import keep_freed_memory, limit_arenas  # noqa: E402
from stpnet.data.io import DataError  # noqa: E402
from stpnet.inference.predict import (  # noqa: E402
    CHECKPOINT_ENV,
    CheckpointError,
    load_predictor,
    prepare_image,
    resolve_checkpoint,
    resolve_device,
)
from stpnet.safe_write import save_image  # noqa: E402
from stpnet.visualize import overlay_mask  # noqa: E402

SAMPLE = HERE.parent / "sample" / "kvasir-seg-mini"
# Space uploads are capped well below the CLI's limits: a free CPU Space has little memory.
MAX_PIXELS = 2048 * 2048
MAX_UPLOAD = "50mb"
# Load cannot exhaust memory: at most CONCURRENCY requests run the model at a time (one per core of a free CPU
# Space), all events sharing that one limit, so memory is bounded by CONCURRENCY x one image of at most MAX_PIXELS
# and its model input; up to QUEUE_SIZE more wait (an upload waits as a file on disk), and beyond that a request is
# refused at once with "queue is full" instead of piling up. benchmarks/load_demo.py measures the result.
CONCURRENCY = 2
QUEUE_SIZE = 64
DISPLAY_MIN_SIDE = 384  # small images (the bundled sample is 160 px high) are enlarged for viewing only
MASK_DIR = Path(tempfile.gettempdir()) / "stpnet-demo-masks"
MASK_LIFETIME_S = 3600  # Gradio copies each result into its own cache, so our files only need to outlive one request
CSS = """
.stpnet-bars { display: grid; grid-template-columns: max-content 1fr max-content; gap: 6px 10px; align-items: center; }
.stpnet-bars .track { background: var(--block-background-fill, #eee); border: 1px solid var(--border-color-primary);
  border-radius: 4px; height: 14px; overflow: hidden; min-width: 80px; }
.stpnet-bars .fill { background: var(--color-accent, #f97316); height: 100%; }
.stpnet-bars .cat { font-weight: 600; }
.stpnet-bars .alt { font-size: 0.9em; }
.stpnet-bars .alt-head { grid-column: 1 / -1; font-weight: 600; margin-top: 6px; }
"""


def find_examples(limit: int = 6) -> list[str]:
    """Example images: ``examples/`` next to the app (a Space), else the bundled sample's test split."""
    folder = HERE / "examples"
    if folder.is_dir():
        return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")][:limit]
    images = SAMPLE / "images"
    if not images.is_dir():
        return []
    # Test-split images only: they are official Kvasir-SEG validation images, which no committed or sample model saw.
    stems = (SAMPLE / "split_test.txt").read_text().split() if (SAMPLE / "split_test.txt").is_file() else []
    paths = [images / f"{stem}.jpg" for stem in stems] or sorted(images.glob("*.jpg"))
    return [str(p) for p in paths if p.is_file()][:limit]


def default_checkpoint(checkpoint: str | None = None) -> str:
    """``checkpoint``, else ``$STPNET_CHECKPOINT``, else ``checkpoint/`` next to the app (a Space), else the
    committed ``checkpoints/stpnet-kvasir-seg``."""
    bundled = HERE / "checkpoint"
    if not checkpoint and not os.environ.get(CHECKPOINT_ENV) and (bundled / "config.json").is_file():
        return str(bundled)
    return resolve_checkpoint(checkpoint)


def display_name(checkpoint: str) -> str:
    """A checkpoint folder relative to the working directory or the repository when inside them (shorter, and no
    server paths on the page); Hub ids and other folders unchanged. ``resolve_checkpoint`` maps it back."""
    path = Path(checkpoint)
    for base in (Path.cwd(), HERE.parent):
        if path.is_absolute() and path.is_relative_to(base.resolve()):
            return str(path.relative_to(base.resolve()))
    return checkpoint


def checkpoint_status(checkpoint: str | None) -> str:
    """Markdown line saying which checkpoint is loaded, or what to do when none can be."""
    name = resolve_checkpoint(checkpoint)
    try:
        predictor = load_predictor(name)
    except (CheckpointError, ValueError) as error:
        return f"### No model loaded\n\n{error}"
    config = predictor.config
    size = predictor.processor.size
    parameters = sum(p.numel() for p in predictor.model.parameters()) / 1e6
    notes = "".join(f" Note: {n}." for n in predictor.notes)
    return (
        f"**Model:** `{display_name(name)}`: text repository **{config.text_repository_name}** "
        f"({len(config.text_categories)} categories), input {size['height']}x{size['width']}, "
        f"{parameters:.1f} M parameters, on {predictor.device}.{notes}"
    )


def description_markdown(description: str | None, repository: str, retrieved: str | None = None) -> str:
    """The description under "What the model sees"; where the mask's verdict (no lesion) replaced the retrieved
    sentences, the verdict comes first and the sentences follow, marked as the retrieval network's alone."""
    if description is None:
        return "**This checkpoint has no text branch** (trained with `use_text=False`), so it retrieves no description."
    source = f"Retrieved by the model itself from its `{repository}` text repository (no text was given)."
    if retrieved is not None and retrieved != description:
        source = (
            f"The retrieval network, which always picks one sentence per category from its `{repository}` text "
            f"repository, chose: *{retrieved}* The mask shows no such lesion, so that is not a finding."
        )
    return f"### What the model sees\n\n> {description}\n\n{source}"


def description_bars(categories: Sequence[dict[str, Any]]) -> str:
    """HTML bars: the retrieved sentence of every category with its probability; the alternatives folded away."""
    if not categories:
        return ""

    def row(sentence: str, label: str, probability: float, css: str) -> str:
        percent = 100.0 * probability
        small = f"<br><small>{html.escape(label)}</small>" if label else ""
        return (
            f'<span class="{css}">{html.escape(sentence)}{small}</span>'
            f'<div class="track"><div class="fill" style="width:{percent:.1f}%"></div></div>'
            f'<span class="{css}">{percent:.0f} %</span>'
        )

    chosen = "".join(row(c["sentence"], c["category"], c["probability"], "cat") for c in categories)
    every = "".join(
        f'<span class="alt-head">{html.escape(c["category"])}</span>'
        + "".join(row(sentence, "", p, "alt") for sentence, p in c["probabilities"].items())
        for c in categories
    )
    return (
        f'<div class="stpnet-bars" id="stpnet-bars">{chosen}</div>'
        f'<details><summary>Probabilities of every sentence</summary><div class="stpnet-bars">{every}</div></details>'
    )


def _empty(message: str) -> tuple[Any, ...]:
    """Outputs for a request that produced no mask: only the message is shown."""
    return None, None, message, "", "", {"error": message}


def segment(file: str | None, checkpoint: str | None, threshold: float) -> tuple[Any, ...]:
    """Segment one uploaded file; every failure becomes a message in the app instead of an error.

    Returns, in order: overlay (PIL), mask PNG path, description (Markdown), probability bars (HTML), measurements
    (Markdown) and details (a JSON-able dict; ``{"error": message}`` when nothing was segmented).
    """
    if not file:
        return _empty("Upload an image or click an example first.")
    name = Path(file).name
    try:
        prepared = prepare_image(file, max_pixels=MAX_PIXELS)
    except DataError as error:
        reason = _without_folder(str(error), file).removeprefix(f"{name}: ")
        return _empty(
            f"### Cannot use `{name}`\n\n{reason}\n\nNothing was segmented: upload another image or click an example."
        )
    try:
        predictor = load_predictor(default_checkpoint(checkpoint))
    except (CheckpointError, ValueError) as error:
        return _empty(f"### No model loaded\n\n{error}")
    try:
        prediction = predictor.predict([prepared.image], threshold=float(threshold))[0]
    except (RuntimeError, ValueError) as error:  # e.g. out of memory: the app must keep serving the next request
        return _empty(f"### The model failed on `{name}`\n\n{error}")

    try:  # a full or read-only temporary folder must cost this request its mask, not the server
        mask_path = save_image(prediction.mask_image(), _new_mask_path(Path(name).stem))
    except OSError as error:
        return _empty(f"### Cannot save the mask of `{name}`\n\n{_without_folder(str(error), str(MASK_DIR))}")
    height, width = prediction.mask.shape
    notes = prepared.notes + predictor.notes
    if prediction.lesion_pixels == 0:
        notes.append("no pixel is above the threshold: lower it to see weaker detections")
    measurements = (
        f"**Lesion area:** {prediction.lesion_pixels:,} pixels, {prediction.lesion_percent:.2f} % of the "
        f"{width}x{height} image  \n**Inference time:** {1000 * prediction.seconds:.0f} ms on {predictor.device} "
        f"(threshold {float(threshold):.2f}; model loading excluded)" + "".join(f"  \n*Note: {n}.*" for n in notes)
    )
    details = {
        "file": name,
        "checkpoint": predictor.name,
        "threshold": float(threshold),
        "description": prediction.description,
        "retrieved_description": prediction.retrieved_description,
        "categories": prediction.categories,
        "lesion_pixels": prediction.lesion_pixels,
        "lesion_percent": round(prediction.lesion_percent, 4),
        "width": width,
        "height": height,
        "inference_ms": round(1000 * prediction.seconds, 2),
        "notes": notes,
    }
    return (
        display_overlay(prediction.image, prediction.mask),
        str(mask_path),
        description_markdown(
            prediction.description, predictor.config.text_repository_name, prediction.retrieved_description
        ),
        description_bars(prediction.categories),
        measurements,
        details,
    )


def display_overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The overlay for the page: images with a short side under ``DISPLAY_MIN_SIDE`` are enlarged first (the mask
    by nearest neighbour, so its outline stays sharp); the downloadable mask keeps the image's own size."""
    scale = DISPLAY_MIN_SIDE / min(image.size)
    if scale > 1:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC)
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return overlay_mask(image, mask)


def _new_mask_path(stem: str) -> Path:
    """A fresh folder per request keeps the user's file name without clashes; old ones are pruned."""
    MASK_DIR.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - MASK_LIFETIME_S
    for old in MASK_DIR.iterdir():
        try:
            if old.stat().st_mtime < cutoff:
                for child in old.iterdir():
                    child.unlink()
                old.rmdir()
        except OSError:  # another request is pruning the same folder
            pass
    return Path(tempfile.mkdtemp(dir=MASK_DIR)) / f"{stem}_mask.png"


def _without_folder(message: str, file: str) -> str:
    # Error messages name the file by its full path; in the app that is a server cache folder, so drop it.
    return message.replace(str(file), Path(file).name)


def build_demo(checkpoint: str | None = None, lock_checkpoint: bool | None = None) -> gr.Blocks:
    """The app. ``checkpoint``: folder or Hub id (default ``$STPNET_CHECKPOINT``, else the committed Kvasir-SEG model).

    ``lock_checkpoint`` (default: on in a Hugging Face Space) fixes the checkpoint: loading a user-chosen Hub id
    with ``trust_remote_code`` would run that repository's code on the server.
    """
    default = default_checkpoint(checkpoint)
    locked = bool(os.environ.get("SPACE_ID")) if lock_checkpoint is None else lock_checkpoint
    examples = find_examples()

    def run(file: str | None, chosen: str | None, threshold: float) -> tuple[Any, ...]:
        # The box shows a shortened name; map it back so another working directory cannot change its meaning.
        unchanged = not chosen or chosen.strip() == display_name(default)
        return segment(file, default if locked or unchanged else chosen, threshold)

    def run_example(threshold: float, chosen: str | None, evt: gr.SelectData) -> tuple[Any, ...]:
        path = examples[evt.index]
        return (path, *run(path, chosen, threshold))

    with gr.Blocks(title="STPNet lesion segmentation") as demo:
        gr.Markdown(
            "# STPNet: lesion segmentation that describes what it sees\n"
            "Scale-aware Text Prompt Network ([arXiv 2504.01561](https://arxiv.org/abs/2504.01561)). The model "
            "segments the lesion and retrieves, from the text repository stored in its checkpoint, one sentence per "
            "category. Research demo: not for diagnosis."
        )
        status = gr.Markdown(checkpoint_status(default), elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                file = gr.File(label="Image (PNG, JPEG, TIFF, BMP, 8 or 16 bit)", type="filepath", elem_id="upload")
                gallery = gr.Gallery(
                    value=[(p, f"example {i + 1}") for i, p in enumerate(examples)],
                    label="Examples (Kvasir-SEG test split): click one",
                    columns=3,
                    height=290,
                    allow_preview=False,
                    object_fit="cover",
                    interactive=False,
                    elem_id="examples",
                    visible=bool(examples),
                )
                with gr.Accordion("Settings", open=True):
                    chosen = gr.Textbox(
                        value=display_name(default),
                        label="Checkpoint (local folder or Hugging Face Hub id)",
                        interactive=not locked,
                        elem_id="checkpoint",
                    )
                    threshold = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Threshold", elem_id="threshold")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                with gr.Row():
                    overlay = gr.Image(
                        label="Predicted lesion (green) over the image",
                        type="pil",
                        format="png",
                        height=360,
                        elem_id="overlay",
                    )
                    with gr.Column():
                        mask = gr.File(label="Mask (PNG, 0/255)", elem_id="mask")
                        measurements = gr.Markdown(elem_id="measurements")
                description = gr.Markdown(elem_id="description")
                bars = gr.HTML(elem_id="bars")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(elem_id="details")
        outputs = [overlay, mask, description, bars, measurements, details]
        inputs = [file, chosen, threshold]
        model = {"concurrency_id": "model", "concurrency_limit": CONCURRENCY}  # one limit for every model call
        button.click(run, inputs, outputs, api_name="segment", **model)
        file.upload(run, inputs, outputs, api_visibility="private", **model)
        threshold.release(run, inputs, outputs, api_visibility="private", **model)
        file.clear(lambda: _empty(""), None, outputs, api_visibility="private")
        gallery.select(run_example, [threshold, chosen], [file, *outputs], api_visibility="private", **model)
        chosen.submit(checkpoint_status, chosen, status, api_visibility="private", **model)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    demo.stpnet_allowed_paths = sorted({str(Path(p).parent) for p in examples})  # for launch()
    return demo


def launch(demo: gr.Blocks, **kwargs: Any) -> tuple[Any, str, str]:
    """``demo.launch`` with the app's CSS, upload limit and example folder allowed (tests use this too)."""
    kwargs.setdefault("allowed_paths", getattr(demo, "stpnet_allowed_paths", []))
    kwargs.setdefault("max_file_size", MAX_UPLOAD)
    kwargs.setdefault("css", CSS)
    return demo.launch(**kwargs)


def launch_message(local_url: str, share_url: str | None, in_space: bool = False) -> str:
    """What the console says once the app serves. It replaces Gradio's own lines, whose hint "set `share=True` in
    `launch()`" points to code the user does not edit: here the option is ``--share``."""
    lines = [f"* Running on local URL:  {local_url}"]
    if share_url:
        lines.append(f"* Public link (temporary):  {share_url}")
    elif not in_space:
        lines.append("* For a temporary public gradio.live link, start the app with --share.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="STPNet lesion segmentation demo (Gradio)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint folder or Hub id (default: $STPNET_CHECKPOINT or checkpoints/stpnet-kvasir-seg)",
    )
    parser.add_argument("--host", default=None, help="server address (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    parser.add_argument(
        "--lock-checkpoint", action="store_true", help="hide the checkpoint choice (always on in a Space)"
    )
    parser.add_argument(
        "--keep-memory",
        action="store_true",
        help="on CPU, keep freed memory in the process: a forward pass a few percent faster, but memory then "
        "ratchets up to the peak of the largest uploads instead of returning to its level between requests",
    )
    args = parser.parse_args(argv)
    limit_arenas(CONCURRENCY)  # memory that returns to its level between requests, whatever the load
    if args.keep_memory and resolve_device("auto").type == "cpu":
        keep_freed_memory()
    demo = build_demo(args.checkpoint, lock_checkpoint=args.lock_checkpoint or None)
    # quiet: Gradio's own start-up lines are replaced by launch_message (same URL, our option's name)
    _, local_url, share_url = launch(
        demo, server_name=args.host, server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True
    )
    print(launch_message(local_url, share_url, in_space=bool(os.environ.get("SPACE_ID"))), flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()

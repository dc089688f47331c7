#!/usr/bin/env bash
# Create .venv and install the package with the given extras. torch is pinned so pip takes the CPU build.
set -euo pipefail
extras="${1:-dev}"
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch>=2.4,<2.14" -e ".[${extras}]"

#!/usr/bin/env bash
# Set up and run the whole test suite (CPU, offline). Installs Debian's Chromium for the browser test when
# running as root with apt; without it that one test skips with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
    || echo "chromium could not be installed; the browser test will skip"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q "$@"

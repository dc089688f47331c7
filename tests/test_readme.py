"""The README's quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_start_runs(tmp_path: Path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 14
    # Presets are referenced relative to the repo root; the checkpoint goes to a temporary folder.
    code = code.replace('"configuration/', f'"{ROOT}/configuration/')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quick start", "exec"), {})
    assert (tmp_path / "my-stpnet" / "model.safetensors").is_file()
    assert os.path.isfile(tmp_path / "my-stpnet" / "preprocessor_config.json")

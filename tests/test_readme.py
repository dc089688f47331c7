"""The README's quick start runs as written, and writes nothing into the working directory."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_start_runs(tmp_path: Path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    # Presets are referenced relative to the repo root.
    code = code.replace('"configuration/', f'"{ROOT}/configuration/')
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where tempfile puts the checkpoint, cleaned by pytest
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    folder = Path(namespace["folder"])
    assert folder.is_relative_to(tmp_path / "tmp") and (folder / "model.safetensors").is_file()
    assert (folder / "preprocessor_config.json").is_file()
    assert not any(work.iterdir())  # nothing written where the user runs it

"""The layout: the model package never imports the toolkit, and the import paths of the old layout still work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_model_package_imports_without_the_toolkit() -> None:
    code = (
        "import sys, modeling_stpnet.modeling_stpnet, modeling_stpnet.image_processing_stpnet\n"
        "loaded = sorted(m for m in sys.modules if m == 'stpnet' or m.startswith(('stpnet.', 'benchmarks')))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_no_model_file_names_the_toolkit() -> None:
    for path in (ROOT / "modeling_stpnet").glob("*.py"):
        if path.name == "__init__.py":  # its lazy table of moved modules names them on purpose
            continue
        text = path.read_text(encoding="utf-8")
        assert "import stpnet" not in text and "from stpnet" not in text, path.name


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("modeling_stpnet.predict", "stpnet.inference.predict"),
        ("modeling_stpnet.predict_cli", "stpnet.inference.cli"),
        ("modeling_stpnet.training.config", "stpnet.training.config"),
        ("modeling_stpnet.data.io", "stpnet.data.io"),
        ("modeling_stpnet.optimize", "stpnet.optimize"),
    ],
)
def test_old_module_paths_are_the_new_modules_with_a_warning(old: str, new: str) -> None:
    import importlib

    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=rf"`{old}` moved to `{new}`"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the module keeps its own spec (reload, pickling, runpy)


def test_old_top_level_names_still_import() -> None:
    from modeling_stpnet import ScaleAwareTextRepository
    from stpnet.text_repository import ScaleAwareTextRepository as moved

    assert ScaleAwareTextRepository is moved
    import modeling_stpnet

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        modeling_stpnet.nothing_here  # noqa: B018

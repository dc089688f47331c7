"""A script whose optional dependency is missing says which ``pip install`` line fixes it, with no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runs import ROOT

from stpnet.extras import MissingExtraError, install_hint, require_extra

# Runs a script as __main__ in a fresh interpreter in which the given top-level modules cannot be imported.
BLOCKED_RUN = textwrap.dedent(
    """
    import runpy, sys

    for name in sys.argv[1].split(","):
        sys.modules[name] = None  # what an absent package looks like to import and to importlib.util.find_spec
    script = sys.argv[2]
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
    """
)


def run_without(modules: str, script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", BLOCKED_RUN, modules, str(ROOT / script), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_require_extra_names_the_modules_and_the_install_line() -> None:
    require_extra("nothing", "demo", ["json"])  # present: no error
    with pytest.raises(MissingExtraError) as error:
        require_extra("the tool", "export", ["json", "no_such_module_xyz"])
    message = str(error.value)
    assert "the tool needs no_such_module_xyz, which is not installed" in message
    assert "-m pip install -e" in message and "[export]" in message and "no_such_module_xyz" in message
    assert "json" not in message.split("Install")[0].split("needs")[1]


def test_install_hint_uses_the_declared_requirement_when_installed() -> None:
    hint = install_hint("export", ["onnx"])
    assert hint.startswith(os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "")
    assert "pip install -e" in hint and "pip install" in hint.splitlines()[-1] and "onnx" in hint.splitlines()[-1]


def test_export_without_onnxscript_says_how_to_install_it(tmp_path: Path) -> None:
    result = run_without("onnxscript", "hub_scripts/export_onnx.py", "--model", "x", "--output", str(tmp_path / "m"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "export_onnx.py needs onnxscript" in result.stderr and "[export]" in result.stderr


def test_demo_without_gradio_says_how_to_install_it() -> None:
    result = run_without("gradio", "demo/app.py")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "demo/app.py needs gradio" in result.stderr and "pip install -e '.[demo]'" in result.stderr


def test_training_scripts_without_the_train_extra_say_how_to_install_it() -> None:
    for script in ("hub_scripts/train.py", "hub_scripts/evaluate.py", "hub_scripts/prepare_dataset.py"):
        result = run_without("accelerate,datasets", script, "--help")
        assert result.returncode == 1, script + result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "[train]" in result.stderr, script + result.stderr

"""Optional dependencies: a script whose extra is not installed says which ``pip install`` line fixes it.

The extras themselves are defined once, in ``setup.py`` (``train``, ``demo``, ``export``, ``dev``); the exact
requirement lines are read back from the installed package's metadata, so they cannot drift from it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

DISTRIBUTION = "stpnet"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTIONS: Mapping[str, str] = {"yaml": "pyyaml"}
TRAIN_MODULES = ("accelerate", "datasets", "pandas", "matplotlib", "yaml")
DEMO_MODULES = ("gradio",)
EXPORT_MODULES = ("onnx", "onnxruntime", "onnxscript")


class MissingExtraError(ImportError):
    """Optional packages are missing; the message names them and the command that installs them."""


def missing_modules(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (checked without importing them)."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def _requirement_lines(extra: str, distributions: Sequence[str]) -> list[str]:
    """The ``setup.py`` requirement of each distribution in ``extra`` (``onnx>=1.15``), else its bare name (a
    checkout used without installing, or a Space, has no package metadata)."""
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    specs: dict[str, str] = {}
    for line in declared:
        requirement, _, marker = line.partition(";")
        if f'extra == "{extra}"' in marker.replace("'", '"'):
            name = re.split(r"[<>=!~\[ ]", requirement.strip(), maxsplit=1)[0]
            specs[name.lower()] = requirement.strip().replace(" ", "")
    return [specs.get(name.lower(), name) for name in distributions]


def _shown_python() -> str:
    """The running interpreter as the user would type it: relative when it lies under the working directory."""
    python = Path(sys.executable)
    try:
        return str(python.relative_to(Path.cwd()))
    except ValueError:
        return str(python)


def install_hint(extra: str, modules: Sequence[str]) -> str:
    """The commands that install ``modules`` (the package's ``extra``) into the running interpreter."""
    python = _shown_python()
    root = os.path.relpath(REPO_ROOT) if REPO_ROOT.is_relative_to(Path.cwd()) else str(REPO_ROOT)
    target = f".[{extra}]" if root == "." else f"{root}[{extra}]"
    lines = _requirement_lines(extra, [DISTRIBUTIONS.get(m, m) for m in modules])
    exact = " ".join(shlex.quote(line) for line in lines)
    return (
        f"{python} -m pip install -e {shlex.quote(target)}   (the package's `{extra}` extra)\n"
        f"  or only these: {python} -m pip install {exact}"
    )


def require_extra(what: str, extra: str, modules: Sequence[str]) -> None:
    """Raise :class:`MissingExtraError` when any of ``modules`` is missing, naming them and the install line.

    Args:
        what: who needs them, for the message (e.g. ``"hub_scripts/export_onnx.py"``).
        extra: the ``setup.py`` extra that provides them.
        modules: import names to check.
    """
    missing = missing_modules(modules)
    if missing:
        raise MissingExtraError(
            f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"Install {'it' if len(missing) == 1 else 'them'} with:\n  {install_hint(extra, missing)}"
        )


def exit_unless_installed(what: str, extra: str, modules: Sequence[str]) -> None:
    """For scripts: :func:`require_extra`, printing the message and exiting with status 1 instead of raising."""
    try:
        require_extra(what, extra, modules)
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None

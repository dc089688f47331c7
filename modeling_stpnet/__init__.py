"""STPNet (Scale-aware Text Prompt Network) as a Hugging Face transformers model package.

This package is the model: configuration, modeling (and its blocks) and image processing, the files a checkpoint
carries as remote code. The toolkit around it (data, training, prediction, export, visualisation) is `stpnet`,
which imports this package and never the other way round.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

from .configuration_stpnet import STPNetConfig
from .image_processing_stpnet import STPNetImageProcessor
from .modeling_stpnet import STPNetForSemanticSegmentation, STPNetPreTrainedModel, STPNetSegmentationOutput

__all__ = [
    "STPNetConfig",
    "STPNetForSemanticSegmentation",
    "STPNetImageProcessor",
    "STPNetPreTrainedModel",
    "STPNetSegmentationOutput",
    "ScaleAwareTextRepository",
]
__version__ = "0.1.0"

# Where the toolkit modules that once lived in this package are now, so code written against the old layout keeps
# importing them (with a FutureWarning naming the new path). Looked up lazily: importing the model never imports
# the toolkit.
MOVED_MODULES = {
    "text_repository": "stpnet.text_repository",
    "optimize": "stpnet.optimize",
    "data": "stpnet.data",
    "training": "stpnet.training",
    "predict": "stpnet.inference.predict",
    "predict_cli": "stpnet.inference.cli",
    "checkpoint_loading": "stpnet.inference.checkpoint_loading",
    "prediction_files": "stpnet.inference.prediction_files",
    "visualize": "stpnet.visualize",
    "metrics": "stpnet.metrics",
    "model_card": "stpnet.model_card",
    "safe_write": "stpnet.safe_write",
    "messages": "stpnet.messages",
    "extras": "stpnet.extras",
    "cpu_memory": "stpnet.cpu_memory",
}


def _new_name(fullname: str) -> str | None:
    """`modeling_stpnet.training.config` -> `stpnet.training.config`; None for modules that did not move."""
    parts = fullname.split(".")
    if parts[0] != __name__ or len(parts) < 2 or parts[1] not in MOVED_MODULES:
        return None
    return ".".join([MOVED_MODULES[parts[1]], *parts[2:]])


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers `import modeling_stpnet.<moved module>` with the module at its new path (one module object, so
    patching either name patches both)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = _new_name(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> ModuleType:
        new = _new_name(spec.name)
        warnings.warn(f"`{spec.name}` moved to `{new}`; import it from there", FutureWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets the alias spec on the module next
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed under its new name already; it gets its own spec back."""
        module.__spec__ = module.__spec__.loader_state


# First in line: a moved package's submodules would otherwise be found on its new __path__ and run a second time
# under the old name (two module objects, two sets of globals).
if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name: str) -> Any:
    if name == "ScaleAwareTextRepository":  # part of the public API before the toolkit moved out
        from stpnet.text_repository import ScaleAwareTextRepository

        return ScaleAwareTextRepository
    if name in MOVED_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

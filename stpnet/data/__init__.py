"""Data for STPNet: raw layouts -> ``datasets.DatasetDict`` of (image, mask, text, category labels).

Typical use::

    from stpnet.data import load_stpnet_dataset
    ds = load_stpnet_dataset("sample/kvasir-seg-mini")          # raw layout, converted on the fly
    ds = load_stpnet_dataset("outputs/kvasir-seg", "configuration/text/kvasir-seg.json")  # saved, validated
"""

from stpnet.data.descriptions import MaskDescriber, MaskStatistics, connected_components, describe_mask, mask_statistics
from stpnet.data.io import DataError, load_image, load_mask, mask_array, mask_to_image, to_rgb8
from stpnet.data.lung_text import categories_from_zones, location_sentence, parse_lung_description

# These need `datasets`/`pandas` (the `train` extra); loading them lazily keeps `stpnet.data.io` usable by
# the prediction CLI and the demo on a core install.
_LAZY = {
    "convert": [
        "ConversionReport",
        "carve_validation",
        "check_options",
        "class_balance",
        "convert_layout",
        "convert_pair",
        "convert_raw",
        "dataset_features",
        "format_class_balance",
        "resolve_repository",
    ],
    "hub": ["check_stpnet_splits", "load_stpnet_dataset", "validate_stpnet_dataset"],
    "saving": ["check_save_targets", "push_stpnet_dataset", "save_stpnet_dataset"],
    "layouts": ["LAYOUTS", "PairRecord", "RawDataset", "Skip", "definition_path", "detect_layout", "discover"],
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "LAYOUTS",
    "ConversionReport",
    "DataError",
    "MaskDescriber",
    "MaskStatistics",
    "PairRecord",
    "RawDataset",
    "Skip",
    "carve_validation",
    "categories_from_zones",
    "check_options",
    "check_save_targets",
    "check_stpnet_splits",
    "class_balance",
    "connected_components",
    "convert_layout",
    "convert_pair",
    "convert_raw",
    "dataset_features",
    "definition_path",
    "describe_mask",
    "detect_layout",
    "discover",
    "format_class_balance",
    "load_image",
    "load_mask",
    "load_stpnet_dataset",
    "location_sentence",
    "mask_array",
    "mask_statistics",
    "mask_to_image",
    "parse_lung_description",
    "push_stpnet_dataset",
    "resolve_repository",
    "save_stpnet_dataset",
    "to_rgb8",
    "validate_stpnet_dataset",
]

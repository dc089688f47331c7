"""Training config files: YAML read strictly, ``base:`` inheritance and dotted command-line overrides.

Any key can be overridden with ``key.path=value`` strings (``--set train.lr=1e-3 --set augment.hflip=0``); the
value is parsed as YAML (``true``, ``[0.9, 1.1]``, ``null``), so ``model.overrides.use_text=false`` works too.
A file may start from another with a top-level ``base: other.yaml`` and state only what it changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from stpnet.training.config import ConfigError, TrainConfig, config_from_dict


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in nested dicts: ``["train.lr=1e-3", "model.overrides.use_text=false"]`` or a dict.

    Values given as strings are parsed as YAML. The returned dict is a copy; validation happens when it is built.
    """
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    result = yaml.safe_load(yaml.safe_dump(data or {}))  # deep copy of plain data
    for key, value in items:
        parts = key.split(".")
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"Cannot set {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Overrides look like section.key=value, got {text!r}")
    if not raw.strip():
        return key.strip(), None
    try:
        return key.strip(), yaml.load(raw, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"--set {text!r}: the value {raw!r} is not valid YAML ({_one_line(error)}); quote text values, close "
            "brackets (e.g. train.betas=[0.9,0.999])"
        ) from None


def _one_line(error: yaml.YAMLError) -> str:
    return " ".join(str(error).split())


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping, which plain YAML loading resolves silently in
    favour of the last value (a second ``lr:`` further down a section would override the one the reader sees)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may legitimately be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first.start_mark.line + 1}, again on line "
                    f"{key_node.start_mark.line + 1}): YAML would silently keep the last value; keep only one",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config as nested dicts. A top-level ``base: other.yaml`` (relative to this file) is read first and
    this file's keys are merged over it, so a variant (e.g. a CPU budget) states only what it changes."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"Training config {path} includes itself through 'base'")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so that error marks name the file
            data = yaml.load(stream, Loader=UniqueKeyLoader) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"Cannot read training config {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"Training config {path} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"Training config {path}: 'base' must be the path of another YAML config (relative to this file), got "
            f"{base!r}"
        )
    return _merge(read_config_file(path.parent / base, (*_seen, path)), data)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def load_train_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a YAML training config (or start from the defaults) and apply dotted overrides."""
    data = read_config_file(path) if path is not None else {}
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data)


def as_train_config(config: TrainConfig | dict | str | os.PathLike) -> TrainConfig:
    """A :class:`TrainConfig` from itself, its dict form or a YAML path."""
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_train_config(config)

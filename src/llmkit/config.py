"""Config dataclasses <-> command-line flags and YAML files.

Every stage is configured by a dataclass. Its fields map 1:1 onto CLI flags
(``n_layer`` -> ``--n-layer``) and onto YAML keys; a nested dataclass field is a
YAML section, and its fields' flags are dotted paths (``train.lr`` -> ``--train.lr``,
``sft.train.max_steps`` -> ``--sft.train.max-steps`` inside ``llmkit posttrain``).
A section whose default is an instance (``field(default_factory=lambda:
TrainConfig(lr=1e-4))``) gives its flags that instance's values as defaults: a
stage that only changes defaults needs no subclass. Precedence: dataclass
defaults < YAML file < flags given on the command line. Validation lives in each
dataclass's ``__post_init__`` and raises :class:`~llmkit.errors.ConfigError`,
which names the dotted field. A field whose metadata holds ``aliases`` (a mapping) reads a value of an older
spelling as its new one, e.g. a YAML boolean of a field that became a choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml

from llmkit.errors import ConfigError, InputError


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(arguments) < len(typing.get_args(annotation))
        if len(arguments) == 1:
            return arguments[0], optional
        return arguments, optional
    return annotation, False


def parse_number(text: str, kind: type) -> int | float:
    """Parse ``300e9``, ``1_000`` or ``2.5k`` style numbers."""
    cleaned = str(text).strip().replace("_", "")
    suffixes = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
    scale = 1.0
    if cleaned and cleaned[-1].lower() in suffixes and kind is int:
        scale = suffixes[cleaned[-1].lower()]
        cleaned = cleaned[:-1]
    value = float(cleaned) * scale
    if kind is int:
        if value != int(value):
            raise ValueError(f"{text!r} is not a whole number")
        return int(value)
    return value


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from ``90``, ``90s``, ``10m``, ``1.5h`` or ``2d``."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 10m or 2h")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def _parse_list(text) -> list:
    """A YAML list as is; on the command line, comma-separated items."""
    if isinstance(text, list):
        return text
    return [item.strip() for item in str(text).split(",") if item.strip()]


def _converter(annotation):
    base, _ = _unwrap_optional(annotation)
    if base is list or typing.get_origin(base) is list:
        return _parse_list
    if isinstance(base, list):  # e.g. str | float: keep the text, the dataclass interprets it
        return str
    if base is bool:
        return _parse_bool
    if base in (int, float):
        return lambda text: parse_number(text, base)
    if typing.get_origin(base) is Literal:
        return str
    return base


def _parse_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def flag_name(path: str | tuple[str, ...]) -> str:
    """``("train", "max_steps")`` (or ``"train.max_steps"``) -> ``--train.max-steps``."""
    parts = path.split(".") if isinstance(path, str) else path
    return "--" + ".".join(part.replace("_", "-") for part in parts)


def _leaf_fields(cls, defaults=None) -> list[tuple[tuple[str, ...], dataclasses.Field, Any, Any]]:
    """Every non-dataclass field, with its path of section names, its resolved type and its default:
    a section's default comes from the enclosing field's default instance when there is one (a
    ``default_factory=lambda: Section(x=1)`` changes the flag's default too)."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        default = _default_of(field) if defaults is None else getattr(defaults, field.name)
        if dataclasses.is_dataclass(annotation):
            section = default if dataclasses.is_dataclass(default) else None
            leaves += [
                ((field.name, *path), leaf, kind, value)
                for path, leaf, kind, value in _leaf_fields(annotation, section)
            ]
        else:
            leaves.append(((field.name,), field, annotation, default))
    return leaves


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one flag per leaf field of ``cls`` (dotted for fields of sections); defaults stay unset so YAML
    can fill them."""
    for path, field, annotation, default in _leaf_fields(cls):
        base, _ = _unwrap_optional(annotation)
        help_text = field.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": ".".join(path), "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _converter(annotation)
            kwargs["metavar"] = field.name.upper()
            if typing.get_origin(base) is Literal:
                kwargs["choices"] = list(typing.get_args(base))
        if default is not dataclasses.MISSING and help_text is not None:
            kwargs["help"] = f"{help_text} (default: {default})".strip()
        parser.add_argument(flag_name(path), **kwargs)


def _default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config fields at the top level")
    return data


def _nest(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for dotted, value in flat.items():
        *sections, leaf = dotted.split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    return nested


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build(cls, values: dict, source: str = "config", defaults=None):
    """Instantiate ``cls`` from a nested dict, converting values and naming unknown keys; fields the dict
    leaves out keep their values in ``defaults`` (an instance of ``cls``) when it is given."""
    hints = typing.get_type_hints(cls)
    known = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            unknown[0],
            values[unknown[0]],
            f"unknown field in {source} for {cls.__name__}; known: {', '.join(sorted(known))}",
        )
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(name, value, f"expected a section of {annotation.__name__} fields in {source}")
            section = _default_of(known[name]) if defaults is None else getattr(defaults, name)
            try:
                kwargs[name] = build(annotation, value, source, section if dataclasses.is_dataclass(section) else None)
            except ConfigError as error:  # named by its path from the top: train.lr
                raise ConfigError(f"{name}.{error.field}", error.value, error.reason) from None
            continue
        if value is None:
            kwargs[name] = None
            continue
        aliases = known[name].metadata.get("aliases", {})
        if isinstance(value, Hashable) and value in aliases:
            value = aliases[value]
        try:
            converted = (
                _converter(annotation)(value) if isinstance(value, str) or _needs_cast(annotation, value) else value
            )
        except (TypeError, ValueError) as error:
            raise ConfigError(name, value, f"cannot read as {annotation} ({error})") from None
        base, _ = _unwrap_optional(annotation)
        if typing.get_origin(base) is Literal and converted not in typing.get_args(base):
            raise ConfigError(name, value, f"must be one of {', '.join(map(str, typing.get_args(base)))}")
        kwargs[name] = converted
    return cls(**kwargs) if defaults is None else dataclasses.replace(defaults, **kwargs)


def _needs_cast(annotation, value) -> bool:
    base, _ = _unwrap_optional(annotation)
    return base is float and isinstance(value, int) and not isinstance(value, bool)


def config_from_args(cls, arguments: argparse.Namespace, yaml_path: str | Path | None = None):
    """Defaults < YAML file < flags actually given."""
    values = load_yaml(yaml_path) if yaml_path else {}
    given = {
        key: value
        for key, value in vars(arguments).items()
        if "." in key or key in {f.name for f in dataclasses.fields(cls)}
    }
    values = _merge(values, _nest(given))
    try:
        return build(cls, values, source=str(yaml_path) if yaml_path else "command line")
    except ConfigError as error:
        if not yaml_path or str(yaml_path) in error.reason:
            raise
        raise ConfigError(error.field, error.value, f"{error.reason} (config file {yaml_path} or flags)") from None


def check(condition: bool, field: str, value, reason: str) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds; used by every ``__post_init__``."""
    if not condition:
        raise ConfigError(field, value, reason)

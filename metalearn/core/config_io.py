"""The one config dialect: typed, frozen dataclasses read from YAML or dicts.

Every config of the project (the rule's, a training run's, a task mix, a sweep spec,
an evaluation) is a frozen dataclass built by ``from_dict``, which rejects unknown keys
and wrongly typed values with an error naming the dotted path of the field
(``rule.compute_h_size``). YAML files are read by ``read_yaml`` (``3e-4`` is a float,
not a string as in plain YAML 1.1), and ``--set a.b=value`` overrides are applied by
``apply_overrides`` before validation (``apply_values`` sets values that are not text,
such as a sweep trial's). ``load`` does all three.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


class RunError(RuntimeError):
    """A run cannot go on for a reason the user must fix (the message says which); the
    command line prints it as one line and exits 1."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1 wants ``3.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar or list (``3e-4``, ``true``, ``[2, 4]``, ``name``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {text!r}: {err}") from None


def _set_dotted(values: dict, key: str, value: Any, what: str) -> None:
    """Set ``values[a][b] = value`` for key ``a.b`` in place, copying touched mappings."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{what}bad key {key!r}")
    node = values
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}{'.'.join(parts[:depth + 1])} is not a section")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set ``a.b=value`` entries in a nested dict (copying the touched mappings)."""
    values = dict(values)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        _set_dotted(values, key, parse_value(text), "--set: ")
    return values


def apply_values(values: dict, updates: Mapping[str, Any]) -> dict:
    """Set ``{"a.b": value}`` entries (values as they are, not text) in a nested dict,
    copying the touched mappings; a value replaces what was there, mappings included."""
    values = dict(values)
    for key, value in (updates or {}).items():
        _set_dotted(values, str(key), value, "")
    return values


# Configs that ship inside the package (package data, docs/architecture.md): the
# training configs ``local`` and ``paper``, and the task mixes ``local``, ``paper``,
# ``tiny`` (kind "tasks"). A reference is a packaged name or a file path.
PACKAGED_CONFIGS = importlib.resources.files("metalearn") / "configs"


def packaged_names(kind: str = "") -> list[str]:
    """Names of the packaged configs of ``kind`` ("" training configs, "tasks" mixes)."""
    folder = PACKAGED_CONFIGS / kind if kind else PACKAGED_CONFIGS
    return sorted(entry.name[:-5] for entry in folder.iterdir()
                  if entry.is_file() and entry.name.endswith(".yaml"))


def is_packaged_name(ref: str) -> bool:
    """A bare name (no folder, no ``.yaml``) refers to a packaged config."""
    return bool(ref) and os.sep not in ref and "/" not in ref and not ref.endswith(
        (".yaml", ".yml"))


def resolve_config(ref: str, kind: str = "", *, relative_to: str | None = None) -> str:
    """The file a config reference names: a packaged name (``local``) or a path, tried
    relative to ``relative_to`` (the referring file's folder) and then to the current
    directory. FileNotFoundError names the reference and the packaged choices."""
    what = "task mix" if kind == "tasks" else "config"
    ref = os.path.expanduser(str(ref))
    if is_packaged_name(ref) and not os.path.isfile(ref):
        entry = (PACKAGED_CONFIGS / kind if kind else PACKAGED_CONFIGS) / f"{ref}.yaml"
        if entry.is_file():
            return str(entry)
        raise FileNotFoundError(f"no packaged {what} named {ref!r}; packaged: "
                                f"{', '.join(packaged_names(kind))} (or give a file path)")
    candidates = [ref] if os.path.isabs(ref) else (
        [os.path.join(relative_to, ref)] if relative_to else []) + [ref]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"{what} file not found: {ref} (looked in "
                            f"{', '.join(os.path.abspath(c) for c in candidates)}; packaged "
                            f"names: {', '.join(packaged_names(kind))})")


def merge(base: dict, top: Mapping) -> dict:
    """``base`` with ``top``'s keys on top, mappings merged key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml(path: str, what: str) -> Any:
    """Parse a YAML file (``3e-4`` read as a float); errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return yaml.load(f, Loader=_Loader) or {}
        except yaml.YAMLError as err:
            message = " ".join(str(err).split())  # one line for the CLI
            raise ConfigError(f"{path}: not valid YAML: {message}") from None



def to_dict(config: Any) -> dict:
    """Plain, JSON/YAML-serialisable dict of a (nested) config dataclass."""
    return {field.name: _plain(getattr(config, field.name))
            for field in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, path)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{path} must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if origin is tuple:
        args = typing.get_args(annotation)
        homogeneous = len(args) == 2 and args[1] is Ellipsis
        if (isinstance(value, dict) and homogeneous
                and typing.get_origin(args[0]) is tuple):
            # a tuple of (key, value) pairs may be written as a YAML mapping
            value = list(value.items())
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if not homogeneous:  # a fixed-length tuple such as tuple[str, float]
            if len(value) != len(args):
                raise ConfigError(f"{path} must have {len(args)} entries, got {value!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]")
                         for i, (v, a) in enumerate(zip(value, args)))
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class Bound:
    """The range of a number field, as ``Annotated[int | float, Bound(...)]`` metadata:
    low <= value (low < value if ``open_low``), and value <= high (< if ``open_high``)."""

    low: float
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        if self.high is None:
            return above
        return above and (value < self.high if self.open_high else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            if not self.open_low:
                return f">= {self.low:g}"
            return "positive" if self.low == 0 else f"> {self.low:g}"
        return (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.open_high else ']'}")


# The bounds most fields have.
NonNegative = typing.Annotated[int, Bound(0)]
AtLeastOne = typing.Annotated[int, Bound(1)]
Positive = typing.Annotated[float, Bound(0, open_low=True)]
NonNegativeFloat = typing.Annotated[float, Bound(0)]
Fraction = typing.Annotated[float, Bound(0, 1, open_high=True)]  # [0, 1)


@functools.cache
def _rules(cls: type) -> tuple[tuple[str, tuple, Bound | None, type | None], ...]:
    """(field, Literal choices, Bound, the bound number type) of each checked field."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        bound = base = None
        if typing.get_origin(hint) is typing.Annotated:
            base, *extras = typing.get_args(hint)
            bound = next((e for e in extras if isinstance(e, Bound)), None)
            hint = base
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        if choices or bound:
            out.append((field.name, choices, bound, base))
    return tuple(out)


def check_fields(config: Any, section: str) -> None:
    """ConfigError naming ``section.field`` for a value outside its annotation: not one
    of a ``Literal``'s choices, or a number outside its ``Bound``. The annotations are
    the one statement of what a field accepts (``from_dict`` checks types; configs built
    in Python come here too)."""
    for name, choices, bound, base in _rules(type(config)):
        value = getattr(config, name)
        where = f"{section}.{name}" if section else name
        if choices and value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        if bound is None:
            continue
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or (base is int and not isinstance(value, int))):
            raise ConfigError(f"{where} must be {'an integer' if base is int else 'a number'}"
                              f", got {value!r}")
        if not (math.isfinite(value) and bound.holds(value)):
            raise ConfigError(f"{where} must be {bound.describe()}, got {value!r}")


def from_dict(cls: type, values: dict, path: str = "") -> Any:
    """Build config ``cls`` from ``values``; unknown keys and bad types name the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Field validators name the field relative to their own section; re-anchor it.
        message = str(err)
        if path and not message.startswith(path):
            section = message.split(".", 1)
            message = f"{path}.{section[1]}" if len(section) == 2 else message
        raise ConfigError(message) from None


def load(cls: type, source: str | dict, overrides: list[str] | tuple[str, ...] = (), *,
         what: str = "config file", path: str = "") -> Any:
    """``cls`` from a YAML file (or a dict), with ``--set`` overrides applied first."""
    values = read_yaml(source, what) if isinstance(source, str) else dict(source or {})
    if not isinstance(values, dict):
        name = source if isinstance(source, str) else what
        raise ConfigError(f"{name}: must be a mapping, got {type(values).__name__}")
    return from_dict(cls, apply_overrides(values, list(overrides)), path)

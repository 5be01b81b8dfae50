"""Typed configs: YAML files plus dotted command-line overrides, built into (nested) dataclasses.

Every stage's settings are a dataclass tree; `load_config(cls, path, overrides)` validates all of it
before anything heavy loads, and every error names where it came from (the file or the override) and
the dotted key: unknown keys (with a suggestion), wrong types, invalid choices, missing values,
YAML syntax errors with their line. `save_config` writes the resolved tree back, so a run folder
records exactly what ran and `load_config` reads it again to an equal config.

Layers, lowest priority first: the `base:` chain of a file (a path relative to that file), the file,
then each override `a.b.c=value` (value parsed as YAML: scalars, `[x, y]`, `{k: v}`). Sections that
are dataclasses merge key by key across layers; any other value, a dict-typed field included, is
replaced whole by the highest layer that sets it, so an override can drop a dict entry.

Supported field types: int, float (an int is accepted), str, bool, Path, Any, Literal[...],
list[T], tuple[T, ...], tuple[A, B], dict[str, T], Optional[T] and nested dataclasses.
A dataclass's `__post_init__` may raise ConfigError for cross-field checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from observe_r1.errors import UserError
from observe_r1.io import atomic_write_text

T = TypeVar("T")
Layer = tuple[str, Mapping[str, Any]]  # (where it came from, raw mapping)
BASE_KEY = "base"


class ConfigError(UserError, ValueError):
    """Any problem with a config: the message says which file or override, and which key."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-6` as a float (YAML 1.1 wants `1.0e-6`) and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader itself reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: YAML error: {problem}") from None


def _file_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[Layer]:
    """The layers of one file: its `base:` chain first (resolved relative to the file), then itself."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: circular '{BASE_KEY}:' chain")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    data = _parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return [(str(path), data)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY}: expected a file path, got {type(base).__name__}")
    return [*_file_layers(path.parent / base, (*chain, path.resolve())), (str(path), data)]


def parse_override(text: str) -> Layer:
    """`a.b.c=value` -> ("override 'a.b.c=value'", {"a": {"b": {"c": <value as YAML>}}})."""
    source = f"override '{text}'"
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{source}: expected KEY=VALUE with a dotted KEY such as optim.lr=1e-6")
    value: Any = _parse_yaml(raw, source)
    for part in reversed(parts):
        value = {part: value}
    return source, value


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Read `path` (and its `base:` chain), apply `overrides`, validate, and build a `cls`."""
    layers = _file_layers(Path(path)) if path is not None else []
    layers += [parse_override(o) for o in overrides]
    return build(cls, layers)


def build(cls: type[T], layers: list[Layer], where: str = "") -> T:
    """Build dataclass `cls` from raw mappings, later layers winning; `where` is its dotted key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    for source, data in layers:
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"{source}: {prefix}{key}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        tp, key = hints[name], prefix + name
        present = [(source, data[name]) for source, data in layers if name in data]
        if dataclasses.is_dataclass(tp):
            present = [(source, {} if value is None else value) for source, value in present]
            if present or _is_required(f):
                for source, value in present:
                    if not isinstance(value, Mapping):
                        raise ConfigError(f"{source}: {key}: expected a mapping, got {_describe(value)}")
                values[name] = build(tp, present, key)
        elif present:
            source, value = present[-1]
            values[name] = _convert(value, tp, key, source)
        elif _is_required(f):
            origin = layers[-1][0] if layers else "config"
            raise ConfigError(f"{origin}: {key}: missing required value")
    try:
        return cls(**values)
    except ConfigError as e:
        origin = next((s for s, _ in reversed(layers) if not s.startswith("override '")), "config")
        raise ConfigError(f"{origin}: {prefix}{e}") from None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return {Path: "path", Any: "any value"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against type `tp` and convert it (int -> float, str -> Path, list -> tuple)."""

    def fail(expected: str | None = None) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key}: expected {expected or _type_name(tp)}, got {_describe(value)}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{key}: only Optional[T] unions are supported, not {tp}")
        return _convert(value, rest[0], key, source)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(
            f"{source}: {key}: must be one of {', '.join(map(str, args))} (got {_describe(value)})"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            fail("a mapping")
        return build(tp, [(source, value)], key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            fail()
        if origin is tuple and args[-1:] != (Ellipsis,):
            if len(value) != len(args):
                fail(f"{_type_name(tp)} ({len(args)} items)")
            return tuple(
                _convert(v, a, f"{key}[{i}]", source)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        items = [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            fail()
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{source}: {key}: keys must be strings, got {_describe(k)}")
            out[k] = _convert(v, args[1], f"{key}.{k}", source)
        return out
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else fail()
    if tp is str:
        return value if isinstance(value, str) else fail()
    if tp is Path:
        return Path(value) if isinstance(value, str) and value else fail("a non-empty path")
    raise TypeError(f"{key}: unsupported config field type {tp}")


def config_to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain YAML-ready values: dicts, lists, str (for Path), numbers, None."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically; `load_config(type(cfg), path)` gives it back."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, width=100)
    atomic_write_text(path, f"# resolved {type(cfg).__name__}, written by observe-r1\n{text}")

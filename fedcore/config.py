"""Typed configs: a dataclass per side, loaded from TOML, overridden by flags.

Every dataclass field ``foo_bar`` is settable as ``foo_bar = ...`` in the TOML
file and as ``--foo-bar`` on the command line; flags win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or flag that cannot be used, with the reason."""


def described(text: str) -> dict[str, str]:
    """Field metadata carrying a flag's help text: ``field(default=..., metadata=described("..."))``."""
    return {"help": text}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(tp: Any) -> Any:
    """int | None -> int; list[int] stays list[int]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def _coerce(name: str, tp: Any, value: Any) -> Any:
    tp = _base_type(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if tp is Path:
            return Path(value)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_coerce(name, item_tp, v) for v in items if v != ""]
        if origin is dict or tp is dict:
            return dict(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot use {value!r} as {getattr(tp, '__name__', tp)}") from exc
    return value


def from_mapping(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build cls from a mapping, rejecting unknown keys by name."""
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(types))}")
    values = {k: _coerce(k, types[k], v) for k, v in data.items()}
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add a ``--field-name`` flag for every field of cls (default: unset)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{help_text} (default: {default})".strip(),
        )


def resolve(cls: type[T], args: argparse.Namespace, config_path: Path | None = None,
            base: dict[str, Any] | None = None) -> T:
    """Defaults, then `base`, then the TOML file, then flags that were given."""
    data: dict[str, Any] = dict(base or {})
    if config_path is not None:
        data.update(load_toml(config_path))
    names = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return from_mapping(cls, data, source=str(config_path) if config_path else "flags")


def to_dict(obj: Any) -> dict[str, Any]:
    out = dataclasses.asdict(obj)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}

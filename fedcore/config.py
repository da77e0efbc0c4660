"""Typed configs: a dataclass per side, loaded from TOML, overridden by flags.

Every dataclass field ``foo_bar`` is settable as ``foo_bar = ...`` in the TOML
file and as ``--foo-bar`` on the command line; flags win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or flag that cannot be used, with the reason; `key` names the setting when it is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def described(text: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
              lt: float | None = None, choices: tuple[str, ...] | None = None, address: str | None = None,
              empty: bool = False) -> dict[str, Any]:
    """Field metadata: a flag's help text and the values the field takes, checked by :func:`check_fields`.

    ``ge``/``gt``/``le``/``lt`` bound a number (each item of a list); floats
    must be finite. ``choices`` lists a string's values (exact spelling).
    ``address="listen"`` takes host:port with port 0..65535 (0: any free
    port), ``address="dial"`` host:port with a host and port 1..65535;
    ``empty`` lets an address be "" (off).
    """
    meta: dict[str, Any] = {"help": text}
    for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices), ("address", address)):
        if v is not None:
            meta[k] = v
    if empty:
        meta["empty"] = True
    return meta


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base_type(tp: Any) -> Any:
    """int | None -> int; list[int] stays list[int]."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """`value` (from TOML, or text from a flag) as type `tp`; a bool is never a number, nor a number a bool."""
    tp = _base_type(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    kind = getattr(tp, "__name__", str(tp))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            raise ConfigError(f"{name} must be true or false, got {value!r}", name)
        if tp in (int, float) and isinstance(value, bool):
            raise ConfigError(f"{name} must be {'an integer' if tp is int else 'a number'}, not a boolean "
                              f"({str(value).lower()})", name)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value) if not isinstance(value, str) else int(value.strip())
        if tp in (float, str):
            return tp(value)
        if tp is Path:
            return Path(value)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_coerce(name, item_tp, v) for v in items if v != ""]
        if origin is dict or tp is dict:
            return dict(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        what = {"int": "an integer", "float": "a number", "str": "a string"}.get(kind, kind)
        raise ConfigError(f"{name} must be {what}, got {value!r}", name) from exc
    return value


def _rule(meta: Mapping[str, Any]) -> str:
    parts = [f"{op} {meta[k]:g}" if isinstance(meta[k], float) else f"{op} {meta[k]}"
             for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
    return " and ".join(parts)


def _check_number(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}", key)
    if isinstance(value, float) and not math.isfinite(value):
        rule = _rule(meta)
        raise ConfigError(f"{key} must be a finite number{' ' + rule if rule else ''}, got {value!r}", key)
    ok = all(test(value, meta[k]) for k, test in (
        ("ge", lambda v, b: v >= b), ("gt", lambda v, b: v > b), ("le", lambda v, b: v <= b),
        ("lt", lambda v, b: v < b)) if k in meta)
    if not ok:
        raise ConfigError(f"{key} must be {_rule(meta)}, got {value!r}", key)


def check_address(key: str, value: str, kind: str = "dial") -> tuple[str, int]:
    """(host, port) of 'host:port', '[v6]:port' or (listen only) ':port'; ConfigError naming `key` otherwise."""
    host, sep, port = value.rpartition(":")
    lowest = 0 if kind == "listen" else 1
    if not sep or not port.isdigit() or not lowest <= int(port) <= 65535 or (kind != "listen" and not host):
        zero = " (0: any free port)" if kind == "listen" else ""
        raise ConfigError(f"{key} must be host:port with a port {lowest}..65535{zero}, got {value!r}", key)
    return host.strip("[]"), int(port)


def check_fields(obj: Any) -> None:
    """Check every field of a config dataclass against its type and the range its metadata declares."""
    types = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        value, meta, tp = getattr(obj, f.name), f.metadata, _base_type(types[f.name])
        if value is None:
            continue
        items = value if typing.get_origin(tp) in (list, tuple) else [value]
        item_tp = (typing.get_args(tp) or (str,))[0] if typing.get_origin(tp) in (list, tuple) else tp
        for v in items:
            if item_tp in (int, float):
                if item_tp is int and isinstance(v, float):
                    raise ConfigError(f"{f.name} must be an integer, got {v!r}", f.name)
                _check_number(f.name, v, meta)
            elif item_tp is bool and not isinstance(v, bool):
                raise ConfigError(f"{f.name} must be true or false, got {v!r}", f.name)
            elif "choices" in meta and v not in meta["choices"]:
                raise ConfigError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {v!r}", f.name)
        if "address" in meta and not (meta.get("empty") and value == ""):
            check_address(f.name, str(value), meta["address"])


def check_weights_dir(path: Path, key: str = "weights_dir") -> Path:
    """A local Hugging Face directory must exist (else transformers reads the path as a Hub repo id)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key} {p} does not exist (a local directory with the model's config.json and "
                          f"weights, in Hugging Face format)", key)
    if not p.is_dir():
        raise ConfigError(f"{key} {p} is not a directory", key)
    return p


def check_preset(name: str, key: str = "preset") -> None:
    from fedcore.models import get_preset  # torch: only once a config is checked

    try:
        get_preset(name)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}", key) from None


def _origin(key: str, source: str, origins: Mapping[str, str] | None) -> str:
    return (origins or {}).get(key, f"{source}: {key}")


def from_mapping(cls: type[T], data: dict[str, Any], source: str = "config",
                 origins: Mapping[str, str] | None = None) -> T:
    """Build cls from a mapping, rejecting unknown keys by name and checking every value.

    Errors are ConfigError in one line naming the setting as ``origins``
    says it was given (a flag, a key in a file), else as "<source>: <key>".
    """
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(types))}")
    try:
        values = {k: _coerce(k, types[k], v) for k, v in data.items()}
        obj = cls(**values)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
        else:
            check_fields(obj)
    except ConfigError as exc:
        if exc.key is None:
            raise ConfigError(f"{source}: {exc}") from exc
        # The key as it was given: "--learning-rate must be ...", "server.toml: learning_rate must be ...".
        msg, where = str(exc), _origin(exc.key, source, origins)
        text = where + msg[len(exc.key):] if msg.startswith(exc.key) else f"{where}: {msg}"
        raise ConfigError(text, exc.key) from exc
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
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
    """Add a ``--field-name`` flag for every field of cls (default: unset, so the file or the default holds).

    A boolean is ``--name`` / ``--no-name`` (still ``name = true``/``false``
    in TOML); every other field takes a value.
    """
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if _base_type(types[f.name]) is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {'on' if default else 'off'})".strip())
            continue
        parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"{help_text} (default: {default})".strip())


def resolve(cls: type[T], args: argparse.Namespace, config_path: Path | None = None,
            base: dict[str, Any] | None = None) -> T:
    """Defaults, then `base`, then the TOML file, then flags that were given."""
    data: dict[str, Any] = dict(base or {})
    origins: dict[str, str] = {}
    if config_path is not None:
        from_file = load_toml(config_path)
        data.update(from_file)
        origins.update({k: f"{config_path}: {k}" for k in from_file})
    names = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
            origins[name] = "--" + name.replace("_", "-")
    source = " and ".join(filter(None, [str(config_path) if config_path else "",
                                        "flags" if any(o.startswith("--") for o in origins.values()) else ""]))
    return from_mapping(cls, data, source=source or "defaults", origins=origins)


def to_dict(obj: Any) -> dict[str, Any]:
    out = dataclasses.asdict(obj)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}

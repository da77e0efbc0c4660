"""Typed configs: a dataclass per side, loaded from TOML, overridden by flags.

Every dataclass field ``foo_bar`` is settable as ``foo_bar = ...`` in the TOML
file and as ``--foo-bar`` on the command line; flags win over the file.

A config may compose others: a field whose type is a config dataclass (say
``server: ServerConfig``) is the TOML table ``[server]``, and its fields get
flags of their own names (``--rounds``) unless the outer config or an
earlier part already has that name. Its default is the field's
``default_factory`` (where the composing config states its own defaults).
A key given outside the tables goes to the first part that has it (and
wins over the table's), so overrides and a flat file of a config that was
not composed yet still load.
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


def parts(cls: type) -> dict[str, type]:
    """The composed configs of cls: field name -> its dataclass type."""
    types = _field_types(cls)
    return {f.name: _base_type(types[f.name]) for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(_base_type(types[f.name]))}


def flag_owners(cls: type) -> dict[str, str | None]:
    """Each flag name's owner: None for cls's own field, else the part it sets (the first part that has it)."""
    own = parts(cls)
    owners: dict[str, str | None] = {f.name: None for f in dataclasses.fields(cls) if f.name not in own}
    for part, sub in own.items():
        for f in dataclasses.fields(sub):
            owners.setdefault(f.name, part)
    return owners


def _default_of(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _build_part(outer: type, name: str, sub: type, given: Mapping[str, Any], source: str,
                origins: Mapping[str, str]) -> Any:
    """A composed config: its default (the outer's factory) with `given` on top, each value checked."""
    types = _field_types(sub)
    unknown = sorted(set(given) - set(types))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) in [{name}]: {', '.join(unknown)}")
    try:
        obj = dataclasses.replace(_default_of(outer, name), **{k: _coerce(k, types[k], v) for k, v in given.items()})
        check_fields(obj)
    except ConfigError as exc:
        if exc.key is None:
            raise ConfigError(f"{source}: [{name}] {exc}") from exc
        msg, where = str(exc), origins.get(exc.key, f"{source}: [{name}] {exc.key}")
        raise ConfigError(where + msg[len(exc.key):] if msg.startswith(exc.key) else f"{where}: {msg}",
                          exc.key) from exc
    return obj


def _split_parts(cls: type, data: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(cls's own keys, each part's keys): tables as given, flat keys to the part that owns them."""
    own_parts = parts(cls)
    given: dict[str, dict[str, Any]] = {p: {} for p in own_parts}
    owners = flag_owners(cls)
    outer: dict[str, Any] = {}
    flat: list[tuple[str, Any]] = []
    for k, v in data.items():
        if k in own_parts:
            if dataclasses.is_dataclass(v):
                v = to_dict(v)
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: {k} must be a table ([{k}]), got {v!r}")
            given[k].update(v)
        elif owners.get(k) is not None:
            flat.append((k, v))
        else:
            outer[k] = v
    for k, v in flat:  # a flat key (an override, or an old flat file) wins over its table's
        given[owners[k]][k] = v  # type: ignore[index]
    return outer, given


def from_mapping(cls: type[T], data: dict[str, Any], source: str = "config",
                 origins: Mapping[str, str] | None = None) -> T:
    """Build cls from a mapping, rejecting unknown keys by name and checking every value.

    Errors are ConfigError in one line naming the setting as ``origins``
    says it was given (a flag, a key in a file), else as "<source>: <key>".
    """
    types = _field_types(cls)
    expand = getattr(cls, "expand", None)
    if callable(expand):  # shorthands of a composing config, resolved before defaults apply
        try:
            data = expand(dict(data))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
    data, given = _split_parts(cls, data, source)
    unknown = sorted(set(data) - set(types))
    if unknown:
        known = sorted(flag_owners(cls))
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    built = {p: _build_part(cls, p, sub, given[p], source, origins or {}) for p, sub in parts(cls).items()}
    try:
        values = {k: _coerce(k, types[k], v) for k, v in data.items()}
        obj = cls(**values, **built)
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
    own_parts = parts(cls)
    taken = {f.name for f in dataclasses.fields(cls) if f.name not in own_parts}
    for part, sub in own_parts.items():  # a part's flags: its own names, where cls has not taken them
        # `skip` names a part's field as "part.name" (its flag then sets nothing: the composing config decides).
        hidden = tuple(k.split(".", 1)[1] for k in skip if k.startswith(part + "."))
        _add_flags(parser, sub, skip=tuple(skip) + tuple(taken) + hidden, prefix=part + ".",
                   defaults=_default_of(cls, part))
        taken |= {f.name for f in dataclasses.fields(sub) if f.name not in hidden}
    _add_flags(parser, cls, skip=tuple(skip) + tuple(own_parts))


def _add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...], prefix: str = "",
               defaults: Any = None) -> None:
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text = f.metadata.get("help", "")
        if defaults is not None:  # a part: the composing config's default for it
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        flag, dest = "--" + f.name.replace("_", "-"), prefix + f.name
        if _base_type(types[f.name]) is bool:
            parser.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{help_text} (default: {'on' if default else 'off'})".strip())
            continue
        parser.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(),
                            help=f"{help_text} (default: {default})".strip())


def resolve(cls: type[T], args: argparse.Namespace, config_path: Path | None = None,
            base: dict[str, Any] | None = None) -> T:
    """Defaults, then `base`, then the TOML file, then flags that were given."""
    data: dict[str, Any] = dict(base or {})
    origins: dict[str, str] = {}
    if config_path is not None:
        from_file = load_toml(config_path)
        data.update(from_file)
        for k, v in from_file.items():
            if k in parts(cls) and isinstance(v, Mapping):
                origins.update({kk: f"{config_path}: [{k}] {kk}" for kk in v})
            else:
                origins[k] = f"{config_path}: {k}"
    for name, owner in flag_owners(cls).items():
        value = getattr(args, name if owner is None else f"{owner}.{name}", None)
        if value is not None:
            if owner is None:
                data[name] = value
            else:
                data.setdefault(owner, {})
                data[owner] = {**data[owner], name: value}
            origins[name] = "--" + name.replace("_", "-")
    source = " and ".join(filter(None, [str(config_path) if config_path else "",
                                        "flags" if any(o.startswith("--") for o in origins.values()) else ""]))
    return from_mapping(cls, data, source=source or "defaults", origins=origins)


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as plain TOML-able values (Paths as strings, composed configs as tables)."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return str(v) if isinstance(v, Path) else v
    return plain(dataclasses.asdict(obj))

"""The configuration and command-line reference pages, written from the config dataclasses and the parsers.

    python -m fedlab.configdoc          # rewrite docs/reference/config.md and docs/reference/cli.md
    python -m fedlab.configdoc --check  # exit 1 when a page is stale (tests/test_docs.py runs this check)

Every row comes from the code: a config key is the dataclass field, its flag
the option the command's real parser offers for it, its type, default and
allowed values the field's type hint, its default and its ``described``
metadata (fedcore.config); a command's options are its parser's. Editing the
pages by hand is pointless: change the code, then run the first command.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedclient.cli import build_parser as fedclient_parser
from fedclient.config import BenchConfig, ClientConfig
from fedcore import config as cfgmod
from fedserver.config import ServerConfig
from fedserver.status import StatusConfig

from .cli import fedserver_parser, netem_parser
from .simulate import LAUNCHER_CLIENT_KEYS, LAUNCHER_SERVER_KEYS, SimulateConfig

CONFIG_PAGE = Path("docs/reference/config.md")
CLI_PAGE = Path("docs/reference/cli.md")
COMMAND = "python -m fedlab.configdoc"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise KeyError("no subcommands")


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return _subparsers(parser).choices[name]


def flags_of(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """dest -> the option strings that set it ("server.rounds" for a composed part's field)."""
    return {a.dest: list(a.option_strings) for a in parser._actions if a.option_strings and a.dest != "help"}


def _power_of_two(n: int) -> str:
    """Large bounds as the powers of two they are (2^31-1 reads better than 2147483647)."""
    for k in range(16, 64):
        if n == (1 << k) - 1:
            return f"2^{k}-1"
        if n == 1 << k:
            return f"2^{k}"
    return str(n)


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return _power_of_two(v) if v >= 1 << 16 else str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def type_name(tp: Any) -> str:
    optional = type(None) in typing.get_args(tp)
    base = cfgmod._base_type(tp)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        (item,) = typing.get_args(base)[:1] or (str,)
        text = f"list of {type_name(item)}"
    else:
        text = {int: "integer", float: "number", str: "string", bool: "boolean", Path: "path"}.get(
            base, getattr(base, "__name__", str(base)))
    return f"{text} or unset" if optional else text


def default_text(f: dataclasses.Field, value: Any) -> str:
    """The default as a TOML value; a default computed on the machine (a host name) names its function."""
    factory = f.default_factory  # type: ignore[misc]
    if (factory is not dataclasses.MISSING and not isinstance(factory, type)
            and getattr(factory, "__name__", "<lambda>") != "<lambda>"):
        return f"this machine's, `{factory.__module__.lstrip('_')}.{factory.__name__}()`"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else f"{v:g}" for v in value) + "]`"
    return f'`"{value}"`' if str(value) else '`""`'


def allowed_text(tp: Any, meta: typing.Mapping[str, Any]) -> str:
    parts = []
    if "choices" in meta:
        parts.append(", ".join(f"`{c}`" for c in meta["choices"]))
    bounds = [f"{op} {_number(meta[k])}" for k, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
              if k in meta]
    if bounds:
        each = "each " if typing.get_origin(cfgmod._base_type(tp)) in (list, tuple) else ""
        parts.append(each + ", ".join(bounds))
    if meta.get("address") == "listen":
        parts.append("host:port, port 0..65535 (0: any free port)")
    elif meta.get("address") == "dial":
        parts.append("host:port, port 1..65535")
    if meta.get("empty"):
        parts.append('or `""` (off)')
    return "; ".join(parts) if parts else "-"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(cls: type, flags: dict[str, list[str]], defaults: Any = None, prefix: str = "",
          note: Callable[[str], str] | None = None) -> list[str]:
    """One row per field of cls: key, flag, type, default, allowed values, description."""
    types = cfgmod._field_types(cls)
    rows = ["| key | flag | type | default | allowed | description |", "|---|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(cfgmod._base_type(types[f.name])):
            continue  # a composed part: its own table
        value = getattr(defaults, f.name) if defaults is not None else cfgmod._default_of(cls, f.name)
        opts = flags.get(prefix + f.name)
        flag = " / ".join(f"`{o}`" for o in opts) if opts else (note(f.name) if note else "-")
        rows.append("| " + " | ".join(_cell(c) for c in (
            f"`{f.name}`", flag, type_name(types[f.name]), default_text(f, value),
            allowed_text(types[f.name], f.metadata), f.metadata.get("help", ""))) + " |")
    return rows


def _part_note(part: str, launcher: tuple[str, ...], flags: dict[str, list[str]]) -> Callable[[str], str]:
    """Why a [server]/[client] key has no flag of its own in `fedserver simulate`."""
    def note(name: str) -> str:
        if name in launcher:
            return "none: set by the launcher"
        owner = next((dest for dest, opts in flags.items() if "--" + name.replace("_", "-") in opts), None)
        if owner is None:
            return "none"
        where = "the simulation's own key" if "." not in owner else f"[{owner.split('.')[0]}] {name}"
        return f"none here (`--{name.replace('_', '-')}` sets {where})"
    return note


def _or_none(rows: list[str]) -> list[str]:
    return rows or ["- none"]


def part_section(part: str, cls: type, composed: Any, launcher: tuple[str, ...], sim_flags: dict[str, list[str]],
                 set_by: str, command: str, defaults: str, where: str) -> list[str]:
    """The `[server]` or `[client]` table of a simulation: what the launcher sets, what defaults differ, and
    which keys have no flag of their own."""
    return [
        f"### `[{part}]` in a simulation",
        "",
        f"{set_by}, so refused in `[{part}]` and offered as no flag: " + ", ".join(f"`{k}`" for k in launcher)
        + f". Defaults that differ from `{command}`'s ({defaults}):",
        "",
        f"| key | in a simulation | in `{command}` |",
        "|---|---|---|",
        *differing_defaults(cls, composed),
        "",
        f"Keys of `[{part}]` whose flag in `fedserver simulate` is not their own{where}:",
        "",
        *_or_none([f"- `{f.name}`: {_part_note(part, launcher, sim_flags)(f.name)}" for f in dataclasses.fields(cls)
                   if f"{part}.{f.name}" not in sim_flags and f.name not in launcher]),
        "",
    ]


def differing_defaults(cls: type, composed: Any) -> list[str]:
    """Rows of key, the simulation's default, the command's default, where they differ."""
    rows = []
    plain = cls()
    for f in dataclasses.fields(cls):
        ours, theirs = getattr(composed, f.name), getattr(plain, f.name)
        if ours != theirs and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            rows.append(f"| `{f.name}` | {default_text(f, ours)} | {default_text(f, theirs)} |")
    return rows


def render_config() -> str:
    server_flags = flags_of(_subcommand(fedserver_parser(), "run"))
    status_flags = flags_of(_subcommand(fedserver_parser(), "status"))
    sim_flags = flags_of(_subcommand(fedserver_parser(), "simulate"))
    client_flags = flags_of(_subcommand(fedclient_parser()[0], "run"))
    bench_flags = flags_of(_subcommand(fedclient_parser()[0], "bench"))
    sim = SimulateConfig()
    out = [
        "# Configuration reference",
        "",
        "Every setting of every command that reads a config: its TOML key, flag, type, default, allowed values "
        "and meaning.",
        "",
        f"GENERATED by `{COMMAND}` from the config dataclasses (`fedserver/config.py`, `fedclient/config.py`, "
        "`fedserver/status.py`, `fedlab/simulate.py`) and the `described(...)` metadata of their fields "
        "(`fedcore/config.py`). Do not edit this page: change the field and run the command again; "
        f"`{COMMAND} --check` (run by `tests/test_docs.py`) fails while the page is stale.",
        "",
        "How a setting is given (`fedcore/config.py`): the key `foo_bar` in the TOML file given with `--config`, "
        "or the flag `--foo-bar`; a flag wins over the file, the file over the default. A boolean is "
        "`--name` / `--no-name` on the command line and `name = true` / `false` in TOML. A list is a TOML array "
        "or, as a flag, comma-separated. Numbers must be finite. An unknown key, a value of the wrong type or outside its "
        "range is refused at load with one line naming the setting as it was given. Settings that depend on each other "
        "(for example `min_updates` at most `devices_per_round`) are checked together by each config's "
        "`validate()`.",
        "",
        "## Server: `fedserver run` (`server.toml`)",
        "",
        "`ServerConfig` in `fedserver/config.py`.",
        "",
        *table(ServerConfig, server_flags),
        "",
        "## Device daemon: `fedclient run` (`device.toml`)",
        "",
        "`ClientConfig` in `fedclient/config.py`.",
        "",
        *table(ClientConfig, client_flags),
        "",
        "## Simulation: `fedserver simulate`, and `netem run` scenario files",
        "",
        "`SimulateConfig` in `fedlab/simulate.py`. A simulation is the server's config, every device's config "
        "and a few settings of its own. Its own keys sit at the top of the TOML file; the server's keys sit in "
        "the table `[server]` and the devices' in `[client]`, with the keys, types, allowed values and meanings "
        "of the two tables above. A flag sets the simulation's own key when it has one of that name, else the "
        "server's, else the devices'. A key given outside the tables goes to the first of them that has it.",
        "",
        "Its own keys:",
        "",
        *table(SimulateConfig, sim_flags),
        "",
        "`encoding` and `codec` are shorthands: they set `upload_encoding` and `download_encoding` "
        "(`upload_codec` and `download_codec`) of `[server]` where those are not given. In a simulation "
        "`min_updates` defaults to `devices_per_round` (a round waits for all its sampled devices).",
        "",
        "A scenario file (`fedlab/scenarios/*.toml`, run by `netem run NAME`) is a simulation's TOML file "
        "with two more keys: `description` (a line `netem run` prints) and `links` (a list of link "
        "profiles, one per device, the same as `link` comma-separated); `out` defaults to `runs/NAME`.",
        "",
        *part_section("server", ServerConfig, sim.server, LAUNCHER_SERVER_KEYS, sim_flags,
                      "Set by the launcher for each run", "fedserver run",
                      "`LAB_SERVER_DEFAULTS` in `fedlab/simulate.py`: a tiny model and a short run", ""),
        *part_section("client", ClientConfig, sim.client, LAUNCHER_CLIENT_KEYS, sim_flags,
                      "Set by the launcher for each daemon (its id, address, part of the data, state directory, "
                      "certificates)", "fedclient run", "`LAB_CLIENT_DEFAULTS`",
                      " (set them in `[client]` in the TOML file)"),
        "## Status query: `fedserver status`",
        "",
        "`StatusConfig` in `fedserver/status.py` (TOML with `--config`, or flags).",
        "",
        *table(StatusConfig, status_flags),
        "",
        "## Step micro-benchmark: `fedclient bench`",
        "",
        "`BenchConfig` in `fedclient/config.py` (TOML with `--config`, or flags).",
        "",
        *table(BenchConfig, bench_flags),
        "",
    ]
    return "\n".join(out)


def slug(heading: str) -> str:
    """A Markdown heading's anchor as GitHub makes it (lower case, punctuation dropped, spaces to hyphens)."""
    text = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


# Subcommands whose flags are a config's keys, and the config page's section listing them.
CONFIG_SECTIONS = {
    ("fedserver", "run"): (ServerConfig, "Server: `fedserver run` (`server.toml`)"),
    ("fedserver", "status"): (StatusConfig, "Status query: `fedserver status`"),
    ("fedserver", "simulate"): (SimulateConfig, "Simulation: `fedserver simulate`, and `netem run` scenario files"),
    ("fedclient", "run"): (ClientConfig, "Device daemon: `fedclient run` (`device.toml`)"),
    ("fedclient", "bench"): (BenchConfig, "Step micro-benchmark: `fedclient bench`"),
}


def _config_dests(cls: type) -> set[str]:
    """The parser dests a config's flags use: its own fields, and "part.field" for a composed part's."""
    own = {f.name for f in dataclasses.fields(cls)}
    parts = cfgmod.parts(cls)
    return (own - set(parts)) | {f"{p}.{f.name}" for p, sub in parts.items() for f in dataclasses.fields(sub)}


def _option_rows(parser: argparse.ArgumentParser, skip: set[str], same_as: set[str]) -> list[str]:
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.dest in skip:
            continue
        if a.option_strings:
            names = " / ".join(f"`{o}`" for o in a.option_strings)
            value = "" if a.nargs == 0 else (a.metavar or a.dest.upper())
        else:
            names, value = f"`{a.metavar or a.dest.upper()}`", ""
        if a.choices is not None and value:
            value = "{" + ",".join(map(str, a.choices)) + "}"
        default = "-" if a.default in (None, False) or a.nargs == 0 else f"`{a.default}`"
        text = a.help or ("as the `fedclient run` setting of that name" if a.dest in same_as else "")
        if a.required:
            text = "required" + ("; " + text if text else "")
        if isinstance(a, argparse._AppendAction):
            text += " (may be repeated)"
        rows.append("| " + " | ".join(_cell(c) for c in (names, f"`{value}`" if value else "", default, text)) + " |")
    if not rows:
        return ["No options."]
    return ["| option | value | default | description |", "|---|---|---|---|", *rows]


def _program(name: str, parser: argparse.ArgumentParser) -> list[str]:
    out = [f"## `{name}`", "", parser.description or "", ""]
    top = _option_rows(parser, {"command"}, set())
    if top != ["No options."]:
        out += ["Options before the subcommand:", "", *top, ""]
    sub = _subparsers(parser)
    helps = {a.dest: a.help for a in sub._choices_actions}
    for cmd, p in sub.choices.items():
        what = (helps.get(cmd) or "").rstrip(".")
        out += [f"### `{name} {cmd}`", "", what[:1].upper() + what[1:] + ".", ""]
        section = CONFIG_SECTIONS.get((name, cmd))
        skip = _config_dests(section[0]) if section else set()
        out += _option_rows(p, skip, {f.name for f in dataclasses.fields(ClientConfig)})
        if section:
            out += ["", f"And a flag for each of its settings: [config.md](config.md#{slug(section[1])})."]
        out.append("")
    return out


def _bench_lines(root: Path) -> list[str]:
    """Each benchmark module's first docstring line and its usage lines (`python -m bench...`)."""
    out = []
    for path in sorted((root / "bench").glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines = doc.splitlines()
        first = next((i for i, line in enumerate(lines) if line.strip().startswith("python -m bench.")), None)
        if first is None:
            continue  # a helper module, not a benchmark
        usage = []  # the indented block that starts with the first usage line
        for line in lines[first:]:
            if not line.startswith("    "):
                break
            usage.append(line[4:])
        out += [f"### `python -m bench.{path.stem}`", "", doc.splitlines()[0], "", "```sh", *usage, "```", ""]
    return out


def render_cli(root: Path) -> str:
    out = [
        "# Command-line reference",
        "",
        "Every command, subcommand and option of `fedserver`, `fedclient` and `netem`, and the benchmarks and "
        "tools run with `python -m`.",
        "",
        f"GENERATED by `{COMMAND}` from the commands' parsers (`fedlab/cli.py`, which extends `fedserver/cli.py` "
        "and `netem/cli.py`, and `fedclient/cli.py`) and the benchmarks' docstrings. Do not edit this page: change "
        f"the parser and run the command again; `{COMMAND} --check` (run by `tests/test_docs.py`) fails while the "
        "page is stale. The settings of `run`, `simulate`, `status` and `bench` are in [config.md](config.md).",
        "",
        *_program("fedserver", fedserver_parser()),
        *_program("fedclient", fedclient_parser()[0]),
        *_program("netem", netem_parser()),
        "## Benchmarks: `python -m bench.NAME`",
        "",
        "They print figures and ratios and never fail on a time; `--help` lists each one's options.",
        "",
        *_bench_lines(root),
        "## Tools",
        "",
        "- `python -m fedcore.protogen`: regenerate the gRPC code in `fedtune/` from `protos/` (needs "
        "grpcio-tools, `pip install -e '.[dev]'`); `tests/test_protogen.py` fails when it is stale.",
        f"- `{COMMAND}` (`--check`): rewrite (check) [config.md](config.md) and this page.",
        "",
    ]
    return "\n".join(out)


def pages(root: Path) -> dict[Path, str]:
    return {CONFIG_PAGE: render_config(), CLI_PAGE: render_cli(root)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description="Write docs/reference/config.md and cli.md from the "
                                                           "config dataclasses and the parsers.")
    ap.add_argument("--check", action="store_true", help="exit 1 when a page differs from what would be written")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="repository root (default: the one this module is in)")
    args = ap.parse_args(argv)
    stale = []
    for rel, text in pages(args.root).items():
        page = args.root / rel
        if args.check:
            if not page.is_file() or page.read_text() != text:
                stale.append(str(rel))
            continue
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(text)
        print(f"wrote {rel}")
    if stale:
        print(f"{', '.join(stale)} stale: run `{COMMAND}` and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

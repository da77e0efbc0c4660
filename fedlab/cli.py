"""The installed `fedserver` and `netem` commands: the server's and netem's own parsers plus the lab's commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedcore import config as cfgmod
from fedcore import logs
from fedserver import cli as server_cli
from netem import cli as netem_cli

from .simulate import LAB_SERVER_DEFAULTS, SimulateConfig


# ------------------------------------------------------------------- fedserver
def cmd_simulate(args: argparse.Namespace) -> int:
    from . import simulate

    cfg = cfgmod.resolve(SimulateConfig, args, args.config)
    logs.setup(args.log_level)
    if cfg.link:
        from .runner import simulate_with_links  # needs root and namespaces

        return simulate_with_links(cfg)
    return simulate.run(cfg)


def cmd_base(args: argparse.Namespace) -> int:
    from . import base  # torch

    logs.setup(args.log_level)
    echo = lambda line: print(line, flush=True)  # noqa: E731
    if args.out is not None:
        echo(f"base: building the offline pretrained base into {args.out}")
        path = base.build(out=args.out, progress=base.progress_echo(base.Recipe(), echo))
        info = base.BaseInfo.read(path)
    else:  # the cache: under its lock, so that a run starting meanwhile waits for this build
        path, info = base.ensure(echo=echo, force=args.force)
    for line in base.describe(path, info, held_out=args.eval_size):
        echo(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report  # matplotlib is an optional extra: import only here

    print(write_report(args.run_dir, args.out))
    return 0


def fedserver_parser() -> argparse.ArgumentParser:
    ap, sub = server_cli.build_parser()
    sim = sub.add_parser("simulate", help="run a server and N device daemons on this machine and print the "
                                          "per-round table")
    sim.add_argument("--config", type=Path, default=None, help="TOML file with simulate settings")
    cfgmod.add_arguments(sim, SimulateConfig, skip=SimulateConfig.HIDDEN_FLAGS)
    bse = sub.add_parser("base", help="build (once, then cached) the offline pretrained base that simulate starts "
                                      "from, and say what it knows")
    bse.add_argument("--out", type=Path, default=None, help="build into this directory instead of the cache "
                                                            "(always builds)")
    bse.add_argument("--force", action="store_true", help="build again even if the cached base is intact")
    bse.add_argument("--eval-size", type=int, default=LAB_SERVER_DEFAULTS["eval_size"],
                     help="held-out examples of the federated task to evaluate the base on (simulate's round 0 set; "
                          "0: skip)")
    rpt = sub.add_parser("report", help="tables and PNG plots of a finished or running run directory")
    rpt.add_argument("run_dir", type=Path, help="directory with summary.json and rounds.jsonl (fedserver simulate, "
                                                "netem run or fedserver run --out)")
    rpt.add_argument("--out", type=Path, default=None, help="where to write the report (default: RUN_DIR/report)")
    return ap


def fedserver_main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedserver` console script."""
    return server_cli.main(argv, fedserver_parser(),
                           {**server_cli.COMMANDS, "simulate": cmd_simulate, "base": cmd_base,
                            "report": cmd_report})


# ----------------------------------------------------------------------- netem
def cmd_table1(args: argparse.Namespace) -> int:
    from . import table1

    try:
        rows = [table1.load_run(d) for d in args.runs]
    except ValueError as exc:
        raise netem_cli.UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(table1.rows_as_dicts(rows), indent=2))
    else:
        print(table1.render(rows))
        print(table1.efficiency_sections(args.runs))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_scenario  # imports torch via fedserver: keep other commands fast

    try:
        return run_scenario(args.scenario, {**settings(args.set), "out": args.out, "rounds": args.rounds,
                                            "encoding": args.encoding, "codec": args.codec,
                                            "round_policy": args.policy})
    except (cfgmod.ConfigError, ValueError) as exc:
        raise netem_cli.UsageError(str(exc)) from None


def settings(pairs: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` overrides: VALUE as a TOML value (1e-3, true, "x"), else as text (mezo)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set method=mezo")
        try:
            out[key.strip()] = cfgmod.tomllib.loads(f"v = {value}")["v"]
        except cfgmod.tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def cmd_policies(args: argparse.Namespace) -> int:
    from . import policies
    from .runner import run_scenario

    names = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(names) - set(policies.POLICIES))
    if unknown or not names:
        raise netem_cli.UsageError(f"unknown policies {unknown}; choose from {', '.join(policies.POLICIES)}")
    base = Path(args.out or f"runs/{Path(args.scenario).stem}-policies")
    try:
        for name in names if not args.report_only else []:
            code = run_scenario(args.scenario, {"out": str(base / name), "rounds": args.rounds, "round_policy": name})
            if code != 0:
                netem_cli._err(f"policy {name}: the run failed (exit {code}); see {base / name / 'logs'}")
                return code
        rows = [policies.load(base / name) for name in names]
    except (cfgmod.ConfigError, ValueError) as exc:
        raise netem_cli.UsageError(str(exc)) from None
    print(policies.render(rows))
    return 0


def netem_parser() -> argparse.ArgumentParser:
    parser, sub = netem_cli.build_parser()
    p = sub.add_parser("run", help="run a federated scenario with every device behind its link "
                                   "(writes rounds.jsonl and summary.json like fedserver simulate)")
    p.add_argument("scenario", help="a name from fedlab/scenarios (table1-lte, table1-10g, mixed-fleet) "
                                    "or a .toml path")
    p.add_argument("--out", default=None, help="run directory (default runs/SCENARIO)")
    p.add_argument("--rounds", type=int, default=None, help="override the scenario's rounds")
    p.add_argument("--encoding", default=None, help="override the scenario's wire encoding")
    p.add_argument("--codec", default=None, help="override the scenario's wire codec")
    p.add_argument("--policy", default=None, choices=("steps", "samples", "time"),
                   help="override the scenario's round policy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting of the scenario, server or devices by its name (repeatable), "
                        "e.g. --set method=mezo --set learning_rate=1e-3")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("policies", help="run a scenario once per round policy (steps, samples, time) and print "
                                        "wall time per round and idle ratio side by side")
    p.add_argument("scenario", nargs="?", default="hetero", help="scenario name or .toml path (default hetero)")
    p.add_argument("--out", default=None, help="parent of the runs (default runs/SCENARIO-policies)")
    p.add_argument("--rounds", type=int, default=None, help="override the scenario's rounds")
    p.add_argument("--policies", default="steps,samples,time", help="comma-separated (default all three)")
    p.add_argument("--report-only", action="store_true", help="print the table from existing runs under --out")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("report", help="print the study's Table 1 layout from run directories, next to its figures")
    p.add_argument("runs", nargs="+", help="directories written by netem run or fedserver simulate")
    p.add_argument("--json", action="store_true", help="machine-readable rows")
    p.set_defaults(func=cmd_table1)
    return parser


def netem_main(argv: list[str] | None = None) -> int:
    """Entry point of the `netem` console script."""
    return netem_cli.main(argv, netem_parser())

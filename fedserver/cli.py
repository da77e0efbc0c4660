"""`fedserver`: run a server for a real fleet, or simulate a whole run on this machine."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedcore import config as cfgmod
from fedcore import logs

from .config import ServerConfig
from .simulate import SimulateConfig


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    ap = argparse.ArgumentParser(prog="fedserver", description="Federated fine-tuning server for FLAN-T5.")
    ap.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: INFO or $FEDTUNE_LOG)")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve federated rounds to device daemons that dial in")
    run.add_argument("--config", type=Path, default=None, help="TOML file with ServerConfig settings")
    cfgmod.add_arguments(run, ServerConfig)
    sim = sub.add_parser("simulate", help="run a server and N device daemons on this machine and print the "
                                          "per-round table")
    sim.add_argument("--config", type=Path, default=None, help="TOML file with simulate settings")
    cfgmod.add_arguments(sim, SimulateConfig)
    return ap, sub


def cmd_run(args: argparse.Namespace) -> int:
    from .app import serve  # torch import is slow; keep --help fast

    cfg = cfgmod.resolve(ServerConfig, args, args.config)
    logs.setup(args.log_level, "server")
    return serve(cfg)


def cmd_simulate(args: argparse.Namespace) -> int:
    from . import simulate

    cfg = cfgmod.resolve(SimulateConfig, args, args.config)
    logs.setup(args.log_level)
    if cfg.link:
        from netem.runner import simulate_with_links  # needs root and namespaces

        return simulate_with_links(cfg)
    return simulate.run(cfg)


COMMANDS = {"run": cmd_run, "simulate": cmd_simulate}


def main(argv: list[str] | None = None) -> int:
    ap, _ = build_parser()
    args = ap.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (cfgmod.ConfigError, ValueError, OSError) as exc:
        print(f"fedserver {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

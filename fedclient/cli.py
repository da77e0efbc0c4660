"""`fedclient`: the device daemon's command line."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fedcore import config as cfgmod
from fedcore import logs

from .config import ClientConfig


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    ap = argparse.ArgumentParser(prog="fedclient", description="Federated fine-tuning device daemon.")
    ap.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: INFO or $FEDTUNE_LOG)")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join a server and serve rounds until the run ends")
    run.add_argument("--config", type=Path, default=None, help="TOML file with ClientConfig settings")
    cfgmod.add_arguments(run, ClientConfig)
    return ap, sub


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon  # torch import is slow; keep --help fast

    cfg = cfgmod.resolve(ClientConfig, args, args.config)
    logs.setup(args.log_level, cfg.device_id)
    daemon = Daemon(cfg)

    def _stop(signum: int, _frame: object) -> None:
        daemon.stop()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        return daemon.run()
    except KeyboardInterrupt:
        return 130 if not daemon._stop else 0


def main(argv: list[str] | None = None) -> int:
    ap, _ = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"fedclient: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""``netem`` command line: profiles, apply/clear/show shaping, cleanup, check.

Exit codes: 0 success, 1 failure (including a check outside tolerance),
2 bad input. Errors are one line on stderr. Subcommands are registered in
:func:`build_parser`; add new ones there (each sets ``func``). The federated
scenarios (`netem run`, `policies`, `report`) are the lab layer's: fedlab.cli adds
them to the installed `netem` command.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional

from netem import measure, tc, topology
from netem.profiles import PROFILES, LinkProfile, parse_profile

__all__ = ["build_parser", "main", "UsageError"]


class UsageError(ValueError):
    """Bad input from the user: exit code 2."""


def _err(message: str) -> None:
    print(f"netem: error: {' '.join(str(message).split())}", file=sys.stderr)


def _runner(args: argparse.Namespace) -> tc.Runner:
    return tc.Runner(log=None) if getattr(args, "quiet", False) else tc.Runner()


def _profile(text: str) -> LinkProfile:
    try:
        return parse_profile(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise tc.NetemError(f"'netem {what}' changes qdiscs and namespaces and needs root (run with sudo)")


# ----------------------------------------------------------------- commands


def cmd_profiles(args: argparse.Namespace) -> int:
    """Table of built-in profiles."""
    header = ("name", "down Mbit/s", "up Mbit/s", "delay ms (one-way)", "RTT ms", "jitter ms", "loss %")
    rows = [
        (p.name, f"{p.down_mbit:g}", f"{p.up_mbit:g}", f"{p.delay_ms:g}", f"{p.rtt_ms:g}",
         f"{p.jitter_ms:g}", f"{p.loss_pct:g}")
        for p in PROFILES.values()
    ]
    print(_table(header, rows))
    print("\nsources:")
    for p in PROFILES.values():
        print(f"  {p.name}: {p.source}")
    print("\ncustom: --profile custom:down=MBIT,up=MBIT[,delay=MS,jitter=MS,loss=PCT] "
          "(rates are TCP goodput; delay is one-way, per direction)")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """Shape both directions of an interface."""
    profile = _profile(args.profile)
    _require_root("apply")
    # What the backend could not apply is logged as a warning by tc.apply.
    tc.apply(args.iface, profile, netns=args.netns, backend=args.backend, runner=_runner(args))
    where = f" in {args.netns}" if args.netns else ""
    print(f"{args.iface}{where}: {profile.name} ({profile.describe()})")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    """Remove shaping from an interface."""
    _require_root("clear")
    tc.clear(args.iface, netns=args.netns, runner=_runner(args))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print qdiscs/classes of an interface and its IFB."""
    _require_root("show")
    print(tc.show(args.iface, netns=args.netns, runner=_runner(args)))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Remove leftover namespaces and IFB devices."""
    _require_root("cleanup")
    removed = topology.cleanup(prefix=args.prefix, force=args.force, log=lambda line: print(line, file=sys.stderr))
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("nothing to remove")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Build a topology, measure each link with raw TCP both ways, tear down."""
    profiles = [_profile(p) for p in (args.profile or ["lte"])]
    if args.devices < 1:
        raise UsageError("--devices must be at least 1")
    if args.seconds <= 0:
        raise UsageError("--seconds must be positive")
    if not 0 < args.tolerance < 1:
        raise UsageError("--tolerance must be between 0 and 1 (0.05 = 5%)")
    if len(profiles) == 1:
        profiles = profiles * args.devices
    elif args.devices not in (1, len(profiles)):
        raise UsageError("give one --profile with --devices N, or one --profile per device")
    _require_root("check")
    topology.require_namespaces()
    runner = _runner(args)
    # The report below lists the topology's warnings itself.
    logging.getLogger("netem").setLevel(logging.ERROR)
    with topology.Topology(profiles, backend=args.backend, runner=runner) as topo:
        tcp = topo.tcp_settings()
        print(f"topology {topo.tag}: {len(topo.devices)} device(s), backend {topo.backend}, "
              f"congestion control {tcp.get(topology.CC_KEY, '?')}")
        for warning in topo.warnings:
            print(f"warning: {warning}")
        rows = measure.check(topo, seconds=args.seconds, tolerance=args.tolerance)
        rtts = {d.index: measure.ping(topo, topo.server_ns, d.ip, count=5) for d in topo.devices}
    tol = f"{args.tolerance * 100:g}%"
    header = ("device", "profile", "direction", "profile Mbit/s", "measured Mbit/s", "ratio", f"within {tol}")
    print(_table(header, [
        (r.device, r.profile, r.direction, f"{r.profile_mbit:.2f}", f"{r.measured_mbit:.2f}",
         f"{r.ratio:.3f}", "yes" if r.ok else "NO")
        for r in rows
    ]))
    for dev in topo.devices:
        result = rtts[dev.index]
        measured = f"{result.median_ms:.2f} ms" if result.median_ms is not None else "no reply"
        if not dev.profile.rtt_ms:
            expected = "the profile adds no delay"
        elif topo.backend == "netem":
            expected = f"profile {dev.profile.rtt_ms:g} ms"
        else:
            expected = f"profile {dev.profile.rtt_ms:g} ms, not emulated by htb"
        print(f"RTT server -> d{dev.index}: {measured}, median of {result.received}/{result.sent} ({expected})")
    print("TCP settings: " + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in tcp.items()))
    failed = [r for r in rows if not r.ok]
    if any(r.profile_mbit >= 1000 and r.ratio < 1 for r in failed):
        print("note: at >= 1 Gbit/s the Python sender and receiver are usually CPU-bound; "
              "a shortfall there says little about the shaper")
    if failed:
        _err(f"{len(failed)} of {len(rows)} directions outside {tol} of the profile rate")
        return 1
    print(f"all {len(rows)} directions within {tol} of the profile rate")
    return 0


def _setup_logging() -> None:
    logger = logging.getLogger("netem")
    logger.setLevel(logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("netem: warning: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *rows)]
    return "\n".join(lines)


# ------------------------------------------------------------------ parser


def _add_common(p: argparse.ArgumentParser, netns: bool = True) -> None:
    if netns:
        p.add_argument("--netns", metavar="NS", help="network namespace of the interface")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the tc/ip commands run")


def build_parser() -> tuple[argparse.ArgumentParser, "argparse._SubParsersAction[argparse.ArgumentParser]"]:
    """The parser and its subparsers; add a subcommand with ``sub.add_parser`` and ``set_defaults(func=...)``."""
    parser = argparse.ArgumentParser(
        prog="netem",
        description="Link emulation for federated fine-tuning experiments (tc + network namespaces).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("profiles", help="list built-in link profiles and their sources")
    p.set_defaults(func=cmd_profiles)

    backend_help = "shaping backend (auto: netem if the kernel has it, else htb rate limiting only)"
    p = sub.add_parser("apply", help="shape both directions of an interface (ingress via IFB)")
    p.add_argument("iface")
    p.add_argument("--profile", required=True, help="profile name or custom:down=..,up=..[,delay=..,jitter=..,loss=..]")
    p.add_argument("--backend", choices=("auto", *tc.BACKENDS), default="auto", help=backend_help)
    _add_common(p)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("clear", help="remove shaping from an interface")
    p.add_argument("iface")
    _add_common(p)
    p.set_defaults(func=cmd_clear)

    p = sub.add_parser("show", help="show qdiscs and classes of an interface")
    p.add_argument("iface")
    _add_common(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("cleanup", help="remove namespaces and IFB devices left by dead netem processes")
    p.add_argument("--prefix", default="fdt", help="name prefix of the topologies (default: fdt)")
    p.add_argument("--force", action="store_true", help="also remove topologies of running processes")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("check", help="build a topology and measure each link with raw TCP in both directions")
    p.add_argument("--profile", action="append", metavar="P",
                   help="link profile (default lte); repeat for one device per profile")
    p.add_argument("--devices", type=int, default=1, help="devices sharing a single --profile (default 1)")
    p.add_argument("--seconds", type=float, default=2.0, help="steady-state seconds per transfer (default 2)")
    p.add_argument("--tolerance", type=float, default=measure.DEFAULT_TOLERANCE, help="allowed |ratio-1| (default 0.05)")
    p.add_argument("--backend", choices=("auto", *tc.BACKENDS), default="auto", help=backend_help)
    _add_common(p, netns=False)
    p.set_defaults(func=cmd_check)

    return parser, sub


def main(argv: Optional[list[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Run a subcommand; `parser` extends this CLI (fedlab.cli adds the federated scenarios)."""
    parser = parser or build_parser()[0]
    _setup_logging()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return int(exc.code or 0)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except (tc.NetemError, measure.MeasureError) as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: not an error worth a message.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        _err(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return 1

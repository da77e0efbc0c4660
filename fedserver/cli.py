"""`fedserver`: run a server for a real fleet, ask it for its status, make its certificates.

The lab layer (fedlab.cli) extends this parser with `simulate` and `report`
for the installed `fedserver` command; `python -m fedserver` is this one alone.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fedcore import config as cfgmod
from fedcore import logs

from .config import ServerConfig
from .errors import StateMismatch
from .status import MAX_DEVICES_PAGE, StatusConfig

DEVICES_PAGE = 50


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    ap = argparse.ArgumentParser(prog="fedserver", description="Federated fine-tuning server for FLAN-T5.")
    ap.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: INFO or $FEDTUNE_LOG)")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve federated rounds to device daemons that dial in")
    run.add_argument("--config", type=Path, default=None, help="TOML file with ServerConfig settings")
    cfgmod.add_arguments(run, ServerConfig)
    certs = sub.add_parser("certs", help="create a CA, a server certificate and per-device client certificates "
                                         "for mutual TLS")
    certs.add_argument("--out", type=Path, required=True, help="directory to write them to (keys get mode 0600)")
    certs.add_argument("--devices", required=True, help="comma-separated device ids, e.g. orin-01,orin-02")
    certs.add_argument("--server-names", default="localhost,127.0.0.1",
                       help="comma-separated host names and IP addresses the devices dial the server by "
                            "(default: localhost,127.0.0.1)")
    certs.add_argument("--admins", default="admin", help="comma-separated operator names (certificates that may "
                                                         "call status RPCs but never act for a device)")
    st = sub.add_parser("status", help="ask a running server for its round, participants, transfers and last G "
                                       "(as an operator: an admin certificate from `fedserver certs`)")
    st.add_argument("--config", type=Path, default=None, help="TOML file with status settings (server, tls_*)")
    cfgmod.add_arguments(st, StatusConfig)
    st.add_argument("--json", action="store_true", help="print the status message as JSON")
    st.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    st.add_argument("--devices", action="store_true",
                    help="list known devices a page at a time, in id order (alive or gone, last seen, samples, "
                         "accelerator, measured rates)")
    st.add_argument("--page-size", type=int, default=None,
                    help=f"devices per page, 1 to {MAX_DEVICES_PAGE} (default {DEVICES_PAGE}; with --all-devices "
                         f"{MAX_DEVICES_PAGE})")
    st.add_argument("--after", default=None, metavar="ID",
                    help="with --devices: start after this device id (the previous page's last, as printed)")
    st.add_argument("--all-devices", action="store_true",
                    help="every known device: follows the pages to the end (with --json: one message)")
    return ap, sub


def cmd_run(args: argparse.Namespace) -> int:
    from .app import serve  # torch import is slow; keep --help fast

    cfg = cfgmod.resolve(ServerConfig, args, args.config)
    logs.setup(args.log_level, "server")
    return serve(cfg)


def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import write_fleet

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    names = [n.strip() for n in args.server_names.split(",") if n.strip()]
    admins = [a.strip() for a in args.admins.split(",") if a.strip()]
    fleet = write_fleet(args.out, devices, names, admins)
    out = fleet.out
    print(f"CA          {fleet.ca_cert}  (key {out / 'ca.key'}: keep it offline)")
    print(f"server      {fleet.server_cert}, {fleet.server_key}  for {', '.join(names)}")
    for a in admins:
        print(f"admin       {out / (a + '.pem')}, {out / (a + '.key')}")
    first = devices[0]
    print(f"devices     {len(devices)} in {out / 'devices'}: <id>.pem, <id>.key (fedtune://device/<id>)")
    print(f"tokens      {fleet.tokens}  (only for TLS without client certificates)")
    print("\nserver.toml:")
    print(f'  tls_cert = "{fleet.server_cert}"\n  tls_key = "{fleet.server_key}"\n  tls_ca = "{fleet.ca_cert}"')
    print(f"device.toml ({first}):")
    c, k = fleet.device(first)
    print(f'  device_id = "{first}"\n  tls_ca = "{fleet.ca_cert}"\n  tls_cert = "{c}"\n  tls_key = "{k}"')
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from .status import check_page, fetch_all_devices, fetch_status, render_status

    listing = args.devices or args.all_devices
    after = args.after or ""
    if args.page_size is not None and not 1 <= args.page_size <= MAX_DEVICES_PAGE:
        raise ValueError(f"--page-size must be 1 to {MAX_DEVICES_PAGE}, got {args.page_size}")
    if (after or args.page_size is not None) and not listing:
        raise ValueError("--page-size and --after are for listing devices: add --devices (or --all-devices)")
    page = 0 if not listing else args.page_size or (MAX_DEVICES_PAGE if args.all_devices else DEVICES_PAGE)
    check_page(page, after)
    cfg = cfgmod.resolve(StatusConfig, args, args.config)
    try:
        if args.all_devices:
            pages = iter(fetch_all_devices(cfg.server, cfg.security(), args.timeout, page, after))
            msg = next(pages)
            for more in pages:
                msg.devices.extend(more.devices)
            msg.devices_next_after = ""
        else:
            msg = fetch_status(cfg.server, cfg.security(), args.timeout, page, after)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        print(f"fedserver status: {cfg.server}: {code.name}: {exc.details()}", file=sys.stderr)  # type: ignore
        return 1
    if args.json:
        from google.protobuf.json_format import MessageToJson

        print(MessageToJson(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
    else:
        more = "fedserver status --devices" + (f" --page-size {page}" if args.page_size is not None else "")
        print(render_status(msg, cfg.server, next_command=more, after=after if listing else None))
    return 0


COMMANDS = {"run": cmd_run, "certs": cmd_certs, "status": cmd_status}


# Exit statuses: a config or run directory that cannot be used will not fix itself, so systemd does not
# restart on EXIT_UNUSABLE (RestartPreventExitStatus in systemd/fedserver.service); the machine's state
# (a port in use, a full disk) may change, so EXIT_ENVIRONMENT is restarted (within StartLimitBurst).
EXIT_UNUSABLE = 2
EXIT_ENVIRONMENT = 1


def _fail(exc: BaseException, code: int) -> int:
    # One line, whatever the message holds: journald and a terminal both show it whole.
    print(f"fedserver: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
         commands: dict[str, Callable[[argparse.Namespace], int]] | None = None) -> int:
    """Run a subcommand; `parser` and `commands` extend this CLI (fedlab.cli adds the lab's)."""
    ap = parser or build_parser()[0]
    args = ap.parse_args(argv)
    try:
        return (commands or COMMANDS)[args.command](args)
    except (cfgmod.ConfigError, ValueError, StateMismatch) as exc:  # CheckpointError is a ValueError
        return _fail(exc, EXIT_UNUSABLE)
    except OSError as exc:
        return _fail(exc, EXIT_ENVIRONMENT)


if __name__ == "__main__":
    sys.exit(main())

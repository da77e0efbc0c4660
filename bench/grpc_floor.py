"""What gRPC itself costs a server per idle device: a bare grpc.aio server built as fedserver's, with no fedtune code.

    python -m bench.grpc_floor --devices 100,1000,10000 [--tls] [--procs 4] [--devices-per-channel 1] [--json]

The floor under bench.fleet_load's memory per idle device. For each N, a fresh
server process built as `fedserver run` builds its own (the options of
fedserver.service.server_options, max_rpcs, and with --tls the same mutual TLS
credentials, from a throwaway fleet CA) serves two methods and nothing else:
Ping answers at once; Wait holds the call open until the server stops, as the
server holds an idle device's GetTask long poll. N devices in a few processes,
each with a connection of its own (as a fleet has; --devices-per-channel shares
them), go through two steps:

  connected: each device made one Ping, so its connection is open and idle;
  waiting:   each device also has one Wait call open, the idle long poll.

The server's RSS is read once it settles after each step. Columns: the server
at rest, after each step, and per device: `conn KB` = (connected - at rest) /
N, `call KB` = (waiting - connected) / N, `idle KB` = their sum. `slope KB` is
(waiting at N - waiting at the first N) / (N - first N): the same slope
bench.fleet_load prints as KB per idle device, to set one against the other.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._procs import raise_fd_limit

SERVICE = "fedtune.bench.Floor"


@dataclass
class FloorResult:
    """One N against one bare server; RSS in MB, per-device figures in KB."""
    devices: int
    connections: int = 0
    tls: bool = False
    rest_mb: float = math.nan
    connected_mb: float = math.nan
    waiting_mb: float = math.nan
    conn_kb: float = math.nan      # per device: its share of the open connections
    call_kb: float = math.nan      # per device: its waiting call
    idle_kb: float = math.nan      # conn_kb + call_kb
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------- server

def _server_config(tls: dict[str, str] | None) -> Any:
    from fedserver.config import ServerConfig
    if tls is None:
        return ServerConfig(insecure=True)
    return ServerConfig(insecure=False, tls_cert=Path(tls["server_cert"]), tls_key=Path(tls["server_key"]),
                        tls_ca=Path(tls["ca_cert"]))


async def _serve(tls: dict[str, str] | None, port_q: Any, counts: Any) -> None:
    import grpc

    from fedserver.auth import server_credentials
    from fedserver.service import server_options

    cfg = _server_config(tls)
    server = grpc.aio.server(options=server_options(cfg), maximum_concurrent_rpcs=cfg.max_rpcs or None)
    forever = asyncio.Event()  # never set: a Wait ends when its device goes or the server stops

    async def ping(request: bytes, context: Any) -> bytes:
        with counts.get_lock():
            counts[0] += 1
        return b""

    async def wait(request: bytes, context: Any) -> bytes:
        with counts.get_lock():
            counts[1] += 1
        await forever.wait()
        return b""

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Ping": grpc.unary_unary_rpc_method_handler(ping),
        "Wait": grpc.unary_unary_rpc_method_handler(wait)}),))
    creds = server_credentials(cfg)
    port = server.add_insecure_port("127.0.0.1:0") if creds is None else server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    port_q.put(port)
    await server.wait_for_termination()


def _server_main(tls: dict[str, str] | None, port_q: Any, counts: Any) -> None:
    raise_fd_limit()
    asyncio.run(_serve(tls, port_q, counts))


# ------------------------------------------------------------------ devices

def _channel(target: str, tls: dict[str, str] | None, tag: int, aio: bool = True) -> Any:
    import grpc

    from fedcore.channel import CHANNEL_OPTIONS, ClientSecurity

    # A distinct option per channel: gRPC would otherwise share one subchannel (one TCP connection) among them.
    options = CHANNEL_OPTIONS + [("fedtune.bench.channel", tag)]
    lib = grpc.aio if aio else grpc
    if tls is None:
        return lib.insecure_channel(target, options=options)
    sec = ClientSecurity(tls_ca=Path(tls["ca_cert"]), tls_cert=Path(tls["device_cert"]),
                         tls_key=Path(tls["device_key"]))
    return lib.secure_channel(target, sec.credentials(), options=options)


async def _devices(target: str, n: int, per_channel: int, tls: dict[str, str] | None, first_tag: int,
                   report: Any, go: Any, stop: Any) -> None:
    n_ch = max(1, math.ceil(n / max(1, per_channel)))
    channels = [_channel(target, tls, first_tag + i) for i in range(n_ch)]
    pings = [ch.unary_unary(f"/{SERVICE}/Ping") for ch in channels]
    waits = [ch.unary_unary(f"/{SERVICE}/Wait") for ch in channels]
    gate = asyncio.Semaphore(200)  # connection set-up (a TLS handshake each) in waves, not 10,000 at once

    async def ping(i: int) -> None:
        async with gate:
            await pings[i % n_ch](b"", timeout=120.0, wait_for_ready=True)

    await asyncio.gather(*(ping(i) for i in range(n)))
    report.put(("connected", n_ch))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    held = [asyncio.ensure_future(waits[i % n_ch](b"")) for i in range(n)]
    report.put(("waiting", n))
    await loop.run_in_executor(None, stop.wait)
    for t in held:
        t.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    for ch in channels:
        await ch.close(grace=None)


def _devices_main(target: str, n: int, per_channel: int, tls: dict[str, str] | None, first_tag: int,
                  report: Any, go: Any, stop: Any) -> None:
    raise_fd_limit()
    try:
        asyncio.run(_devices(target, n, per_channel, tls, first_tag, report, go, stop))
    except BaseException as exc:  # report, never leave the parent waiting
        report.put(("error", f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------ measure

def _settled_rss_mb(proc: Any, limit_s: float = 10.0) -> float:
    """The RSS once two readings half a second apart are within 0.5 MB (or after limit_s)."""
    last = proc.memory_info().rss
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.5)
        now = proc.memory_info().rss
        if abs(now - last) < 2**19:
            return now / 2**20
        last = now
    return last / 2**20


def _warm_up(target: str, tls: dict[str, str] | None) -> None:
    """One Ping and one Wait that times out, so the server's first-call set-up counts as 'at rest'."""
    import grpc
    with _channel(target, tls, -1, aio=False) as ch:
        ch.unary_unary(f"/{SERVICE}/Ping")(b"", timeout=30.0, wait_for_ready=True)
        try:
            ch.unary_unary(f"/{SERVICE}/Wait")(b"", timeout=0.3)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise


def _fleet_pki(out: Path) -> dict[str, str]:
    from fedserver.certs import write_fleet
    f = write_fleet(out, ["floor-device"])
    cert, key = f.device("floor-device")
    return {"ca_cert": str(f.ca_cert), "server_cert": str(f.server_cert), "server_key": str(f.server_key),
            "device_cert": str(cert), "device_key": str(key)}


def measure(n: int, tls: bool = False, procs: int = 4, per_channel: int = 1, limit_s: float = 0.0) -> FloorResult:
    """One fresh bare server and n idle devices; every wait ends within limit_s (0: from n)."""
    import psutil

    raise_fd_limit()
    limit_s = limit_s or 60.0 + n / (50.0 if tls else 200.0)
    res = FloorResult(devices=n, tls=tls)
    t0 = time.monotonic()
    ctx = mp.get_context("spawn")  # no inherited gRPC state in the children
    counts = ctx.Array("q", 2)     # Pings and Waits the server has seen
    port_q, report = ctx.Queue(), ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    with tempfile.TemporaryDirectory(prefix="grpc-floor-") as tmp:
        pki = _fleet_pki(Path(tmp)) if tls else None
        server = ctx.Process(target=_server_main, args=(pki, port_q, counts), daemon=True)
        server.start()
        kids: list[Any] = []
        try:
            target = f"{'localhost' if tls else '127.0.0.1'}:{port_q.get(timeout=60)}"
            proc = psutil.Process(server.pid)
            _warm_up(target, pki)
            res.rest_mb = _settled_rss_mb(proc)
            k = max(1, min(procs, n))
            shares = [n // k + (i < n % k) for i in range(k)]
            for i, share in enumerate(shares):
                p = ctx.Process(target=_devices_main, args=(target, share, per_channel, pki, i * n, report, go, stop),
                                daemon=True)
                p.start()
                kids.append(p)
            end = t0 + limit_s

            def collect(step: str) -> int:
                total, seen = 0, 0
                while seen < k:
                    kind, value = report.get(timeout=max(0.1, end - time.monotonic()))
                    if kind == "error":
                        raise RuntimeError(f"a device process failed: {value}")
                    if kind == step:
                        total, seen = total + value, seen + 1
                return total

            res.connections = collect("connected")
            res.connected_mb = _settled_rss_mb(proc)
            go.set()
            collect("waiting")
            while counts[1] < n + 1 and time.monotonic() < end:  # + 1: the warm-up's Wait
                time.sleep(0.2)
            if counts[1] < n + 1:
                res.notes.append(f"the server saw {counts[1] - 1} of {n} Waits in time")
            res.waiting_mb = _settled_rss_mb(proc)
        except Exception as exc:  # a queue timeout or a failed device process: reported, not raised
            res.notes.append(f"{type(exc).__name__}: {exc}")
        finally:
            stop.set()
            for p in kids:
                p.join(10)
                if p.is_alive():
                    p.kill()
            server.kill()
            server.join(5)
    res.conn_kb = (res.connected_mb - res.rest_mb) * 1024 / n
    res.call_kb = (res.waiting_mb - res.connected_mb) * 1024 / n
    res.idle_kb = res.conn_kb + res.call_kb
    res.wall_s = time.monotonic() - t0
    return res


def slope_kb(first: FloorResult, last: FloorResult) -> float:
    """KB per idle device between two fleet sizes (waiting against waiting), as bench.fleet_load reckons it."""
    if last.devices <= first.devices:
        return math.nan
    return (last.waiting_mb - first.waiting_mb) * 1024 / (last.devices - first.devices)


def table(results: list[FloorResult]) -> str:
    rows = [f"{'N':>6} {'conns':>6} {'TLS':>4} {'rest MB':>8} {'conn MB':>8} {'wait MB':>8} "
            f"{'conn KB':>8} {'call KB':>8} {'idle KB':>8} {'slope KB':>8} {'wall s':>6}"]
    for r in results:
        slope = slope_kb(results[0], r)
        rows.append(f"{r.devices:>6} {r.connections:>6} {'yes' if r.tls else 'no':>4} {r.rest_mb:>8.1f} "
                    f"{r.connected_mb:>8.1f} {r.waiting_mb:>8.1f} {r.conn_kb:>8.1f} {r.call_kb:>8.1f} "
                    f"{r.idle_kb:>8.1f} {'-' if math.isnan(slope) else f'{slope:.1f}':>8} {r.wall_s:>6.0f}")
    rows += [f"  N={r.devices}: " + "; ".join(r.notes) for r in results if r.notes]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="100,1000,10000", help="fleet sizes, comma-separated (first: the slope's base)")
    ap.add_argument("--tls", action="store_true", help="mutual TLS, as `fedserver run` with tls_ca serves it")
    ap.add_argument("--procs", type=int, default=4, help="device processes")
    ap.add_argument("--devices-per-channel", type=int, default=1,
                    help="devices sharing one gRPC channel (one TCP connection); 1: as a real fleet")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args(argv)
    results = []
    for n in (int(x) for x in a.devices.split(",") if x.strip()):
        print(f"N={n}: measuring ...", file=sys.stderr, flush=True)
        results.append(measure(n, tls=a.tls, procs=a.procs, per_channel=a.devices_per_channel))
        print(table(results), flush=True)
    if a.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

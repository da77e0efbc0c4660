"""Raw TCP throughput and ICMP round trips through a :class:`~netem.topology.Topology`.

A receiver (``python -m netem.measure recv``) runs in one namespace and a
sender (``python -m netem.measure send``) in another; the receiver reports
payload Mbit/s over the steady part of the transfer. The first ``warmup``
seconds after the first byte are left out: they hold TCP slow start and the
shaper's initial token burst, neither of which is the link rate.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:  # imported lazily at run time: the child processes need none of it
    from netem.topology import DeviceLink, Topology

__all__ = ["TcpResult", "PingResult", "CheckRow", "measure_tcp", "ping", "check", "transfer_bytes", "main"]

PORT = 5201
CHUNK = 256 * 1024
DEFAULT_TOLERANCE = 0.05


class MeasureError(RuntimeError):
    """A measurement that could not be made (process failed, timed out)."""


@dataclass(frozen=True)
class TcpResult:
    """One raw TCP transfer, as seen by the receiver."""

    bytes: int
    seconds: float  # first to last byte
    window_bytes: int  # bytes after the warmup
    window_seconds: float

    @property
    def mbit(self) -> float:
        """Steady-state payload rate in Mbit/s (10**6 bit/s)."""
        if self.window_seconds <= 0:
            return self.bytes * 8 / 1e6 / max(self.seconds, 1e-9)
        return self.window_bytes * 8 / 1e6 / self.window_seconds


@dataclass(frozen=True)
class PingResult:
    """ICMP echo round trips in milliseconds."""

    sent: int
    rtt_ms: list[float]

    @property
    def received(self) -> int:
        return len(self.rtt_ms)

    @property
    def median_ms(self) -> Optional[float]:
        if not self.rtt_ms:
            return None
        ordered = sorted(self.rtt_ms)
        return ordered[len(ordered) // 2]


@dataclass(frozen=True)
class CheckRow:
    """A measured direction of one device link next to its profile."""

    device: str
    profile: str
    direction: str  # "down" (server -> device) or "up" (device -> server)
    profile_mbit: float
    measured_mbit: float
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def ratio(self) -> float:
        return self.measured_mbit / self.profile_mbit

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1) <= self.tolerance


# --------------------------------------------------------------- orchestration


def _child_env() -> dict[str, str]:
    # `ip netns exec` keeps the environment; make sure the child finds this
    # package even when it is not installed (running from a checkout).
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(topo: "Topology", ns: str, args: list[str]) -> subprocess.Popen:
    argv = topo.exec_argv(ns, [sys.executable, "-m", "netem.measure", *args])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise MeasureError(f"no answer from {proc.args[-3:]} within {timeout:g} s")
    return proc.stdout.readline()


def _finish(proc: subprocess.Popen, timeout: float, what: str) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise MeasureError(f"{what} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        last = (err or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise MeasureError(f"{what} failed: {last[0]}")
    return out


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def transfer_bytes(mbit: float, seconds: float) -> int:
    """Bytes that take ``seconds`` at ``mbit`` (at least 256 KiB)."""
    return max(CHUNK, int(mbit * 1e6 / 8 * seconds))


def measure_tcp(
    topo: "Topology",
    sender_ns: str,
    receiver_ns: str,
    receiver_ip: str,
    nbytes: int,
    warmup_s: float = 0.2,
    timeout_s: float = 120.0,
    port: int = PORT,
) -> TcpResult:
    """Send ``nbytes`` over raw TCP from ``sender_ns`` to ``receiver_ip`` in ``receiver_ns``.

    The result's ``mbit`` is the payload rate after ``warmup_s`` seconds;
    size ``nbytes`` (see :func:`transfer_bytes`) so the rest lasts a while.
    """
    receiver = _spawn(topo, receiver_ns, ["recv", "--bind", receiver_ip, "--port", str(port),
                                          "--warmup", f"{warmup_s:g}", "--timeout", f"{timeout_s:g}"])
    sender: Optional[subprocess.Popen] = None
    try:
        line = _readline(receiver, 15.0)
        if not line.startswith("READY"):
            receiver.kill()
            _, err = receiver.communicate()
            err_lines = (err or "").strip().splitlines()
            reason = line.strip() or (err_lines[-1] if err_lines else "no output")
            raise MeasureError(f"receiver in {receiver_ns} did not start: {reason}")
        sender = _spawn(topo, sender_ns, ["send", "--host", receiver_ip, "--port", str(port),
                                          "--bytes", str(nbytes), "--timeout", f"{timeout_s:g}"])
        _finish(sender, timeout_s + 10, f"sender in {sender_ns}")
        out = _finish(receiver, 15.0, f"receiver in {receiver_ns}")
    finally:
        _stop(*(p for p in (receiver, sender) if p is not None))
    data = json.loads(out.strip().splitlines()[-1])
    return TcpResult(**data)


def ping(topo: "Topology", ns: str, host: str, count: int = 5, interval_s: float = 0.05) -> PingResult:
    """ICMP echo from namespace ``ns`` to ``host`` (raw socket: no ping binary needed)."""
    proc = _spawn(topo, ns, ["ping", "--host", host, "--count", str(count), "--interval", f"{interval_s:g}"])
    data = json.loads(_finish(proc, 10.0 + count * (interval_s + 1.0), f"ping from {ns}").strip().splitlines()[-1])
    return PingResult(sent=data["sent"], rtt_ms=data["rtt_ms"])


def _warmup_for(topo: "Topology", dev: "DeviceLink") -> float:
    # Slow start needs ~log2(BDP/IW) RTTs; 10 RTTs cover it up to ~10 Gbit.
    rtt_s = dev.profile.rtt_ms / 1000 if topo.backend == "netem" else 0.001
    return 0.2 + 10 * rtt_s


def check(
    topo: "Topology",
    seconds: float = 2.0,
    tolerance: float = DEFAULT_TOLERANCE,
    directions: Sequence[str] = ("down", "up"),
    devices: Optional[Sequence["DeviceLink"]] = None,
) -> list[CheckRow]:
    """Measure each device link (default: all) with raw TCP; one row per device and direction."""
    rows: list[CheckRow] = []
    for dev in topo.devices if devices is None else devices:
        warmup = _warmup_for(topo, dev)
        for direction in directions:
            if direction == "down":
                rate = dev.profile.down_mbit
                sender, receiver, rip = topo.server_ns, dev.ns, dev.ip
            elif direction == "up":
                rate = dev.profile.up_mbit
                sender, receiver, rip = dev.ns, topo.server_ns, topo.server_ip
            else:
                raise ValueError(f"direction must be 'down' or 'up', got {direction!r}")
            result = measure_tcp(topo, sender, receiver, rip, transfer_bytes(rate, seconds + warmup), warmup)
            rows.append(CheckRow(device=f"d{dev.index}", profile=dev.profile.name, direction=direction,
                                 profile_mbit=rate, measured_mbit=result.mbit, tolerance=tolerance))
    return rows


# ------------------------------------------------------------ child processes


# struct tcp_info (linux/tcp.h): 8 u8 fields, 24 u32 fields, u64
# pacing_rate, max_pacing_rate, bytes_acked, bytes_received (byte 128),
# u32 segs_out, segs_in, notsent_bytes, min_rtt, data_segs_in (byte 152).
_TCPI_BYTES_RECEIVED = 128
_TCPI_DATA_SEGS_IN = 152
_TCP_INFO_LEN = 256


def _tcp_counters(sock: socket.socket) -> tuple[int, int]:
    """(in-order payload bytes received, data segments received incl. out-of-order)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _TCPI_DATA_SEGS_IN + 4:
        return -1, -1
    return (struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0],
            struct.unpack_from("=I", info, _TCPI_DATA_SEGS_IN)[0])


def _steady_window(samples: list[tuple[float, int]], final_bytes: int, final_segs: int) -> tuple[int, float]:
    """Payload bytes and seconds between the first and last busy samples.

    Samples are (time, data segments received). Segments count what
    arrived, in order or not; the in-order byte count would lag while a
    loss is repaired and then jump (slow start's overshoot drops every
    other packet, so repairs release two segments per retransmission),
    biasing a short window by up to a queue's worth of data. Segments
    become bytes at the transfer's mean payload per segment. Only samples
    before the last segment arrived count, so the link was busy throughout.
    """
    if final_segs <= 0:
        return 0, 0.0
    busy = [(t, n) for t, n in samples if 0 <= n < final_segs]
    if len(busy) < 2 or busy[-1][0] <= busy[0][0]:
        return 0, 0.0
    per_segment = final_bytes / final_segs
    return round((busy[-1][1] - busy[0][1]) * per_segment), busy[-1][0] - busy[0][0]


def _recv_main(bind: str, port: int, warmup: float, timeout: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((bind, port))
        srv.listen(1)
        srv.settimeout(timeout)
        print("READY", flush=True)
        conn, _ = srv.accept()
    with conn:
        conn.settimeout(timeout)
        view = memoryview(bytearray(CHUNK))
        total = 0
        t_first = t_last = 0.0
        # Kernel counters with the time they were read: exact at that moment
        # however late this process gets the CPU, unlike the times at which
        # it happens to read the data.
        samples: list[tuple[float, int]] = []
        while True:
            n = conn.recv_into(view)
            now = time.monotonic()
            if n == 0:
                break
            if total == 0:
                t_first = now
            total += n
            t_last = now
            if now - t_first >= warmup:
                samples.append((now, _tcp_counters(conn)[1]))
        final_segs = _tcp_counters(conn)[1]
    window_bytes, window_s = _steady_window(samples, total, final_segs)
    print(json.dumps({
        "bytes": total,
        "seconds": t_last - t_first,
        "window_bytes": window_bytes,
        "window_seconds": window_s,
    }), flush=True)
    return 0


def _send_main(host: str, port: int, nbytes: int, timeout: float) -> int:
    payload = memoryview(bytes(CHUNK))
    with socket.create_connection((host, port), timeout=timeout) as sock:
        left = nbytes
        while left > 0:
            step = min(left, CHUNK)
            sock.sendall(payload[:step])
            left -= step
        sock.shutdown(socket.SHUT_WR)
        # Wait for the receiver to close so our exit means "all delivered".
        while sock.recv(4096):
            pass
    return 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _ping_main(host: str, count: int, interval: float, timeout: float = 2.0) -> int:
    ident = os.getpid() & 0xFFFF
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for seq in range(count):
            body = b"netem-ping".ljust(56, b".")
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + body), ident, seq) + body
            sent_at = time.monotonic()
            sock.sendto(packet, (host, 0))
            deadline = sent_at + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    data, _ = sock.recvfrom(2048)
                except socket.timeout:
                    break
                ihl = (data[0] & 0x0F) * 4
                icmp_type, _, _, r_ident, r_seq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                if icmp_type == 0 and r_ident == ident and r_seq == seq:
                    rtts.append((time.monotonic() - sent_at) * 1000)
                    break
            time.sleep(interval)
    print(json.dumps({"sent": count, "rtt_ms": rtts}), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Child-process entry points: recv, send, ping."""
    parser = argparse.ArgumentParser(prog="python -m netem.measure", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    recv = sub.add_parser("recv", help="accept one TCP connection, print the payload rate as JSON")
    recv.add_argument("--bind", default="0.0.0.0")
    recv.add_argument("--port", type=int, default=PORT)
    recv.add_argument("--warmup", type=float, default=0.2, help="seconds after the first byte left out")
    recv.add_argument("--timeout", type=float, default=120.0)
    send = sub.add_parser("send", help="send N bytes over TCP")
    send.add_argument("--host", required=True)
    send.add_argument("--port", type=int, default=PORT)
    send.add_argument("--bytes", type=int, required=True)
    send.add_argument("--timeout", type=float, default=120.0)
    png = sub.add_parser("ping", help="ICMP echo round trips as JSON")
    png.add_argument("--host", required=True)
    png.add_argument("--count", type=int, default=5)
    png.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args(argv)
    if args.mode == "recv":
        return _recv_main(args.bind, args.port, args.warmup, args.timeout)
    if args.mode == "send":
        return _send_main(args.host, args.port, args.bytes, args.timeout)
    return _ping_main(args.host, args.count, args.interval)


if __name__ == "__main__":
    sys.exit(main())

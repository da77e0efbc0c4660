"""Build and run ``tc``/``ip`` commands that shape one interface.

Two backends, picked at run time by :func:`netem_supported`:

``netem``  one ``netem`` qdisc per direction with ``rate``, ``delay``,
           ``jitter`` and ``loss``. netem's own rate is used (not htb with a
           netem leaf) because with ``rate`` set netem schedules each packet
           after the previous one, so jitter never reorders packets; a real
           cellular link (RLC in-order delivery) does not reorder either.
``htb``    for kernels without ``sch_netem`` (like the development
           machines): an htb class does the rate limiting and delay, jitter
           and loss are NOT applied; :func:`backend_warning` says which.

Rates. Profiles give TCP goodput (what a speed test reports). Both qdiscs
count L2 bytes (IP packet + 14-byte Ethernet header; for GSO packets the
kernel adds the headers of every segment), so a full-size TCP segment of
1448 payload bytes (MTU 1500 - 20 IP - 20 TCP - 12 timestamp option) costs
1514 bytes: goodput would be 95.6 % of the configured rate, too close to a
5 % tolerance. We therefore configure ``rate = goodput * (mtu + 14) /
(mtu - 52)`` (a stab/``overhead`` cannot do this: it only adds bytes).
Smaller packets (ACKs, a request's tail) then get slightly more than the
profile's bit rate, which matters little for bulk model transfers.

htb details (measured, see :func:`htb_params`): ``burst``/``cburst`` hold
the largest packet the qdisc will see plus one MTU, and at least 1 ms at the
rate so a late timer does not lose tokens at Gbit rates (with tc's default
of ~1600 bytes a 1 Gbit/s class reached 0.97-0.98, with 1 ms 0.996-1.0). ``quantum`` is pinned
(one class, so it only has to be >= MTU) to silence "quantum is big" and
keep r2q out of the way. The leaf is a ``pfifo`` of ~100 ms at the rate
(not the 1000-packet txqueuelen default: 10 s of buffer at 1 Mbit/s).
Topologies also cap each veth's ``gso_max_segs`` (:func:`gso_segments`):
a qdisc sees a GSO super-packet as one unit, and uncapped 64 KiB packets
made a 2 Mbit/s link deliver in 0.26 s lumps (measured 1.13-1.24 of the
rate over a 1.5 s transfer, 15 Mbit/s 0.975).

Measured with raw TCP on veth pairs (2 cores, BBR, loaded machine), ratio
of measured goodput to the profile, htb backend:
2-166 Mbit/s 0.999-1.000 with the overhead compensation and capped GSO;
0.956 without the compensation; 1 Gbit/s 0.99-1.0; 10 Gbit/s is CPU-bound
(0.5-0.9 with a Python sender).

Every command goes through a :class:`Runner`, which logs the exact command
line (stderr by default, or any callback) and keeps a history, so callers
and tests can capture what ran. The ``*_commands`` functions only build
argv lists and run nothing.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from netem.profiles import LinkProfile

__all__ = [
    "NetemError",
    "Runner",
    "HtbParams",
    "NetemParams",
    "BACKENDS",
    "IFB_PREFIX",
    "l2_rate_bit",
    "htb_params",
    "gso_segments",
    "netem_params",
    "egress_commands",
    "ingress_redirect_commands",
    "apply_commands",
    "clear_commands",
    "backend_warning",
    "netem_supported",
    "resolve_backend",
    "ifb_name",
    "apply",
    "clear",
    "show",
]

log = logging.getLogger("netem")

BACKENDS = ("netem", "htb")
# Ethernet header bytes a qdisc counts on top of the IP packet (no FCS,
# preamble or inter-frame gap: those never reach the qdisc).
ETH_HEADER = 14
# IPv4 + TCP + timestamp option: Linux sends timestamps by default.
TCP_IP_HEADERS = 20 + 20 + 12
# Largest GSO/TSO super-packet a veth hands to the qdisc.
GSO_MAX = 65536
# IFB devices made by apply() are named IFB_PREFIX + ifindex of the shaped
# interface: unique per namespace, found again by clear(), <= 15 chars.
IFB_PREFIX = "fdt-ifb"
HTB_HANDLE = "1:"
HTB_CLASS = "1:1"
LEAF_HANDLE = "10:"
QUEUE_MS = 100.0


class NetemError(RuntimeError):
    """A shaping step that failed, with the command and the kernel's answer."""


def _stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Runner:
    """Runs commands, logging each exact command line first.

    ``log`` gets ``"+ <command>"`` for every command (None: silent);
    ``history`` keeps every argv; ``dry_run`` records without running.
    """

    log: Optional[Callable[[str], None]] = _stderr_log
    dry_run: bool = False
    history: list[list[str]] = field(default_factory=list)

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``argv``; raise NetemError on a non-zero exit when ``check``."""
        argv = [str(a) for a in argv]
        self.history.append(argv)
        if self.log is not None:
            self.log("+ " + shlex.join(argv))
        if self.dry_run:
            return subprocess.CompletedProcess(argv, 0, "", "")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise NetemError(f"{argv[0]!r} not found: install iproute2") from None
        except subprocess.TimeoutExpired:
            raise NetemError(f"timed out after {timeout:g} s: {shlex.join(argv)}") from None
        if check and proc.returncode != 0:
            raise NetemError(f"{shlex.join(argv)} failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")
        return proc


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def ip_argv(netns: Optional[str], *args: str) -> list[str]:
    """``ip [-n NS] ARGS``."""
    return ["ip", *(["-n", netns] if netns else []), *args]


def tc_argv(netns: Optional[str], *args: str) -> list[str]:
    """``tc [-n NS] ARGS``."""
    return ["tc", *(["-n", netns] if netns else []), *args]


# ---------------------------------------------------------------- parameters


def l2_rate_bit(goodput_mbit: float, mtu: int = 1500) -> int:
    """Qdisc rate (bit/s, L2 bytes) at which full-size TCP segments carry ``goodput_mbit``."""
    if mtu <= TCP_IP_HEADERS:
        raise ValueError(f"MTU {mtu} is too small for TCP")
    return int(math.ceil(goodput_mbit * 1e6 * (mtu + ETH_HEADER) / (mtu - TCP_IP_HEADERS)))


def _ms(value: float) -> str:
    # tc parses fractional milliseconds; keep whole numbers tidy.
    return f"{value:g}ms"


def _queue_packets(rate_bit: int, mtu: int, seconds: float, floor: int = 64, cap: int = 100_000) -> int:
    packets = math.ceil(rate_bit / 8 * seconds / (mtu + ETH_HEADER))
    return max(floor, min(cap, packets))


@dataclass(frozen=True)
class HtbParams:
    """One htb class plus its pfifo leaf."""

    rate_bit: int
    burst_bytes: int
    cburst_bytes: int
    quantum: int
    queue_packets: int


def gso_segments(goodput_mbit: float, mtu: int = 1500, target_s: float = 0.005, cap: int = 64) -> int:
    """GSO segments per super-packet so one takes ~``target_s`` of link time (>= 1).

    A qdisc sees a GSO super-packet as one unit: a 64 KiB one is 35 ms at
    15 Mbit/s, so a slow link would deliver in 64 KiB lumps instead of a
    packet stream. Topologies cap ``gso_max_segs`` with this value.
    """
    per_target = l2_rate_bit(goodput_mbit, mtu) / 8 * target_s / (mtu + ETH_HEADER)
    return max(1, min(cap, int(per_target)))


def htb_params(goodput_mbit: float, mtu: int = 1500, max_packet: int = GSO_MAX) -> HtbParams:
    """htb class settings for ``goodput_mbit`` of TCP payload (see module doc).

    ``max_packet`` is the largest skb the qdisc will see (a GSO super-packet
    unless the device's gso_max_segs is capped).
    """
    rate = l2_rate_bit(goodput_mbit, mtu)
    # The bucket must hold the largest packet plus one MTU, or htb stalls on
    # it; 1 ms of tokens absorbs timer lateness at Gbit rates.
    burst = max(max_packet + mtu + ETH_HEADER, math.ceil(rate / 8 * 0.001))
    return HtbParams(
        rate_bit=rate,
        burst_bytes=burst,
        cburst_bytes=burst,
        quantum=max(mtu + ETH_HEADER, 1514),
        queue_packets=_queue_packets(rate, mtu, QUEUE_MS / 1000),
    )


@dataclass(frozen=True)
class NetemParams:
    """One netem qdisc: rate, delay, jitter, loss and its queue limit."""

    rate_bit: int
    delay_ms: float
    jitter_ms: float
    loss_pct: float
    limit_packets: int


def netem_params(goodput_mbit: float, profile: LinkProfile, mtu: int = 1500) -> NetemParams:
    """netem settings; the limit holds the packets in the delay line plus ~100 ms of queue."""
    rate = l2_rate_bit(goodput_mbit, mtu)
    in_flight_s = (profile.delay_ms + profile.jitter_ms + QUEUE_MS) / 1000
    return NetemParams(
        rate_bit=rate,
        delay_ms=profile.delay_ms,
        jitter_ms=profile.jitter_ms,
        loss_pct=profile.loss_pct,
        limit_packets=_queue_packets(rate, mtu, in_flight_s, floor=1000),
    )


# ------------------------------------------------------------ command lines


def egress_commands(
    dev: str,
    goodput_mbit: float,
    profile: LinkProfile,
    backend: str,
    netns: Optional[str] = None,
    mtu: int = 1500,
    max_packet: int = GSO_MAX,
) -> list[list[str]]:
    """Commands that shape what leaves ``dev`` to ``goodput_mbit`` (plus impairments for netem)."""
    _check_backend(backend)
    if backend == "netem":
        p = netem_params(goodput_mbit, profile, mtu)
        args = ["netem", "limit", str(p.limit_packets)]
        if p.delay_ms or p.jitter_ms:
            args += ["delay", _ms(p.delay_ms)]
            if p.jitter_ms:
                args.append(_ms(p.jitter_ms))
        if p.loss_pct:
            args += ["loss", "random", f"{p.loss_pct:g}%"]
        args += ["rate", f"{p.rate_bit}bit"]
        return [tc_argv(netns, "qdisc", "add", "dev", dev, "root", "handle", HTB_HANDLE, *args)]
    h = htb_params(goodput_mbit, mtu, max_packet)
    return [
        tc_argv(netns, "qdisc", "add", "dev", dev, "root", "handle", HTB_HANDLE, "htb", "default", "1"),
        tc_argv(
            netns, "class", "add", "dev", dev, "parent", HTB_HANDLE, "classid", HTB_CLASS, "htb",
            "rate", f"{h.rate_bit}bit", "ceil", f"{h.rate_bit}bit",
            "burst", f"{h.burst_bytes}b", "cburst", f"{h.cburst_bytes}b", "quantum", str(h.quantum),
        ),
        tc_argv(netns, "qdisc", "add", "dev", dev, "parent", HTB_CLASS, "handle", LEAF_HANDLE,
                "pfifo", "limit", str(h.queue_packets)),
    ]


def ingress_redirect_commands(dev: str, ifb: str, netns: Optional[str] = None) -> list[list[str]]:
    """Create ``ifb`` and redirect everything arriving on ``dev`` through it."""
    return [
        ip_argv(netns, "link", "add", ifb, "type", "ifb"),
        ip_argv(netns, "link", "set", "dev", ifb, "up"),
        tc_argv(netns, "qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"),
        tc_argv(netns, "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb),
    ]


def apply_commands(
    iface: str,
    profile: LinkProfile,
    backend: str,
    ifb: str,
    netns: Optional[str] = None,
    mtu: int = 1500,
) -> list[list[str]]:
    """Both directions of a host interface: egress = up rate, ingress (via IFB) = down rate."""
    return [
        *egress_commands(iface, profile.up_mbit, profile, backend, netns, mtu),
        *ingress_redirect_commands(iface, ifb, netns),
        *egress_commands(ifb, profile.down_mbit, profile, backend, netns, mtu),
    ]


def clear_commands(iface: str, ifb: str, netns: Optional[str] = None) -> list[list[str]]:
    """Undo :func:`apply_commands` (each may fail harmlessly if already gone)."""
    return [
        tc_argv(netns, "qdisc", "del", "dev", iface, "root"),
        tc_argv(netns, "qdisc", "del", "dev", iface, "ingress"),
        ip_argv(netns, "link", "del", ifb),
    ]


def backend_warning(profile: LinkProfile, backend: str) -> Optional[str]:
    """What the htb backend leaves out for ``profile``; None when nothing is lost."""
    _check_backend(backend)
    if backend == "netem" or not profile.has_impairments:
        return None
    missing = []
    if profile.delay_ms:
        missing.append(f"delay {profile.delay_ms:g} ms")
    if profile.jitter_ms:
        missing.append(f"jitter {profile.jitter_ms:g} ms")
    if profile.loss_pct:
        missing.append(f"loss {profile.loss_pct:g}%")
    return (
        f"profile {profile.name}: kernel lacks sch_netem, htb rate limiting only; "
        f"NOT applied: {', '.join(missing)}"
    )


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


# ------------------------------------------------------------------ running


def _default_runner(runner: Optional[Runner]) -> Runner:
    return runner if runner is not None else Runner()


@functools.lru_cache(maxsize=1)
def netem_supported() -> bool:
    """True if the kernel accepts a netem qdisc (probed on ``lo`` of a throwaway namespace)."""
    probe = f"fdt-{os.getpid()}-probe"
    quiet = Runner(log=None)
    if quiet.run(["ip", "netns", "add", probe], check=False).returncode != 0:
        raise NetemError("cannot create a network namespace to probe for sch_netem (need root and 'ip netns')")
    try:
        proc = quiet.run(tc_argv(probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"), check=False)
        return proc.returncode == 0
    finally:
        quiet.run(["ip", "netns", "del", probe], check=False)


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> ``netem`` if the kernel has it, else ``htb``; others are checked and returned."""
    if backend == "auto":
        return "netem" if netem_supported() else "htb"
    _check_backend(backend)
    return backend


def link_info(iface: str, netns: Optional[str] = None, runner: Optional[Runner] = None) -> dict:
    """``ip -j link show`` for one interface (raises NetemError if missing)."""
    proc = _default_runner(runner).run(ip_argv(netns, "-j", "link", "show", "dev", iface), check=False)
    if proc.returncode != 0:
        where = f" in namespace {netns}" if netns else ""
        raise NetemError(f"no interface {iface!r}{where}: {_last_line(proc.stderr)}")
    return json.loads(proc.stdout)[0]


def ifb_name(iface: str, netns: Optional[str] = None, runner: Optional[Runner] = None) -> str:
    """The IFB device :func:`apply` uses for ``iface``."""
    return f"{IFB_PREFIX}{link_info(iface, netns, runner)['ifindex']}"


def apply(
    iface: str,
    profile: LinkProfile,
    netns: Optional[str] = None,
    backend: str = "auto",
    runner: Optional[Runner] = None,
) -> list[str]:
    """Shape both directions of ``iface``; returns warnings (features not applied).

    Egress gets the profile's up rate directly; ingress is redirected to an
    IFB device shaped at the down rate. Replaces earlier shaping of ``iface``.
    The device's GSO/GRO settings are left alone, so on a slow profile a
    NIC's 64 KiB super-packets pass in lumps; the average rate holds.
    """
    runner = _default_runner(runner)
    backend = resolve_backend(backend)
    info = link_info(iface, netns, runner)
    ifb = f"{IFB_PREFIX}{info['ifindex']}"
    clear(iface, netns, runner)
    try:
        for argv in apply_commands(iface, profile, backend, ifb, netns, int(info.get("mtu", 1500))):
            runner.run(argv)
    except BaseException:
        clear(iface, netns, runner)
        raise
    warning = backend_warning(profile, backend)
    if warning:
        log.warning("%s", warning)
    return [warning] if warning else []


def clear(iface: str, netns: Optional[str] = None, runner: Optional[Runner] = None) -> None:
    """Remove shaping and the IFB device from ``iface`` (no error if none)."""
    runner = _default_runner(runner)
    ifb = ifb_name(iface, netns, runner)
    for argv in clear_commands(iface, ifb, netns):
        runner.run(argv, check=False)


def show(iface: str, netns: Optional[str] = None, runner: Optional[Runner] = None) -> str:
    """qdiscs, classes and statistics of ``iface`` and of its IFB device, as text."""
    runner = _default_runner(runner)
    ifb = ifb_name(iface, netns, runner)
    sections = [("qdisc", iface), ("class", iface), ("filter", iface)]
    if runner.run(ip_argv(netns, "link", "show", "dev", ifb), check=False).returncode == 0:
        sections += [("qdisc", ifb), ("class", ifb)]
    out = []
    for what, dev in sections:
        # The only filter we add is the ingress redirect to the IFB.
        args = [what, "show", "dev", dev, "ingress"] if what == "filter" else ["-s", what, "show", "dev", dev]
        text = runner.run(tc_argv(netns, *args), check=False).stdout.strip()
        if text:
            out.append(f"# {what} {dev}\n{text}")
    return "\n".join(out)

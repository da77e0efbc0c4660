"""Network-namespace topologies: one server and N devices behind shaped links.

Layout (all names start with ``{prefix}-{pid}-{seq}`` so :func:`cleanup`
finds them and two topologies, even in one process, never collide)::

    {tag}-srv   br0 198.18.0.1/15 -- vd0 ... vdN-1     (bridge ports)
                                      |         |
    {tag}-d0    eth0 198.18.0.11/15   |   {tag}-dN-1   eth0 198.18.0.(11+N-1)/15

Each device link is a veth pair created directly inside the two namespaces,
so nothing ever exists in the root namespace and deleting the namespaces
removes every veth, bridge and qdisc. Download (server -> device) is shaped
on the egress of the server-side port ``vdI`` at the down rate, upload on
the egress of the device's ``eth0`` at the up rate: shaping egress on both
ends avoids IFB devices.
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Optional

from netem import tc
from netem.profiles import LinkProfile

__all__ = ["DeviceLink", "Topology", "cleanup", "require_namespaces", "TCP_SETTINGS", "list_namespaces"]

NETWORK = ipaddress.ip_network("198.18.0.0/15")
SERVER_IP = "198.18.0.1"
FIRST_DEVICE_HOST = 11
BRIDGE = "br0"
DEVICE_IF = "eth0"
MTU = 1500
PACKET = MTU + tc.ETH_HEADER

# Pinned in every namespace so results do not depend on the host's tuning
# (the development host defaults to bbr with 32 MiB rmem; a Jetson runs cubic
# with the kernel defaults). Outside the root namespace the kernel accepts
# only congestion controls listed in the host's
# net.ipv4.tcp_allowed_congestion_control; when cubic is not, the namespace
# keeps its default and Topology.warnings says so. Values are the upstream
# kernel defaults except:
#   tcp_slow_start_after_idle=0: rounds leave the link idle for T_comp; a
#     cwnd reset after every idle period would charge slow start to T_comm
#     each round and make T_comm depend on T_comp.
#   tcp_no_metrics_save=1: a connection must not inherit ssthresh/RTT from
#     an earlier one, so repeated measurements are independent.
CC_KEY = "net.ipv4.tcp_congestion_control"
TCP_SETTINGS: dict[str, str] = {
    CC_KEY: "cubic",
    "net.ipv4.tcp_slow_start_after_idle": "0",
    "net.ipv4.tcp_no_metrics_save": "1",
    "net.ipv4.tcp_rmem": "4096 131072 6291456",
    "net.ipv4.tcp_wmem": "4096 16384 4194304",
    "net.ipv4.tcp_ecn": "2",
    "net.ipv4.tcp_timestamps": "1",
    "net.ipv4.tcp_sack": "1",
}
# Read back but not set: global (not per-namespace) on this kernel.
TCP_READ_ONLY = ("net.core.rmem_max", "net.core.wmem_max")

_SEQ = itertools.count()
_NAME_RE_TEMPLATE = r"^{prefix}-(\d+)-"


@dataclass(frozen=True)
class DeviceLink:
    """One device namespace and its shaped link to the server."""

    index: int
    ns: str
    ip: str
    profile: LinkProfile
    server_if: str  # bridge port in the server namespace (download egress)
    device_if: str  # interface inside the device namespace (upload egress)


def _run_quiet(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def list_namespaces() -> list[str]:
    """Names from ``ip netns list``."""
    proc = _run_quiet(["ip", "netns", "list"])
    if proc.returncode != 0:
        raise tc.NetemError(f"'ip netns list' failed: {proc.stderr.strip() or proc.returncode}")
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def require_namespaces() -> None:
    """Raise NetemError with the reason if we cannot create network namespaces."""
    if os.geteuid() != 0:
        raise tc.NetemError("network namespaces need root (run with sudo)")
    probe = f"fdt-{os.getpid()}-check"
    proc = _run_quiet(["ip", "netns", "add", probe])
    if proc.returncode != 0:
        raise tc.NetemError(f"'ip netns add' is unusable here: {proc.stderr.strip() or proc.returncode}")
    _run_quiet(["ip", "netns", "del", probe])


class Topology:
    """Server + one namespace per device, each link shaped by its own profile.

    Use as a context manager; everything is torn down on exit, on an
    exception and on SIGINT/SIGTERM/SIGHUP (handlers installed while active,
    previous ones restored after; a caller's own handler is called instead
    of ours, default ones become KeyboardInterrupt / SystemExit(128+sig)).
    Processes still running inside the namespaces at teardown get SIGTERM,
    then SIGKILL after 2 s: a live process would keep its interfaces alive.

    ``backend`` is ``auto``, ``netem`` or ``htb``; the chosen one is in
    ``self.backend`` and what it could not emulate is in ``self.warnings``.
    Commands are echoed to stderr unless ``runner=tc.Runner(log=None)``.
    """

    def __init__(
        self,
        profiles: list[LinkProfile],
        prefix: str = "fdt",
        backend: str = "auto",
        runner: Optional[tc.Runner] = None,
        congestion_control: str = TCP_SETTINGS[CC_KEY],
    ) -> None:
        if not profiles:
            raise ValueError("a topology needs at least one device profile")
        if len(profiles) > 200:
            raise ValueError("at most 200 devices per topology")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,15}", prefix):
            raise ValueError(f"prefix {prefix!r} must be a letter then up to 15 letters, digits or '_'")
        self.profiles = list(profiles)
        self.prefix = prefix
        self.tag = f"{prefix}-{os.getpid()}-{next(_SEQ)}"
        self.server_ns = f"{self.tag}-srv"
        self.server_ip = SERVER_IP
        self.devices: list[DeviceLink] = [
            DeviceLink(
                index=i,
                ns=f"{self.tag}-d{i}",
                ip=str(NETWORK.network_address + FIRST_DEVICE_HOST + i),
                profile=p,
                server_if=f"vd{i}",
                device_if=DEVICE_IF,
            )
            for i, p in enumerate(self.profiles)
        ]
        self.runner = runner if runner is not None else tc.Runner()
        self._backend_request = backend
        self.congestion_control = congestion_control
        self.backend: str = ""
        self.warnings: list[str] = []
        self._tcp: dict[str, str] = {}
        self._created: list[str] = []
        self._old_handlers: dict[int, Any] = {}
        self._active = False

    # ----------------------------------------------------------- public API

    @property
    def namespaces(self) -> list[str]:
        """Server namespace first, then one per device."""
        return [self.server_ns, *(d.ns for d in self.devices)]

    def exec_argv(self, ns: str, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run inside namespace ``ns``."""
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of this topology ({', '.join(self.namespaces)})")
        return ["ip", "netns", "exec", ns, *argv]

    def tcp_settings(self) -> dict[str, str]:
        """TCP sysctls as read back inside the namespaces (identical in all of them)."""
        return dict(self._tcp)

    @property
    def active(self) -> bool:
        """True between a successful ``__enter__`` and teardown."""
        return self._active

    def __enter__(self) -> "Topology":
        self._install_signal_handlers()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Tear everything down (idempotent); signals are held off meanwhile."""
        held = self._hold_signals()
        try:
            self._teardown()
        finally:
            self._active = False
            self._restore_signals(held)

    # ---------------------------------------------------------------- setup

    def _setup(self) -> None:
        self.backend = tc.resolve_backend(self._backend_request)
        run = self.runner.run
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            self._created.append(ns)
            run(tc.ip_argv(ns, "link", "set", "dev", "lo", "up"))
            self._set_sysctls(ns)
        srv = self.server_ns
        prefixlen = NETWORK.prefixlen
        # The bridge is the server's egress device, so it decides how big the
        # GSO packets reaching each port's qdisc are (it does not inherit the
        # ports' limit): use the smallest of the download links. Cost: in a
        # fleet mixing a >= 1 Gbit/s link with a few-Mbit/s one, the fast
        # downloads go out in small packets and may be CPU-bound.
        br_segs = min(tc.gso_segments(d.profile.down_mbit) for d in self.devices)
        run(tc.ip_argv(srv, "link", "add", BRIDGE, "gso_max_segs", str(br_segs), "type", "bridge", "stp_state", "0"))
        run(tc.ip_argv(srv, "addr", "add", f"{self.server_ip}/{prefixlen}", "dev", BRIDGE))
        run(tc.ip_argv(srv, "link", "set", "dev", BRIDGE, "up"))
        for dev in self.devices:
            run(tc.ip_argv(srv, "link", "add", dev.server_if, "type", "veth", "peer", "name", dev.device_if,
                           "netns", dev.ns))
            down_segs = tc.gso_segments(dev.profile.down_mbit)
            up_segs = tc.gso_segments(dev.profile.up_mbit)
            run(tc.ip_argv(srv, "link", "set", "dev", dev.server_if, "gso_max_segs", str(down_segs)))
            run(tc.ip_argv(dev.ns, "link", "set", "dev", dev.device_if, "gso_max_segs", str(up_segs)))
            run(tc.ip_argv(srv, "link", "set", "dev", dev.server_if, "master", BRIDGE))
            run(tc.ip_argv(srv, "link", "set", "dev", dev.server_if, "up"))
            run(tc.ip_argv(dev.ns, "addr", "add", f"{dev.ip}/{prefixlen}", "dev", dev.device_if))
            run(tc.ip_argv(dev.ns, "link", "set", "dev", dev.device_if, "up"))
            p = dev.profile
            for argv in tc.egress_commands(dev.server_if, p.down_mbit, p, self.backend, srv,
                                           max_packet=down_segs * PACKET):
                run(argv)
            for argv in tc.egress_commands(dev.device_if, p.up_mbit, p, self.backend, dev.ns,
                                           max_packet=up_segs * PACKET):
                run(argv)
            warning = tc.backend_warning(p, self.backend)
            if warning and warning not in self.warnings:
                self.warnings.append(warning)
        self._tcp = self._read_sysctls(srv)
        for dev in self.devices:
            differing = {k: v for k, v in self._read_sysctls(dev.ns).items() if self._tcp.get(k) != v}
            if differing:
                self.warnings.append(f"TCP settings in {dev.ns} differ from the server's: {differing}")
        for warning in self.warnings:
            tc.log.warning("%s", warning)

    def _set_sysctls(self, ns: str) -> None:
        exec_ns = ["ip", "netns", "exec", ns]
        # IPv6 is off only to keep router solicitations and DAD out of the
        # shaped queues; it may be absent, so failures are ignored.
        self.runner.run([*exec_ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                         "net.ipv6.conf.default.disable_ipv6=1"], check=False)
        settings = {k: v for k, v in TCP_SETTINGS.items() if k != CC_KEY}
        self.runner.run([*exec_ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])
        # Outside the root namespace the kernel only accepts algorithms in
        # the host's tcp_allowed_congestion_control; we do not widen that
        # host-wide list, we keep the namespace default and say so.
        wanted = self.congestion_control
        proc = self.runner.run([*exec_ns, "sysctl", "-q", "-w", f"{CC_KEY}={wanted}"], check=False)
        if proc.returncode != 0:
            actual = _read_file(exec_ns, "/proc/sys/net/ipv4/tcp_congestion_control")
            allowed = _read_file([], "/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            warning = (f"congestion control {wanted} is not allowed in namespaces (host "
                       f"tcp_allowed_congestion_control: {allowed or '?'}); using {actual or 'the default'}")
            if warning not in self.warnings:
                self.warnings.append(warning)

    def _read_sysctls(self, ns: str) -> dict[str, str]:
        keys = [*TCP_SETTINGS, *TCP_READ_ONLY]
        proc = self.runner.run(["ip", "netns", "exec", ns, "sysctl", *keys], check=False)
        values: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = " ".join(value.split())
        return values

    # ------------------------------------------------------------- teardown

    def _teardown(self) -> None:
        for ns in reversed(self._created):
            _kill_namespace_processes(ns)
            self.runner.run(["ip", "netns", "del", ns], check=False)
        self._created.clear()

    # -------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in _SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # Unwind through the `with` block so __exit__ tears down. A caller's
        # own handler keeps its meaning (it is called instead); default
        # dispositions become the matching exception.
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        if callable(old):
            old(signum, frame)
            return
        if old == signal.SIG_IGN:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _hold_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, signal.SIG_IGN) for s in _SIGNALS}

    def _restore_signals(self, held: dict[int, Any]) -> None:
        if not held:
            return
        for signum in _SIGNALS:
            if signum in self._old_handlers:
                previous = self._old_handlers.pop(signum)
                # None: the handler was set outside Python; the default is the best we can do.
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            else:
                signal.signal(signum, held[signum])


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _namespace_pids(ns: str) -> list[int]:
    proc = _run_quiet(["ip", "netns", "pids", ns])
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _kill_namespace_processes(ns: str, grace_s: float = 2.0) -> list[int]:
    """Stop processes still inside ``ns``: a live process keeps its interfaces alive."""
    pids = [p for p in _namespace_pids(ns) if p != os.getpid()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cleanup(prefix: str = "fdt", force: bool = False, log: Optional[Callable[[str], None]] = None) -> list[str]:
    """Remove leftovers of topologies whose process is gone; returns what was removed.

    Namespaces named ``{prefix}-{pid}-...`` are removed when ``pid`` no
    longer runs (or always with ``force``), so a cleanup never breaks a
    topology another process is using. IFB devices ``fdt-ifbN`` left in the
    root namespace by :func:`netem.tc.apply` are removed when their shaped
    interface (ifindex N) no longer exists.
    """
    pattern = re.compile(_NAME_RE_TEMPLATE.format(prefix=re.escape(prefix)))
    removed: list[str] = []
    for ns in list_namespaces():
        if not ns.startswith(f"{prefix}-"):
            continue
        match = pattern.match(ns)
        owner = int(match.group(1)) if match else None
        if not force and owner is not None and (owner == os.getpid() or _alive(owner)):
            if log and owner != os.getpid():
                log(f"skipped namespace {ns}: its process {owner} is still running (use --force)")
            continue
        _kill_namespace_processes(ns)
        proc = _run_quiet(["ip", "netns", "del", ns])
        if proc.returncode == 0:
            removed.append(f"netns {ns}")
        elif log:
            log(f"could not remove namespace {ns}: {proc.stderr.strip()}")
    removed += _cleanup_orphan_ifbs()
    return removed


def _cleanup_orphan_ifbs() -> list[str]:
    proc = _run_quiet(["ip", "-o", "link", "show"])
    indexes = set()
    ifbs: list[tuple[str, int]] = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        index = int(parts[0].strip())
        name = parts[1].strip().split("@")[0]
        indexes.add(index)
        suffix = name[len(tc.IFB_PREFIX):]
        if name.startswith(tc.IFB_PREFIX) and suffix.isdigit():
            ifbs.append((name, int(suffix)))
    removed = []
    for name, parent in ifbs:
        if parent not in indexes and _run_quiet(["ip", "link", "del", name]).returncode == 0:
            removed.append(f"link {name}")
    return removed


def _read_file(prefix_argv: list[str], path: str) -> str:
    proc = _run_quiet([*prefix_argv, "cat", path])
    return " ".join(proc.stdout.split()) if proc.returncode == 0 else ""

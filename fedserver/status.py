"""`fedserver status`: the Status RPC's message from a coordinator snapshot, and the client that prints it.

The known devices are listed a page at a time (`StatusRequest.devices_page_size`, at most
MAX_DEVICES_PAGE, after the cursor `devices_after`): a fleet of thousands is never one message.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

import fedcore
from fedcore.channel import ClientSecurity, open_channel
from fedcore.config import described
from fedcore.records import RoundSummary, known
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

if TYPE_CHECKING:
    from .registry import Device, Registry

MAX_DEVICES_PAGE = 1000
MAX_CURSOR = 128  # a device id is at most 128 characters (fedserver.auth.DEVICE_ID)


def check_page(page_size: int, after: str) -> None:
    """ValueError with a one-line reason for a page request no server answers."""
    if page_size < 0:
        raise ValueError(f"devices page size must be 0 (no list) to {MAX_DEVICES_PAGE}, got {page_size}")
    if len(after) > MAX_CURSOR:
        raise ValueError(f"devices after must be a device id (at most {MAX_CURSOR} characters), "
                         f"got {len(after)} characters")


def device_info(dev: Device, alive: bool, now: float) -> pb.DeviceInfo:
    """`now`: the registry clock's monotonic time."""
    info = pb.DeviceInfo(device_id=dev.device_id, alive=alive, num_samples=dev.num_samples,
                         accelerator=str(dev.capabilities.get("accelerator") or "")[:64],
                         joined_unix=dev.joined_at)
    if math.isfinite(dev.last_seen):
        info.seconds_since_seen = max(0.0, now - dev.last_seen)
    e = dev.estimates
    for key, dst in (("down_Bps", "down_bytes_per_s"), ("up_Bps", "up_bytes_per_s"), ("step_s", "step_s")):
        if key in e:
            setattr(info, dst, e[key])
    return info


def device_page(registry: Registry, after: str, page_size: int,
                now: float) -> tuple[list[pb.DeviceInfo], str]:
    """One page of the registry's devices for the Status RPC: (devices, devices_next_after).

    `after` and `page_size` as StatusRequest has them (0: no list; more than MAX_DEVICES_PAGE: capped);
    `now`: the registry clock's monotonic time. O(page_size + log N): cheap under the coordinator's lock.
    Raises ValueError (INVALID_ARGUMENT) for a negative size or a cursor that cannot be a device id.
    """
    check_page(page_size, after)
    if page_size == 0:
        return [], ""
    devices, next_after = registry.page(after, min(page_size, MAX_DEVICES_PAGE))
    return [device_info(d, registry.is_alive(d, now), now) for d in devices], next_after


def status_message(snap: dict[str, Any], devices: list[pb.DeviceInfo] | None = None,
                   next_after: str = "") -> pb.ServerStatus:
    """The Status reply: the coordinator's snapshot, and a page of devices from device_page."""
    msg = pb.ServerStatus(
        phase=snap["phase"], round=snap["round"], round_open=snap["round_open"], rounds_total=snap["rounds_total"],
        rounds_completed=snap["rounds_completed"], devices_connected=snap["devices_connected"],
        devices_known=snap["devices_known"], deadline_unix=snap["deadline_unix"],
        model_version=snap["model_version"], bytes_down_total=snap["bytes_total"]["down"],
        bytes_up_total=snap["bytes_total"]["up"], server_version=fedcore.__version__,
        participants=[pb.Participant(**p) for p in snap["participants"]],
        transfers=[pb.TransferProgress(device_id=t["device_id"], direction=t["direction"], round=t["round"],
                                       bytes_done=t["done"], bytes_total=t["total"], rate_bytes_per_s=t["rate_bps"],
                                       seconds=t["seconds"], active=t["active"]) for t in snap["transfers"]],
        devices=devices or [], devices_next_after=next_after)
    if snap.get("last_round"):
        last = RoundSummary.from_json(snap["last_round"])
        lr = msg.last_round
        lr.round = last.round
        lr.t_comm_s = known(last.t_comm_s) or 0.0  # null when no device's figures were known; g is unset then
        lr.t_comp_s = known(last.t_comp_s) or 0.0
        lr.bytes_down = known(last.bytes_down) or 0
        lr.bytes_up = known(last.bytes_up) or 0
        lr.participants.extend(last.participants)
        for value, dst in ((last.g, "g"), (last.rougeL, "rouge_l"), (last.eval_loss, "eval_loss")):
            if known(value) is not None:
                setattr(lr, dst, value)
    return msg


@dataclass
class StatusConfig:
    """Where `fedserver status` dials and how it proves it is an operator (TOML via --config, or flags)."""
    server: str = field(default="127.0.0.1:50051", metadata=described("server address host:port"))
    tls_ca: Path | None = field(default=None, metadata=described("CA that signed the server certificate (PEM)"))
    tls_cert: Path | None = field(default=None, metadata=described(
        "operator certificate (PEM) from `fedserver certs --admins NAME`: OUT/NAME.pem"))
    tls_key: Path | None = field(default=None, metadata=described("operator private key (PEM): OUT/NAME.key"))
    tls_server_name: str = field(default="", metadata=described(
        "name to check the server certificate against (default: the host in server)"))
    insecure: bool = field(default=False, metadata=described("plaintext gRPC, for servers started with insecure"))

    def validate(self) -> None:
        if ":" not in self.server:
            raise ValueError(f"server must be host:port, got {self.server!r}")
        if not self.insecure and self.tls_cert is None:
            raise ValueError("no operator certificate: pass --tls-ca, --tls-cert and --tls-key (from `fedserver "
                             "certs --admins NAME`), or --insecure for a plaintext server")
        self.security().validate()

    def security(self) -> ClientSecurity:
        return ClientSecurity(self.tls_ca, self.tls_cert, self.tls_key, "", self.tls_server_name, self.insecure)


def status_channel(address: str, security: ClientSecurity) -> grpc.Channel:
    """The one place `fedserver status` builds its channel: the same open_channel every client uses."""
    return open_channel(address, security)


def fetch_status(address: str, security: ClientSecurity, timeout: float = 10.0, page_size: int = 0,
                 after: str = "") -> pb.ServerStatus:
    """The server's status, with up to `page_size` devices whose ids sort after `after` (0: no list)."""
    check_page(page_size, after)
    with status_channel(address, security) as channel:
        return pbg.FederationStub(channel).Status(
            pb.StatusRequest(devices_page_size=page_size, devices_after=after), timeout=timeout)


def fetch_all_devices(address: str, security: ClientSecurity, timeout: float = 10.0,
                      page_size: int = MAX_DEVICES_PAGE, after: str = "") -> Iterator[pb.ServerStatus]:
    """Status replies page after page over one channel, following the cursor until the last page."""
    check_page(page_size, after)
    if page_size == 0:
        raise ValueError("devices page size must be at least 1 to list every device")
    with status_channel(address, security) as channel:
        stub = pbg.FederationStub(channel)
        while True:
            msg = stub.Status(pb.StatusRequest(devices_page_size=page_size, devices_after=after), timeout=timeout)
            yield msg
            if not msg.devices_next_after or msg.devices_next_after <= after:
                return  # the last page (or a server that would send us round in circles)
            after = msg.devices_next_after


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render_devices(devices: list[pb.DeviceInfo]) -> list[str]:
    """A table of devices: id, alive or gone, last heard from, samples, accelerator, measured rates."""
    width = max([14] + [len(d.device_id) for d in devices])
    head = f"{'device':<{width}} {'state':<5} {'last seen':>14} {'samples':>8} {'accelerator':<12} " \
           f"{'down MB/s':>9} {'up MB/s':>8} {'step s':>7}"
    lines = [head, "-" * len(head)]
    for d in devices:
        seen = _ago(d.seconds_since_seen) if d.HasField("seconds_since_seen") else "before restart"
        down = f"{d.down_bytes_per_s / 1e6:.2f}" if d.HasField("down_bytes_per_s") else "-"
        up = f"{d.up_bytes_per_s / 1e6:.2f}" if d.HasField("up_bytes_per_s") else "-"
        step = f"{d.step_s:.3f}" if d.HasField("step_s") else "-"
        lines.append(f"{d.device_id:<{width}} {'alive' if d.alive else 'gone':<5} {seen:>14} {d.num_samples:>8} "
                     f"{d.accelerator or '?':<12} {down:>9} {up:>8} {step:>7}")
    return lines


def render_status(s: pb.ServerStatus, address: str, now: float | None = None,
                  next_command: str = "fedserver status --devices", after: str | None = None) -> str:
    """What `fedserver status` prints; with a page of devices, their table and the command for the next
    page (`next_command` plus `--after ID`). `after`: the cursor the devices were asked with (None: no
    devices were asked for), to say so when the page is empty."""
    now = time.time() if now is None else now
    lines = [f"server {address} (fedtune {s.server_version}), model {s.model_version[:19]}",
             f"phase: {s.phase}; round {s.round} of {s.rounds_total} ({'open' if s.round_open else 'closed'}), "
             f"{s.rounds_completed} completed",
             f"devices: {s.devices_connected} connected, {s.devices_known} known"]
    if s.round_open and s.deadline_unix:
        lines[-1] += f"; round deadline in {max(0.0, s.deadline_unix - now):.0f} s"
    if s.participants:
        lines.append("participants: " + ", ".join(
            f"{p.device_id} ({p.status}{', reported' if p.reported else ''})" for p in s.participants))
    if s.transfers:
        head = f"{'device':<14} {'dir':<4} {'round':>5} {'MB done':>9} {'MB total':>9} {'%':>6} {'MB/s':>8} " \
               f"{'s':>7}  state"
        lines += ["transfers:", head, "-" * len(head)]
        for t in s.transfers:
            pct = f"{100 * t.bytes_done / t.bytes_total:.1f}" if t.bytes_total else "-"
            total = _mb(t.bytes_total) if t.bytes_total else "?"
            lines.append(f"{t.device_id:<14} {t.direction:<4} {t.round:>5} {_mb(t.bytes_done):>9} {total:>9} "
                         f"{pct:>6} {t.rate_bytes_per_s / 1e6:>8.2f} {t.seconds:>7.2f}  "
                         f"{'running' if t.active else 'done'}")
    else:
        lines.append("transfers: none this round")
    lines.append(f"bytes this process: {_mb(s.bytes_down_total)} MB down, {_mb(s.bytes_up_total)} MB up")
    if s.HasField("last_round"):
        lr = s.last_round
        g = f"{lr.g:.3f}" if lr.HasField("g") else "-"
        rouge = f", ROUGE-L {lr.rouge_l:.2f}" if lr.HasField("rouge_l") else ""
        lines.append(f"last round {lr.round}: G {g}, T_comm {lr.t_comm_s:.2f} s, T_comp {lr.t_comp_s:.2f} s, "
                     f"{_mb(lr.bytes_down)} MB down, {_mb(lr.bytes_up)} MB up{rouge} "
                     f"({', '.join(lr.participants)})")
    else:
        lines.append("last round: none completed yet")
    if s.devices:
        first, last = s.devices[0].device_id, s.devices[-1].device_id
        lines.append(f"devices {first} to {last} ({len(s.devices)} of {s.devices_known} known, by id):")
        lines += render_devices(list(s.devices))
        if s.devices_next_after:
            lines.append(f"next page: {next_command} --after {s.devices_next_after}")
    elif after:
        lines.append(f"devices: none after {after}")
    elif after is not None:
        lines.append("devices: none known" if not s.devices_known else
                     f"devices: none listed (fedtune {s.server_version} on the server may not list devices)")
    return "\n".join(lines)

"""`fedserver status`: the Status RPC's message from a coordinator snapshot, and the client that prints it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

import fedcore
from fedcore.channel import ClientSecurity, open_channel
from fedcore.config import described
from fedcore.records import RoundSummary, known
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg


def status_message(snap: dict[str, Any]) -> pb.ServerStatus:
    msg = pb.ServerStatus(
        phase=snap["phase"], round=snap["round"], round_open=snap["round_open"], rounds_total=snap["rounds_total"],
        rounds_completed=snap["rounds_completed"], devices_connected=snap["devices_connected"],
        devices_known=snap["devices_known"], deadline_unix=snap["deadline_unix"],
        model_version=snap["model_version"], bytes_down_total=snap["bytes_total"]["down"],
        bytes_up_total=snap["bytes_total"]["up"], server_version=fedcore.__version__,
        participants=[pb.Participant(**p) for p in snap["participants"]],
        transfers=[pb.TransferProgress(device_id=t["device_id"], direction=t["direction"], round=t["round"],
                                       bytes_done=t["done"], bytes_total=t["total"], rate_bytes_per_s=t["rate_bps"],
                                       seconds=t["seconds"], active=t["active"]) for t in snap["transfers"]])
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


def fetch_status(address: str, security: ClientSecurity, timeout: float = 10.0) -> pb.ServerStatus:
    with status_channel(address, security) as channel:
        return pbg.FederationStub(channel).Status(pb.StatusRequest(), timeout=timeout)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def render_status(s: pb.ServerStatus, address: str, now: float | None = None) -> str:
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
    return "\n".join(lines)

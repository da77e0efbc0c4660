"""The device daemon's own figures and its Prometheus metrics."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcore.metrics import DEVICE_FIGURES, Registry
from fedcore.records import device_figure

P = "fedtune_client_"


@dataclass
class DeviceStats:
    """Running totals and the last round, written by the daemon's loop, read at scrape time."""

    connected: bool = False
    round: int = 0  # the round being worked on, or the last one
    rounds_completed: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # t_down_s, t_up_s, t_wait_s, t_comp_s, extra, ...

    def finish_round(self, record: dict[str, Any]) -> None:
        self.rounds_completed += 1
        self.bytes_down += record.get("bytes_down", 0)
        self.bytes_up += record.get("bytes_up", 0)
        self.last = record


def client_registry(stats: DeviceStats, device_id: str) -> Registry:
    reg = Registry()
    dev = {"device": device_id}
    rounds = reg.counter(P + "rounds_completed_total", "rounds this daemon trained and uploaded")
    bytes_ = reg.counter(P + "bytes_total", "model bytes on the wire, by direction")
    connected = reg.gauge(P + "connected", "1 while joined to the server")
    current = reg.gauge(P + "current_round", "the round being worked on, or the last one")
    last_round = reg.gauge(P + "last_round", "the last round this daemon completed")
    t_comm = reg.gauge(P + "last_round_t_comm_seconds", "download + upload + server ack in the last round")
    t_comp = reg.gauge(P + "last_round_t_comp_seconds", "local fine-tuning time in the last round")
    t_down = reg.gauge(P + "last_round_t_down_seconds", "download time in the last round (0 when cached)")
    t_up = reg.gauge(P + "last_round_t_up_seconds", "upload time in the last round")
    g = reg.gauge(P + "last_round_g", "G = T_comp / T_comm of this device in the last round")
    figures = {key: reg.gauge(P + suffix, text) for key, (suffix, text) in DEVICE_FIGURES.items()}

    def collect() -> None:
        rounds.set(stats.rounds_completed, **dev)
        bytes_.set(stats.bytes_down, direction="down", **dev)
        bytes_.set(stats.bytes_up, direction="up", **dev)
        connected.set(int(stats.connected), **dev)
        current.set(stats.round, **dev)
        last = stats.last
        last_round.set(last.get("round"), **dev)
        comm = (last["t_down_s"] + last["t_up_s"] + last["t_wait_s"]) if "t_comp_s" in last else None
        t_comm.set(comm, **dev)
        t_comp.set(last.get("t_comp_s"), **dev)
        t_down.set(last.get("t_down_s"), **dev)
        t_up.set(last.get("t_up_s"), **dev)
        g.set(last["t_comp_s"] / comm if comm else None, **dev)
        for key, fam in figures.items():
            fam.set(device_figure(last, key), **dev)

    reg.collector(collect)
    return reg

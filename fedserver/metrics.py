"""The server's Prometheus metrics, read from a coordinator snapshot at every scrape."""
from __future__ import annotations

from fedcore.metrics import DEVICE_FIGURES, Registry, set_optional
from fedcore.records import DeviceRound, RoundSummary, known

from .rounds import Coordinator

P = "fedtune_server_"


def server_registry(coord: Coordinator) -> Registry:
    reg = Registry()
    rounds_done = reg.counter(P + "rounds_completed_total", "rounds aggregated by this server process")
    current = reg.gauge(P + "current_round", "the open round, or the last one when none is open")
    completed = reg.gauge(P + "rounds_completed", "rounds of this run completed (survives restarts)")
    total = reg.gauge(P + "rounds_total", "rounds this run is configured for")
    open_ = reg.gauge(P + "round_open", "1 while a round is collecting updates")
    bytes_ = reg.counter(P + "bytes_total", "model bytes on the wire by this process, by direction "
                                            "(down: sent to devices, up: verified from devices)")
    devices = reg.gauge(P + "devices_connected", "devices heard from within liveness_s")
    devices_known = reg.gauge(P + "devices_known", "devices that joined this server")
    polls = reg.gauge(P + "polls_waiting", "GetTask calls held open until there is work (each holds no thread)")
    in_flight = reg.gauge(P + "transfers_in_flight", "model transfers streaming now, by direction")
    t_comm = reg.gauge(P + "last_round_t_comm_seconds", "T_comm of the last round (slowest device)")
    t_comp = reg.gauge(P + "last_round_t_comp_seconds", "T_comp of the last round (slowest device)")
    g = reg.gauge(P + "last_round_g", "G = T_comp / T_comm of the last round")
    rouge = reg.gauge(P + "last_round_rouge_l", "ROUGE-L of the global model after the last round")
    last_bytes = reg.gauge(P + "last_round_bytes", "wire bytes of the last round over its devices, by direction")
    dev_comm = reg.gauge(P + "device_t_comm_seconds", "each device's T_comm in the last round")
    dev_comp = reg.gauge(P + "device_t_comp_seconds", "each device's T_comp in the last round")
    figures = {key: reg.gauge(P + "device_" + suffix, text) for key, (suffix, text) in DEVICE_FIGURES.items()}

    def collect() -> None:
        snap = coord.snapshot()
        rounds_done.set(snap["rounds_completed_here"])
        current.set(snap["round"])
        completed.set(snap["rounds_completed"])
        total.set(snap["rounds_total"])
        open_.set(int(snap["round_open"]))
        devices.set(snap["devices_connected"])
        devices_known.set(snap["devices_known"])
        polls.set(snap["polls_waiting"])
        for direction, n in snap["bytes_total"].items():
            bytes_.set(n, direction=direction)
        for direction, n in snap["transfers_in_flight"].items():
            in_flight.set(n, direction=direction)
        last = RoundSummary.from_json(snap["last_round"] or {})
        t_comm.set(known(last.t_comm_s))
        t_comp.set(known(last.t_comp_s))
        g.set(known(last.g))
        rouge.set(known(last.rougeL))
        last_bytes.set(known(last.bytes_down), direction="down")
        last_bytes.set(known(last.bytes_up), direction="up")
        recs = [r for r in map(DeviceRound.from_json, snap["last_records"]) if r.aggregated]
        set_optional(dev_comm, [({"device": r.client}, known(r.t_comm_s)) for r in recs])
        set_optional(dev_comp, [({"device": r.client}, known(r.t_comp_s)) for r in recs])
        for key, fam in figures.items():
            set_optional(fam, [({"device": r.client}, r.figure(key)) for r in recs])

    reg.collector(collect)
    return reg

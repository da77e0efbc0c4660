"""Disturbed runs next to undisturbed ones: kill -9 of a daemon and of the server, link drops.

    python -m bench.resilience crash [--out DIR]      # no root needed
    python -m bench.resilience linkdown [--out DIR]   # root: a netem topology

`crash` runs the same tiny federation twice with the same participants (every
device sampled every round): once undisturbed, once with a daemon killed
(SIGKILL) mid-upload in round 1 and restarted, and the server killed mid-round
2 and restarted. It prints each run's round log and final model digest.

`linkdown` puts one device behind a slow link, takes the link down for 10 s
during its download and again during its upload (`ip link set eth0 down`
inside the device namespace), and prints what each transfer re-sent.
Figures only: it never fails on a time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlab.simulate import Fleet, Launcher, SimulateConfig, run
from fedserver.storage import RoundLog

Echo = Callable[[str], None]


def crash_config(out: Path) -> SimulateConfig:
    # Every device sampled every round: the disturbed run has the same participants by construction.
    # Uploads capped at 8 Mbit/s (~3.5 s for the tiny model): over loopback the whole update would sit in
    # socket buffers within milliseconds, and a kill could not land mid-upload.
    return SimulateConfig.of(out=out, preset="tiny", base="random", rounds=2, devices=3, devices_per_round=3, local_steps=2,
                          batch_size=8, max_input_tokens=128, max_target_tokens=32, data_size=60, eval_size=0,
                          round_deadline_s=300, chunk_elems=16384, stall_timeout_s=20, max_upload_mbit=8)


def wait_for(what: str, cond: Callable[[], bool], timeout: float, poll: float = 0.005) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(poll)


def _log(fleet: Fleet, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(fleet.logs.glob(f"{name}*.log")))


def _summaries(out: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((out / "summary.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


@dataclass
class RunResult:
    out: Path
    code: int
    digest: str
    rounds: list[int]  # summary rounds, in order
    aggregated: list[tuple[int, str]]  # (round, client) of aggregated records, in log order
    notes: list[str]


def result_of(out: Path, code: int, notes: list[str]) -> RunResult:
    summaries = _summaries(out)
    recs = RoundLog(out / "rounds.jsonl").read()
    return RunResult(out, code, summaries[-1]["version"] if summaries else "", [s["round"] for s in summaries],
                     [(r["round"], r["client"]) for r in recs if r["status"] == "aggregated"], notes)


def undisturbed(cfg: SimulateConfig) -> RunResult:
    lines: list[str] = []
    code = run(cfg, echo=lines.append)
    return result_of(Path(cfg.out), code, [])


def disturbed(cfg: SimulateConfig, victim: int = 1, echo: Echo = print, timeout: float = 900) -> RunResult:
    """kill -9 daemon `victim` mid-upload in round 1 (then restart it); kill -9 the server mid-round 2 (restart)."""
    fleet = Fleet(cfg)
    out, name = Path(cfg.out), f"dev-{victim:02d}"
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        echo(f"  {text}")

    fleet.start_server()
    for i in range(cfg.devices):
        fleet.start_device(i)
    try:
        pending = out / "devices" / name / "upload" / "meta.json"
        staged = out / "staging" / "round-000001"

        def server_holds_a_chunk() -> bool:
            # The staged file is preallocated with zeros; the first chunk lands at its start.
            files = list(staged.glob(f"{name}-*.bin")) if pending.exists() else []
            try:
                return any(f.open("rb").read(4096).strip(b"\0") for f in files)
            except OSError:
                return False
        wait_for(f"{name}'s round-1 upload to be under way", server_holds_a_chunk, timeout, poll=0.01)
        fleet.kill9(name)
        complete = f"update from {name} verified" in _log(fleet, "server")
        note(f"kill -9 {name} during its round-1 upload (update complete at the server before the kill: {complete})")
        time.sleep(1.0)
        fleet.start_device(victim)
        note(f"restarted {name}")
        wait_for("round 1 to finish", lambda: len(_summaries(out)) >= 2, timeout, poll=0.2)
        wait_for("round 2 uploads to start", lambda: "round 2: update from" in _log(fleet, "server"), timeout,
                 poll=0.02)
        fleet.kill9("server")
        note("kill -9 server mid-round 2 (after its first round-2 update arrived)")
        time.sleep(2.0)
        fleet.start_server()
        note("restarted server")
        server = fleet.proc("server")
        server.wait(timeout)
        code = server.returncode
    finally:
        fleet.stop(wait_s=15.0)
    log = _log(fleet, "server") + _log(fleet, name)
    for key in ("resuming the upload of task", "resumes at tensor", "resumed from checkpoint of round",
                "joined"):
        hits = [line for line in log.splitlines() if key in line]
        if hits and key != "joined":
            note(f"log: {hits[0].strip()}")
    return result_of(out, code, notes)


def print_run(title: str, r: RunResult, echo: Echo) -> None:
    echo(f"{title}: exit {r.code}, summary rounds {r.rounds}, final model {r.digest[:23]}")
    by_round: dict[int, list[str]] = {}
    for rnd, client in r.aggregated:
        by_round.setdefault(rnd, []).append(client)
    for rnd in sorted(by_round):
        echo(f"  round {rnd}: aggregated {', '.join(by_round[rnd])}")


def cmd_crash(args: argparse.Namespace, echo: Echo = print) -> int:
    base = Path(args.out)
    cfg = crash_config(base / "undisturbed")
    echo(f"tiny preset, {cfg.server.rounds} rounds, {cfg.devices} devices all sampled every round, fp32, fedavg")
    a = undisturbed(cfg)
    print_run("undisturbed", a, echo)
    echo("disturbed run:")
    b = disturbed(replace(cfg, out=base / "disturbed"), echo=echo)
    print_run("disturbed", b, echo)
    echo(f"final model digests equal: {a.digest == b.digest}")
    return 0 if a.code == 0 and b.code == 0 else 1


# ------------------------------------------------------------------ link down
def linkdown_config(out: Path) -> SimulateConfig:
    # 4 and 2 Mbit/s: the 3.5 MB tiny model takes ~7 s down and ~14 s up, long enough to cut the link mid-way.
    return SimulateConfig.of(out=out, preset="tiny", base="random", rounds=1, devices=1, devices_per_round=1, local_steps=1,
                          batch_size=8, max_input_tokens=128, max_target_tokens=32, data_size=20, eval_size=2,
                          round_deadline_s=300, stall_timeout_s=4, link="custom:down=4,up=2")


def link_down(ns: str, seconds: float, echo: Echo) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "down"], check=True)
    echo(f"  {time.strftime('%H:%M:%S')} link eth0 in {ns} down")
    time.sleep(seconds)
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"], check=True)
    echo(f"  {time.strftime('%H:%M:%S')} link eth0 in {ns} up")


def linkdown(cfg: SimulateConfig, echo: Echo = print, outage_s: float = 10.0, timeout: float = 900) -> dict[str, Any]:
    """Run cfg (one device) in a topology, cutting the link during the download and during the upload."""
    from fedlab.runner import SERVER_PORT, link_profiles
    from netem.topology import Topology, require_namespaces

    require_namespaces()
    assert cfg.link
    out = Path(cfg.out)
    with Topology(link_profiles(cfg.link, cfg.devices)) as topo:
        launcher = Launcher(server_host=topo.server_ip, listen_host="0.0.0.0", port=SERVER_PORT,
                            wrap_server=lambda argv: topo.exec_argv(topo.server_ns, argv),
                            wrap_device=lambda i, argv: topo.exec_argv(topo.devices[i].ns, argv))
        fleet = Fleet(cfg, launcher)
        fleet.start_server()
        fleet.start_device(0)
        ns = topo.devices[0].ns
        state = out / "devices" / "dev-00"
        try:
            def downloading() -> bool:
                return any(p.stat().st_size > 0 for p in (state / "download").glob("*/chunks.log"))
            wait_for("the download to start", downloading, timeout, poll=0.05)
            echo("during the download:")
            link_down(ns, outage_s, echo)
            wait_for("the upload to start", lambda: any((out / "staging").glob("round-*/dev-00-*.bin")), timeout,
                     poll=0.05)
            time.sleep(1.0)  # some chunks through, so the drop is mid-stream
            echo("during the upload:")
            link_down(ns, outage_s, echo)
            server = fleet.proc("server")
            server.wait(timeout)
            code = server.returncode
        finally:
            fleet.stop(wait_s=10.0)
    recs = RoundLog(out / "rounds.jsonl").read()
    rec = next(r for r in recs if r["client"] == "dev-00")
    dev_log = _log(fleet, "dev-00")
    return {"code": code, "record": rec, "chunk_bytes": cfg.server.chunk_elems * 4,
            "breaks": [line.split("fedclient.transfer: ")[-1] for line in dev_log.splitlines()
                       if "broke" in line],
            "transfers": [line.split("fedclient: ")[-1] for line in dev_log.splitlines()
                          if "downloaded" in line or "uploaded" in line]}


def cmd_linkdown(args: argparse.Namespace, echo: Echo = print) -> int:
    cfg = linkdown_config(Path(args.out) / "linkdown")
    echo(f"tiny preset, 1 device behind {cfg.link} (Mbit/s), chunks of {cfg.server.chunk_elems} elements "
         f"({cfg.server.chunk_elems * 4 / 2**20:.2f} MiB at fp32), stall timeout {cfg.client.stall_timeout_s:g} s")
    r = linkdown(cfg, echo)
    rec = r["record"]
    for line in r["breaks"] + r["transfers"]:
        echo(f"  device: {line}")
    echo(f"round status {rec['status']}; download {rec['bytes_down'] / 1e6:.2f} MB in {rec['t_down_s']:.1f} s, "
         f"upload {rec['bytes_up'] / 1e6:.2f} MB in {rec['t_up_s']:.1f} s")
    echo(f"bytes re-sent: download {rec['bytes_resent_down']} (server count), upload {rec['bytes_resent_up']} "
         f"(device count); one chunk is {r['chunk_bytes']} bytes")
    return r["code"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.resilience", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, func in (("crash", cmd_crash), ("linkdown", cmd_linkdown)):
        p = sub.add_parser(name)
        p.add_argument("--out", default="runs/resilience")
        p.set_defaults(func=func)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""A real run: `fedserver status`, both /metrics endpoints and `fedserver report` agree with the round log."""
from __future__ import annotations

import re
import urllib.request

import pytest

from fedserver.metrics import server_registry
from fedlab.report import load_run, write_report
from fedlab.simulate import free_port
from fedserver.status import fetch_status, render_status
from fedserver.storage import RoundLog

from fedcore.channel import open_channel
from fedhelpers import fleet_of, start_daemon, start_server, stop, tiny_server_config

pytestmark = pytest.mark.slow


def _sample(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"no sample {name} in\n{text}"
    return float(m.group(1))


def test_status_metrics_and_report_of_a_two_round_run(tmp_path):
    srv = start_server(tiny_server_config(tmp_path / "srv", rounds=2, devices_per_round=2, min_updates=2))
    mport = free_port()
    daemons = [start_daemon(srv.address, "dev-a", tmp_path / "a.log", "--stay-after-shutdown",
                            "--metrics-listen", f"127.0.0.1:{mport}", fleet=srv.fleet),
               start_daemon(srv.address, "dev-b", tmp_path / "b.log", fleet=srv.fleet)]
    try:
        assert srv.wait(600), "the rounds did not finish"
        records = RoundLog(tmp_path / "srv" / "rounds.jsonl").read()
        assert len(records) == 4 and all(r["status"] == "aggregated" for r in records)

        st = fetch_status(srv.address, srv.fleet.admin_security())
        assert (st.phase, st.round, st.rounds_completed, st.rounds_total) == ("finished", 2, 2, 2)
        assert {p.device_id for p in st.participants} == {"dev-a", "dev-b"}
        assert all(p.status == "aggregated" and p.reported for p in st.participants)
        # Every byte the devices say they moved, the server counted itself.
        assert st.bytes_down_total == sum(r["bytes_down"] for r in records)
        assert st.bytes_up_total == sum(r["bytes_up"] for r in records)
        last = [r for r in records if r["round"] == 2]
        assert st.last_round.round == 2 and st.last_round.HasField("g")
        assert st.last_round.t_comm_s == pytest.approx(max(r["t_comm_s"] for r in last))
        assert st.last_round.t_comp_s == pytest.approx(max(r["t_comp_s"] for r in last))
        # The round's transfers, one each way per device, complete and with a rate.
        transfers = {(t.device_id, t.direction): t for t in st.transfers}
        assert set(transfers) == {(d, x) for d in ("dev-a", "dev-b") for x in ("down", "up")}
        for (dev, direction), t in transfers.items():
            assert t.round == 2 and not t.active and t.bytes_total > 0 and t.bytes_done == t.bytes_total
            rec = next(r for r in last if r["client"] == dev)
            assert t.bytes_done == rec["bytes_down" if direction == "down" else "bytes_up"]
            assert t.rate_bytes_per_s > 0
        text = render_status(st, srv.address)
        assert "phase: finished; round 2 of 2" in text and "last round 2: G " in text

        server_text = server_registry(srv.coord).render()
        assert _sample(server_text, "fedtune_server_rounds_completed_total") == 2
        assert _sample(server_text, 'fedtune_server_bytes_total{direction="up"}') == st.bytes_up_total
        assert _sample(server_text, "fedtune_server_last_round_g") == pytest.approx(st.last_round.g)

        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=60) as r:
            dev_text = r.read().decode()
        mine = [r for r in records if r["client"] == "dev-a"]
        assert _sample(dev_text, 'fedtune_client_rounds_completed_total{device="dev-a"}') == 2
        assert _sample(dev_text, 'fedtune_client_bytes_total{device="dev-a",direction="up"}') == \
            sum(r["bytes_up"] for r in mine)
        assert _sample(dev_text, 'fedtune_client_last_round_t_comp_seconds{device="dev-a"}') == \
            pytest.approx(mine[-1]["t_comp_s"])
    finally:
        stop(daemons)
        srv.close()

    out = tmp_path / "report"
    text = write_report(tmp_path / "srv", out)
    for name in ("timeline", "g", "rouge", "bytes"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    md = (out / "report.md").read_text()
    assert md in text
    run = load_run(tmp_path / "srv")
    assert [s["round"] for s in run.summaries] == [0, 1, 2]
    # One table row per round (0..2) and per device, with the logged figures.
    for rnd in (1, 2):
        s = run.summaries[rnd]
        assert re.search(rf"^\|\s+{rnd} \|\s+2 \|\s+{s['t_comp_s']:.2f} \|\s+{s['t_comm_s']:.2f} \|", md, re.M), md
    for dev in ("dev-a", "dev-b"):
        assert re.search(rf"^\| {dev}\s+\| not emulated\s+\|\s+2 \|", md, re.M), md


def test_health_says_not_serving_once_the_run_is_finished(tmp_path):
    """While the server lingers to tell devices the run ended, health checks already say NOT_SERVING."""
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedcore.config import to_dict
    from fedlab.simulate import write_toml
    from fedtune.v1 import fedtune_pb2 as pb
    from fedtune.v1 import fedtune_pb2_grpc as pbg

    port = free_port()
    # poll_seconds bounds how long the finished server waits for a device that never polls again.
    # A few local steps, each stretched by the device's --compute-slowdown below, keep the round open
    # for several Status polls yet well inside the round deadline (a round that overran it would be
    # retried and the test would wait on the retry instead).
    cfg = tiny_server_config(tmp_path / "srv", listen=f"127.0.0.1:{port}", poll_seconds=20, local_steps=8)
    write_toml(tmp_path / "server.toml", to_dict(cfg))
    log = tmp_path / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "fedserver", "run", "--config", str(tmp_path / "server.toml")],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    fleet = fleet_of(cfg)
    daemon = None
    # The operator asks for status and health; the silent device joins with its own certificate.
    channel = open_channel(f"127.0.0.1:{port}", fleet.admin_security())
    silent_channel = open_channel(f"127.0.0.1:{port}", fleet.security("silent"))
    health = health_pb2_grpc.HealthStub(channel)
    fed = pbg.FederationStub(channel)
    try:
        seen = []
        joined_silent = False
        while server.poll() is None:
            try:
                st = fed.Status(pb.StatusRequest(), timeout=30)
                h = health.Check(health_pb2.HealthCheckRequest(service="fedtune.v1.Federation"), timeout=30)
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            seen.append((st.phase, health_pb2.HealthCheckResponse.ServingStatus.Name(h.status)))
            if daemon is None:
                # Only now that this channel is connected: a daemon that joins at once could finish the
                # round while this channel still sits in gRPC's reconnect backoff. The emulated slowdown
                # keeps the round open long enough for the polls below to see it.
                daemon = start_daemon(f"127.0.0.1:{port}", "dev-a", tmp_path / "a.log", "--compute-slowdown", "20",
                                      fleet=fleet)
            if st.round_open and not joined_silent:
                # A second device joins once dev-a holds the round's only task, then never polls:
                # the finished server waits a poll period for it before exiting.
                pbg.FederationStub(silent_channel).Join(pb.JoinRequest(device_id="silent", num_samples=1),
                                                        timeout=30)
                joined_silent = True
            if seen[-1] == ("finished", "NOT_SERVING"):
                break
            time.sleep(0.2)
        # A tiny round can open and close between two polls, so which busy phase was seen varies;
        # what matters is SERVING while the run is live and NOT_SERVING once it is finished.
        assert any(h == "SERVING" and phase != "finished" for phase, h in seen), seen
        assert seen[-1] == ("finished", "NOT_SERVING"), (seen, log.read_text()[-2000:])
        assert server.wait(600) == 0, log.read_text()[-2000:]
    finally:
        channel.close()
        silent_channel.close()
        stop([p for p in (daemon, server) if p is not None])

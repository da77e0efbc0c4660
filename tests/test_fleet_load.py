"""The load benchmark's core against a real `fedserver run` process, with a fleet small enough for a test."""
from __future__ import annotations

from pathlib import Path

from bench.fleet_load import FleetSettings, run_fleet, table


def test_small_fleet_joins_gets_its_tasks_and_completes_the_round(tmp_path: Path) -> None:
    s = FleetSettings(devices=20, rounds=1, devices_per_round=5, round_deadline_s=20.0, poll_seconds=2,
                      procs=2, devices_per_channel=5, timeout_s=50.0)
    r = run_fleet(s, workdir=tmp_path)
    assert r.joined == 20, table([r])
    assert not r.join_refused and not r.poll_refused and not r.transfer_failed, table([r])
    # Every device the server's log says it sampled received its TRAIN task and its update arrived.
    assert r.sampled == 5 and r.handed_out == 5 and r.uploaded == 5, table([r])
    assert r.rounds_completed == 1 and r.server_exit == 0 and not r.timed_out, table([r])
    assert r.shutdown_seen == 20, table([r])
    assert r.server_peak_rss_mb > 0 and r.server_cpu_s > 0

"""kill -9 of daemons and of the server: the run finishes, the log has each round once, the model is the same."""
from __future__ import annotations

from dataclasses import replace

import pytest

from bench.resilience import crash_config, disturbed, undisturbed, wait_for
from fedlab.simulate import Fleet, SimulateConfig
from fedserver.storage import RoundLog

pytestmark = pytest.mark.slow


def test_kill9_daemon_mid_upload_and_server_mid_round_gives_the_undisturbed_model(tmp_path):
    cfg = crash_config(tmp_path / "undisturbed")
    a = undisturbed(cfg)
    b = disturbed(replace(cfg, out=tmp_path / "disturbed"), echo=lambda _line: None)
    assert a.code == 0 and b.code == 0, b.notes
    for r in (a, b):
        assert r.rounds == [0, 1, 2], "every round once in summary.json"
        assert sorted(r.aggregated) == sorted({(n, f"dev-{i:02d}") for n in (1, 2) for i in range(3)}), \
            "each device's update aggregated exactly once per round, no round missing"
    log = "\n".join(b.notes)
    assert "resuming the upload of task" in log, "the restarted daemon delivered the update it had on disk"
    assert "resumes at tensor" in log, "...from where the server's staged copy ended, not from the start"
    assert "resumed from checkpoint of round 1" in log
    assert a.digest == b.digest, "the disturbed run ends with the undisturbed run's model"


def test_killed_daemon_that_stays_dead_does_not_hold_the_round(tmp_path):
    cfg = SimulateConfig.of(out=tmp_path / "run", preset="tiny", base="random", rounds=1, devices=2, devices_per_round=2, local_steps=1,
                         batch_size=8, max_input_tokens=128, max_target_tokens=32, data_size=40, eval_size=0,
                         round_deadline_s=30)
    fleet = Fleet(cfg)
    # min_updates 1: the round may close with one update once the deadline passes.
    text = (fleet.out / "server.toml").read_text().replace("min_updates = 2", "min_updates = 1")
    (fleet.out / "server.toml").write_text(text)
    fleet.start_server()
    for i in range(2):
        fleet.start_device(i)
    try:
        wait_for("dev-01's task", lambda: "round 1: task" in (fleet.logs / "dev-01.log").read_text(), 180, poll=0.05)
        fleet.kill9("dev-01")
        assert fleet.proc("server").wait(180) == 0, "the round closed at its deadline without the dead device"
    finally:
        fleet.stop(wait_s=5)
    recs = {r["client"]: r["status"] for r in RoundLog(cfg.out / "rounds.jsonl").read()}
    assert recs == {"dev-00": "aggregated", "dev-01": "missing"}

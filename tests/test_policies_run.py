"""Round policy 'time' on two devices of different (emulated) speed: the slow one is given less work."""
from __future__ import annotations

import json

import pytest

from fedlab.simulate import SimulateConfig, run
from fedserver.storage import RoundLog
from fedlab.policies import load, render

pytestmark = pytest.mark.slow


def test_time_policy_gives_the_slow_device_fewer_steps_and_records_idle_ratios(tmp_path):
    cfg = SimulateConfig.of(out=tmp_path / "time", preset="tiny", base="random", rounds=2, devices=2, devices_per_round=2, local_steps=4,
                         batch_size=8, max_input_tokens=128, max_target_tokens=32, data_size=40, eval_size=0,
                         round_deadline_s=300, compute_slowdown=[1.0, 4.0], round_policy="time")
    lines: list[str] = []
    assert run(cfg, echo=lines.append) == 0, lines
    recs = [r for r in RoundLog(cfg.out / "rounds.jsonl").read() if r["status"] == "aggregated"]
    first = {r["client"]: r for r in recs if r["round"] == 1}
    second = {r["client"]: r for r in recs if r["round"] == 2}
    assert first["dev-00"]["local_steps_assigned"] == first["dev-01"]["local_steps_assigned"] == 4, \
        "round 1 has no measurements: every device gets local_steps"
    assert second["dev-01"]["local_steps_assigned"] < second["dev-00"]["local_steps_assigned"]
    assert second["dev-01"]["compute_slowdown_emulated"] == 4.0
    assert second["dev-01"]["extra"]["emulated_sleep_s"] > 0
    for r in recs:
        assert 0 <= r["idle_ratio"] <= 1
    summary = json.loads((cfg.out / "summary.json").read_text())["rounds"]
    assert all(s["wall_s"] > 0 for s in summary[1:])
    table = render([load(cfg.out)])
    assert "time" in table and "idle %" in table

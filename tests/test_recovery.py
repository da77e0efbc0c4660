"""Server-side durability and round planning: round log vs checkpoint, registry, policies, deadlines."""
from __future__ import annotations

import json

import pytest

from fedserver.app import build_coordinator
from fedserver.registry import Registry
from fedserver.planning import plan_work, round_deadline
from fedserver.storage import RoundLog

from fedhelpers import tiny_server_config


def test_restart_makes_the_round_log_match_the_last_checkpoint(tmp_path, one_torch_thread):
    cfg = tiny_server_config(tmp_path / "srv", eval_size=0, rounds=3)
    coord = build_coordinator(cfg)
    tensors = dict(coord.state)
    recs = [{"round": 1, "client": "a", "status": "aggregated"}]
    coord.checkpoints.save(1, tensors, {"round": "1", "round_records": json.dumps(recs),
                                        "round_summary": json.dumps({"round": 1, "version": coord.version})})
    # Crash 1: round 1 committed but its records never reached the log; round 2 left records, no checkpoint.
    RoundLog(cfg.out / "rounds.jsonl").rewrite([{"round": 2, "client": "a", "status": "missing"}])
    coord2 = build_coordinator(cfg)
    assert coord2.round_no == 1
    assert RoundLog(cfg.out / "rounds.jsonl").read() == recs, "round 1 restored, round 2 dropped"
    assert [s["round"] for s in coord2.records.summaries] == [1]
    # A second restart changes nothing: reconciliation is idempotent.
    build_coordinator(cfg)
    assert RoundLog(cfg.out / "rounds.jsonl").read() == recs


def test_registry_keeps_devices_and_estimates_but_not_sessions(tmp_path):
    reg = Registry(60.0, tmp_path / "registry.json")
    dev = reg.join("d1", 10, {"accelerator": "cpu"})
    dev.estimates.update(step_s=0.5, down_Bps=1e6)
    reg.save()
    again = Registry(60.0, tmp_path / "registry.json")
    assert again.devices["d1"].estimates == {"step_s": 0.5, "down_Bps": 1e6}
    assert again.touch("d1", dev.session_id) is None, "a session does not outlive the server process"
    assert again.alive() == [], "known devices are not sampled until they join again"
    assert again.join("d1", 10, {}).estimates["step_s"] == 0.5


EST = {  # fast device: quick link and steps; slow one: 4x slower steps, slower link
    "fast": {"down_Bps": 4e6, "up_Bps": 2e6, "bytes_down": 4e6, "bytes_up": 4e6, "step_s": 0.5, "overhead_s": 1.0},
    "slow": {"down_Bps": 1e6, "up_Bps": 0.5e6, "bytes_down": 4e6, "bytes_up": 4e6, "step_s": 2.0, "overhead_s": 1.0},
}


@pytest.mark.parametrize("policy", ["steps", "samples", "time"])
def test_round_policies_plan_local_work(tmp_path, policy):
    cfg = tiny_server_config(tmp_path, round_policy=policy, local_steps=8, batch_size=8)
    plan = plan_work(cfg, EST)
    if policy == "steps":
        assert {d: p[0] for d, p in plan.items()} == {"fast": 8, "slow": 8}
    elif policy == "samples":
        assert {d: p[1] for d, p in plan.items()} == {"fast": 64, "slow": 64}
    else:
        # Steps chosen so download + compute + upload line up: the slow device does less, the fast one more.
        steps = {d: p[0] for d, p in plan.items()}
        assert steps["fast"] > 8 > steps["slow"] >= 1
        expected = [p[2] for p in plan.values()]
        assert max(expected) - min(expected) <= max(e["step_s"] for e in EST.values())
    unmeasured = plan_work(cfg, {"fast": EST["fast"], "new": {}})
    if policy != "samples":
        assert {d: p[0] for d, p in unmeasured.items()} == {"fast": 8, "new": 8}, "first round: the default"


def test_round_deadline_scales_with_expected_times(tmp_path):
    cfg = tiny_server_config(tmp_path, round_deadline_s=3600, deadline_from_estimates=True, deadline_safety=3,
                             deadline_floor_s=60)
    assert round_deadline(cfg, [100.0, 40.0]) == 300.0
    assert round_deadline(cfg, [5.0]) == 60.0, "never below the floor"
    assert round_deadline(cfg, [5000.0]) == 3600.0, "never above round_deadline_s"
    assert round_deadline(cfg, [100.0, None]) == 3600.0, "a device never measured: the configured deadline"

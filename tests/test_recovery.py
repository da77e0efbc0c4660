"""Server-side durability: round log vs checkpoint, registry. (Round policies and deadlines: test_planning.py.)"""
from __future__ import annotations

import json

from fedserver.app import build_coordinator
from fedserver.registry import Registry
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

"""The round records alone: DeviceRound/RoundSummary JSON, records and summaries built from a hand-built
RoundState (fedserver.roundlog), and reconciliation with a checkpoint. No coordinator, no gRPC."""
from __future__ import annotations

import json

from fedcore.clock import FakeClock
from fedcore.records import ABSENT, DeviceRound, RoundSummary, device_figure
from fedserver.config import ServerConfig
from fedserver.roundlog import EvalRecord, RoundRecords, baseline_summary, reconcile_records, round_summary
from fedserver.roundstate import Assignment, RoundState

FULL = {"t_comp_s": 10.0, "t_down_s": 2.0, "t_up_s": 1.0, "t_wait_s": 0.5, "bytes_down": 1000, "bytes_up": 500,
        "tokens": 4000, "train_loss": 1.5, "download_cached": False, "step_times": {"steps": 4, "fwd": 1.0},
        "extra": {"mfu": 0.1, "power_w": None, "bytes_resent_up": 7, "compute_slowdown": 2.0},
        "power_source": "tegrastats", "hardware": "Orin"}

# What Coordinator._device_records wrote for these assignments before the records had a type (2c83197).
RECORD_A = {
    "round": 3, "attempt": 2, "client": "a", "status": "aggregated", "num_samples": 16, "num_samples_claimed": 16,
    "upload_encoding": "int8", "encoding_reason": "why", "t_comp_s": 10.0, "t_down_s": 2.0, "t_up_s": 1.0,
    "t_wait_s": 0.5, "bytes_down": 1000, "bytes_up": 500, "tokens": 4000, "train_loss": 1.5,
    "download_cached": False, "step_times": {"steps": 4, "fwd": 1.0},
    "extra": {"mfu": 0.1, "power_w": None, "bytes_resent_up": 7, "compute_slowdown": 2.0}, "t_comm_s": 3.5,
    "tokens_per_s": 400.0, "g": 10.0 / 3.5, "flops_per_token": None, "peak_flops": None, "mfu": 0.1,
    "power_w": None, "energy_j": None, "eta_e": None, "power_source": "tegrastats", "hardware": "Orin",
    "policy": "time", "local_steps_assigned": 4, "local_samples_assigned": 0, "expected_s": 12.0, "idle_ratio": 0.5,
    "done_s": 5.0, "bytes_resent_down": 11, "bytes_resent_up": 7, "bytes_resent": 18,
    "compute_slowdown_emulated": 2.0}
RECORD_B = {
    "round": 3, "attempt": 2, "client": "b", "status": "aggregated", "num_samples": 8, "num_samples_claimed": 20,
    "weight_cut": "cut", "note": "no metrics arrived: the device went away after the server acknowledged its upload",
    "bytes_up": 300, "policy": "time", "local_steps_assigned": 0, "local_samples_assigned": 0, "expected_s": None,
    "idle_ratio": 0.7, "done_s": 3.0, "bytes_resent_down": 0, "bytes_resent_up": 0, "bytes_resent": 0,
    "compute_slowdown_emulated": 1.0}
SUMMARY = {
    "round": 3, "participants": ["a", "b", "d", "f"], "sampled": 6, "t_comp_s": 10.0, "t_comm_s": 3.5,
    "g": 10.0 / 3.5, "figures_unknown": ["b", "d"], "t_down_s": 2.0, "t_up_s": 1.0, "bytes_down": 3000,
    "bytes_up": 1309, "tokens": 12000, "train_loss": 1.5, "wall_s": 10.0, "policy": "time",
    "idle_ratio_mean": 1.6 / 3, "bytes_resent": 32, "aggregate_s": 0.25, "version": "v2", "strategy": "fedavg",
    "download": "fp16/zstd + int8 deltas", "upload": "int8/none delta +EF B only", "lora": "r8", "eval_loss": 1.0,
    "rouge1": 2.0, "rouge2": 3.0, "rougeL": 4.0, "eval_n": 5}


def _config(tmp_path, **over) -> ServerConfig:
    base = dict(out=tmp_path, insecure=True, round_policy="time", download_encoding="fp16", download_codec="zstd",
                download_payload="delta", download_delta_encoding="int8", upload_encoding="int8",
                upload_codec="none", upload_payload="delta", error_feedback=True)
    return ServerConfig(**{**base, **over})


def _round() -> RoundState:
    a = [Assignment("a", "t1", num_samples=16, claimed_samples=16, status="aggregated", metrics=FULL, bytes_in=500,
                    local_steps=4, expected_s=12.0, done_at=105.0, upload_encoding="int8", encoding_reason="why"),
         Assignment("b", "t2", num_samples=8, claimed_samples=20, weight_cut="cut", status="aggregated", metrics={},
                    bytes_in=300, done_at=103.0),
         Assignment("c", "t3", status="refused", reason="bad", metrics=dict(FULL, bytes_up=0), bytes_in=9),
         Assignment("d", "t4", status="aggregated", metrics=dict(FULL, bytes_up=0, t_comp_s=0.0), bytes_in=9,
                    done_at=101.0),
         Assignment("e", "t5", status="late"),
         Assignment("f", "t6", status="aggregated", metrics=dict(FULL, extra={}, power_source="", hardware=""),
                    bytes_in=500, done_at=108.0, local_samples=64)]
    return RoundState(number=3, attempt=2, version="v1", started=100.0, deadline=200.0,
                      assignments={x.device_id: x for x in a}, mean=None, collected_at=110.0)  # type: ignore[arg-type]


def test_device_records_and_summary_are_what_the_coordinator_wrote(tmp_path):
    cur, cfg = _round(), _config(tmp_path)
    book = RoundRecords(tmp_path, cfg, FakeClock())
    recs = book.device_records(cur, {"a": 11})
    got = [r.to_json() for r in recs]
    assert got[0] == RECORD_A and list(got[0]) == list(RECORD_A), "same keys, values and order"
    assert got[1] == RECORD_B
    assert got[2]["status"] == "refused" and got[2]["reason"] == "bad" and "note" not in got[2]
    assert got[3]["t_comm_s"] is None and got[3]["t_up_s"] is None and got[3]["bytes_up"] == 9
    assert got[3]["tokens_per_s"] == 0.0 and got[3]["g"] is None
    assert got[4]["status"] == "missing" and "t_comp_s" not in got[4] and got[4]["idle_ratio"] is None
    assert got[5]["power_source"] is None and got[5]["local_samples_assigned"] == 64
    summary = book.summary(cur, recs, EvalRecord(1.0, 2.0, 3.0, 4.0, 5), 0.25, "v2", "fedavg", " B only",
                           {"lora": "r8"})
    assert summary.to_json() == SUMMARY and list(summary.to_json()) == list(SUMMARY)
    assert baseline_summary("v0", None).to_json() == {"round": 0, "participants": [], "version": "v0"}


def test_summary_of_a_round_whose_figures_are_all_unknown(tmp_path):
    cur = _round()
    cur.assignments = {"b": cur.assignments["b"]}
    recs = RoundRecords(tmp_path, _config(tmp_path), FakeClock()).device_records(cur, {})
    s = round_summary(cur, recs, None, 0.0, 1.0, _config(tmp_path), "v", "fedavg").to_json()
    assert s["t_comm_s"] is None and s["g"] is None and s["t_up_s"] is None and s["t_comp_s"] == 0.0
    assert s["participants"] == ["b"] and s["figures_unknown"] == ["b"] and s["bytes_up"] == 300
    assert "rougeL" not in s and s["upload"] == "int8/none delta +EF"


def test_device_round_json_round_trip_keeps_nulls_omissions_and_unknown_keys():
    for line in (RECORD_A, RECORD_B, {"round": 1, "client": "x", "status": "missing", "some_future_key": [1]},
                 {"client": "no round"}, {}):
        rec = DeviceRound.from_json(json.loads(json.dumps(line)))
        assert rec.to_json() == line
    # Key order is the schema's: the coordinator's dicts had it too, except that a record without metrics wrote
    # bytes_up after note (JSON objects are unordered; readers and the reconciliation compare them as dicts).
    assert list(DeviceRound.from_json(RECORD_A).to_json()) == list(RECORD_A)
    old = DeviceRound.from_json({"round": 1, "client": "x", "status": "aggregated", "t_comp_s": 1.0,
                                 "extra": {"power_w": 9.0}, "legacy": 1})
    assert old.aggregated and old.measured and old.more == {"legacy": 1} and old.attempt is ABSENT
    assert old.figure("power_w") == 9.0 and old.figure("mfu") is None and not old.note
    assert RoundSummary.from_json(SUMMARY).to_json() == SUMMARY and RoundSummary.from_json(SUMMARY).more == \
        {"lora": "r8"}
    assert device_figure({"power_w": float("nan"), "extra": {"power_w": 3}}, "power_w") == 3.0


def test_record_round_writes_summary_json_and_tells_on_round(tmp_path):
    seen: list[dict] = []
    cfg = _config(tmp_path)
    book = RoundRecords(tmp_path, cfg, FakeClock(), seen.append)
    book.record_round(RoundSummary.from_json(SUMMARY))
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["rounds"] == [SUMMARY] == seen and data["config"]["round_policy"] == "time"


def _recs(rnd: int, attempt: int = 1, clients=("a", "b")) -> list[dict]:
    return [{"round": rnd, "attempt": attempt, "client": c, "status": "aggregated"} for c in clients]


def test_reconcile_records_cases():
    log = _recs(1) + _recs(2, 1, ("a",)) + _recs(2, 2) + _recs(3)
    kept, notes = reconcile_records(log, 2, _recs(2, 2))
    assert kept == _recs(1) + _recs(2, 1, ("a",)) + _recs(2, 2)
    assert notes == ["2 record(s) of uncommitted rounds dropped"]
    kept, notes = reconcile_records(_recs(1) + _recs(1)[:1] + [{"client": "x"}], 1, _recs(1))
    assert kept == _recs(1) and notes == ["1 record(s) without a round number dropped", "1 record(s) repeated dropped"]
    kept, notes = reconcile_records(_recs(1)[:1], 1, _recs(1))
    assert kept == _recs(1) and notes == ["round 1: 1 record(s) in the log, 2 in its checkpoint; restored the "
                                          "checkpoint's copy"]
    assert reconcile_records(_recs(1), 1, _recs(1)) == (_recs(1), [])
    assert reconcile_records(_recs(1), 0, None) == ([], ["2 record(s) of uncommitted rounds dropped"])


def test_reconcile_restores_the_log_and_summary_json_from_the_checkpoint(tmp_path):
    cfg = _config(tmp_path)
    book = RoundRecords(tmp_path, cfg, FakeClock())
    for r in _recs(1) + _recs(2)[:1] + _recs(3):
        book.log.append(r)
    book.record_round(RoundSummary(round=1, participants=["a", "b"]))
    book.record_round(RoundSummary(round=3, participants=["a", "b"]))
    committed = {"round": 2, "participants": ["a", "b"], "version": "v2"}
    again = RoundRecords(tmp_path, cfg, FakeClock())
    again.reconcile(2, _recs(2), committed)
    assert again.log.read() == _recs(1) + _recs(2)
    assert again.summaries == [{"round": 1, "participants": ["a", "b"]}, committed]
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == again.summaries
    (tmp_path / "summary.json").write_text("{not json")
    third = RoundRecords(tmp_path, cfg, FakeClock())
    third.reconcile(2, _recs(2), committed)
    assert third.summaries == [committed] and list(tmp_path.glob("summary.json.*")), "set aside, rebuilt"

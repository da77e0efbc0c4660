"""Work planning alone (fedserver.planning): round policies, deadlines, link-aware encodings. No coordinator."""
from __future__ import annotations

import pytest

from fedserver.config import ServerConfig
from fedserver.planning import LinkEstimate, choose_encodings, expected_seconds, plan_round, plan_work, round_deadline
from fedserver.roundstate import Assignment


EST = {  # fast device: quick link and steps; slow one: 4x slower steps, slower link
    "fast": {"down_Bps": 4e6, "up_Bps": 2e6, "bytes_down": 4e6, "bytes_up": 4e6, "step_s": 0.5, "overhead_s": 1.0},
    "slow": {"down_Bps": 1e6, "up_Bps": 0.5e6, "bytes_down": 4e6, "bytes_up": 4e6, "step_s": 2.0, "overhead_s": 1.0},
}


@pytest.mark.parametrize("policy", ["steps", "samples", "time"])
def test_round_policies_plan_local_work(tmp_path, policy):
    cfg = ServerConfig(out=tmp_path, insecure=True, round_policy=policy, local_steps=8, batch_size=8)
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
    cfg = ServerConfig(out=tmp_path, insecure=True, round_deadline_s=3600, deadline_from_estimates=True,
                       deadline_safety=3, deadline_floor_s=60)
    assert round_deadline(cfg, [100.0, 40.0]) == 300.0
    assert round_deadline(cfg, [5.0]) == 60.0, "never below the floor"
    assert round_deadline(cfg, [5000.0]) == 3600.0, "never above round_deadline_s"
    assert round_deadline(cfg, [100.0, None]) == 3600.0, "a device never measured: the configured deadline"



def test_expected_seconds_needs_every_estimate():
    e = EST["fast"]
    assert expected_seconds(e, 4) == pytest.approx(4e6 / 4e6 + 4e6 / 2e6 + 1.0 + 4 * 0.5)
    assert expected_seconds(e, 4, batch_ratio=2.0) == pytest.approx(4.0 + 8 * 0.5)
    for missing in ("down_Bps", "up_Bps", "step_s", "bytes_down", "bytes_up"):
        assert expected_seconds({k: v for k, v in e.items() if k != missing}, 4) is None, missing
    assert expected_seconds(dict(e, step_s=0.0), 4) is None, "a zero rate or step time is no measurement"


def test_time_policy_with_a_budget_fits_each_device_to_it(tmp_path):
    cfg = ServerConfig(out=tmp_path, insecure=True, round_policy="time", local_steps=8, time_budget_s=30.0)
    plan = plan_work(cfg, EST)
    assert plan["fast"][0] == int((30.0 - expected_seconds(EST["fast"], 0)) / 0.5)
    assert plan["slow"][0] == int((30.0 - expected_seconds(EST["slow"], 0)) / 2.0)
    assert all(p[2] <= 30.0 for p in plan.values())


def test_plan_round_sets_each_assignment_and_returns_the_deadline(tmp_path):
    cfg = ServerConfig(out=tmp_path, insecure=True, round_policy="steps", local_steps=3, round_deadline_s=900,
                       deadline_from_estimates=True, deadline_safety=2, deadline_floor_s=10)
    a = {d: Assignment(d, "t") for d in EST}
    assert plan_round(cfg, a, {**EST, "unsampled": {}}) == 2 * expected_seconds(EST["slow"], 3)
    assert [(x.local_steps, x.local_samples, x.expected_s) for x in a.values()] == \
        [(3, 0, expected_seconds(EST[d], 3)) for d in EST]


def test_choose_encodings_from_link_rates(tmp_path):
    sizes = {"fp32": 400, "bf16": 200, "int8": 100}
    fixed = ServerConfig(out=tmp_path, insecure=True, upload_encoding="bf16")
    a = {"x": Assignment("x", "t")}
    choose_encodings(fixed, 1, a, {}, lambda d: 0, sizes.__getitem__)
    assert a["x"].upload_encoding == "bf16" and a["x"].encoding_reason == ""
    cfg = ServerConfig(out=tmp_path, insecure=True, link_aware=True, link_encodings="fp32,bf16,int8",
                       link_target_g=1.0)
    a = {d: Assignment(d, "t") for d in ("slow", "fast", "new")}
    links = {"slow": LinkEstimate(100.0, 100.0, 1.5), "fast": LinkEstimate(1e6, 1e6, 1.5)}
    asked: list[str] = []
    choose_encodings(cfg, 2, a, links, lambda d: asked.append(d) or 0, sizes.__getitem__)
    assert a["fast"].upload_encoding == "fp32" and a["slow"].upload_encoding == "int8"
    assert a["slow"].encoding_reason.startswith("predicted G 1.500 >= target 1")
    assert a["new"].upload_encoding == cfg.upload_encoding and "no link measurement" in a["new"].encoding_reason
    assert asked == ["slow", "fast", "new"]

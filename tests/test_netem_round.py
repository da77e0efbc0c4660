"""Federated rounds through shaped namespaces: one tiny round; a link that goes down mid-transfer."""
from __future__ import annotations

import json
import os

import pytest

from bench.resilience import linkdown, linkdown_config
from fedlab.simulate import SimulateConfig
from fedserver.storage import RoundLog
from fedlab.runner import simulate_with_links
from netem.tc import NetemError
from netem.topology import list_namespaces, require_namespaces

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _need_namespaces():
    try:
        require_namespaces()
    except NetemError as exc:
        pytest.skip(str(exc))


def ours() -> set[str]:
    """This process's namespaces: other test runs on the machine may have theirs up."""
    return {ns for ns in list_namespaces() if ns.startswith(f"fdt-{os.getpid()}-")}


def test_one_tiny_round_through_a_two_device_topology(tmp_path):
    before = ours()
    cfg = SimulateConfig.of(out=tmp_path / "run", preset="tiny", base="random", rounds=1, devices=2, devices_per_round=2,
                         local_steps=1, batch_size=8, max_input_tokens=128, max_target_tokens=32, data_size=40,
                         eval_size=4, round_deadline_s=300, link="lte,custom:down=20,up=10")
    assert simulate_with_links(cfg) == 0
    recs = {r["client"]: r for r in RoundLog(cfg.out / "rounds.jsonl").read()}
    assert set(recs) == {"dev-00", "dev-01"} and all(r["status"] == "aggregated" for r in recs.values())
    links = json.loads((cfg.out / "links.json").read_text())
    assert [d["up_mbit"] for d in links["devices"]] == [15, 10]
    assert links["tcp_settings"]["net.ipv4.tcp_slow_start_after_idle"] == "0"
    for rec, up_mbit, down_mbit in ((recs["dev-00"], 15, 40), (recs["dev-01"], 10, 20)):
        # A shaped link cannot move bytes faster than its rate: the upload is only
        # acknowledged once every byte crossed the device's uplink.
        assert rec["t_up_s"] + rec["t_wait_s"] >= 0.9 * rec["bytes_up"] * 8 / (up_mbit * 1e6)
        assert rec["t_down_s"] >= 0.9 * rec["bytes_down"] * 8 / (down_mbit * 1e6)
    assert ours() == before, "the topology left namespaces behind"


def test_link_down_10s_during_download_and_upload(tmp_path):
    before = ours()
    lines: list[str] = []
    r = linkdown(linkdown_config(tmp_path / "run"), echo=lines.append)
    rec = r["record"]
    assert r["code"] == 0 and rec["status"] == "aggregated", lines
    assert len([b for b in r["breaks"] if b.startswith("download")]) >= 1, r["breaks"]
    assert len([b for b in r["breaks"] if b.startswith("upload")]) >= 1, r["breaks"]
    # Each stream resumes from the last verified chunk: at most the chunk in flight travels twice.
    assert rec["bytes_resent_down"] <= r["chunk_bytes"]
    assert rec["bytes_resent_up"] <= r["chunk_bytes"]
    assert ours() == before

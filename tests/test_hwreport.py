"""The per-device hardware table from rounds.jsonl records, next to the study's figures."""
from __future__ import annotations

import json

import pytest

from fedcore.hwreport import device_rows, efficiency_lines
from fedlab import cli


def _rec(client: str, rnd: int, tps: float, power_w: float | None, status: str = "aggregated") -> dict:
    return {"round": rnd, "client": client, "status": status, "t_comp_s": 10.0, "tokens": int(tps * 10),
            "tokens_per_s": tps, "flops_per_token": 1.6e8, "peak_flops": 42.5e12, "mfu": tps * 1.6e8 / 42.5e12,
            "power_w": power_w, "energy_j": None if power_w is None else 10 * power_w,
            "eta_e": None if power_w is None else tps / power_w, "power_source": "ina3221" if power_w else None,
            "hardware": "Jetson AGX Orin 64GB"}


def test_device_rows_average_known_figures_and_keep_unknown_as_none() -> None:
    recs = [_rec("orin-1", 1, 5000.0, 30.0), _rec("orin-1", 2, 6000.0, 20.0), _rec("cpu-1", 1, 900.0, None),
            _rec("orin-2", 1, 1.0, 1.0, status="missing"), {"round": 1, "client": "x", "status": "missing"}]
    rows = {r["device"]: r for r in device_rows(recs)}
    assert set(rows) == {"orin-1", "cpu-1"}  # missing devices have no figures
    assert rows["orin-1"]["rounds"] == 2 and rows["orin-1"]["tokens_per_s"] == 5500.0
    assert rows["orin-1"]["power_w"] == 25.0 and rows["orin-1"]["eta_e"] == pytest.approx((5000 / 30 + 300) / 2)
    assert rows["cpu-1"]["power_w"] is None and rows["cpu-1"]["eta_e"] is None and rows["cpu-1"]["power_source"] is None
    lines = efficiency_lines(recs, "small", 32)
    cpu = next(line for line in lines if line.startswith("cpu-1"))
    assert cpu.split()[-4:] == ["-", "-", "-", "unknown"]
    assert any(line.strip().startswith("Orin") and "7713.0 TPS, 38.84 W, ηe 196.53, MFU 8.8%" in line
               for line in lines)
    assert len(device_rows(recs, by="hardware")) == 1


def test_netem_report_prints_the_efficiency_section(tmp_path, capsys) -> None:
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"config": {"preset": "small", "batch_size": 8,
                                                           "upload_encoding": "fp32", "upload_codec": "none"}}))
    rec = {**_rec("orin-1", 1, 5000.0, 28.0), "t_down_s": 1.0, "t_up_s": 2.0, "t_wait_s": 0.1, "t_comm_s": 3.1,
           "bytes_up": 1000, "bytes_down": 1000}
    (d / "rounds.jsonl").write_text(json.dumps(rec) + "\n")
    assert cli.netem_main(["report", str(d)]) == 0
    out = capsys.readouterr().out
    assert "Table 1 layout" in out and "Hardware efficiency per device" in out
    assert "5665.5 TPS, 28.10 W, ηe 200.75, MFU 6.5%" in out  # the study's Orin, Small, minibatch 8

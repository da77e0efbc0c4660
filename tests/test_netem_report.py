import json

import pytest

from fedlab import cli
from fedlab.table1 import load_run, render


def _run_dir(tmp_path, link="lte"):
    d = tmp_path / "table1-lte"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"config": {"preset": "small", "upload_encoding": "fp32",
                                                           "upload_codec": "none"}, "rounds": []}))
    recs = [{"round": 1, "client": f"dev-0{i}", "status": "aggregated", "t_comp_s": 10.0 + i, "t_down_s": 62.0,
             "t_up_s": 160.0, "t_wait_s": 4.0, "t_comm_s": 226.0, "bytes_up": 307_880_000, "bytes_down": 307_880_000,
             "tokens": 50_000} for i in range(2)]
    recs.append({"round": 1, "client": "dev-09", "status": "missing", "num_samples": 0})
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "links.json").write_text(json.dumps({"backend": "htb", "devices": [{"profile": link}, {"profile": link}]}))
    return d


def test_report_rows_follow_the_study_definitions(tmp_path):
    row = load_run(_run_dir(tmp_path))
    assert row.devices == 2 and row.preset == "small" and row.link == "lte [htb]"
    assert row.wire_mb == pytest.approx(307.88)
    assert row.t_up_s == pytest.approx(164.0) and row.t_down_s == pytest.approx(62.0)
    assert row.t_comp_s == pytest.approx(10.5)
    assert row.t_comp_100k_s == pytest.approx(21.0)  # 10.5 s for 50K tokens
    assert row.g == pytest.approx(10.5 / 226) and row.g_100k == pytest.approx(21.0 / 226)
    assert row.g_orin == pytest.approx(14 / 226)  # the study's Orin: 14 s per 100K tokens for Small
    text = render([row])
    assert "T_comm 218 s" in text and "G Orin 0.064" in text


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert cli.netem_main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err

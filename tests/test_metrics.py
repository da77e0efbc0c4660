"""The hand-written Prometheus exporter: exposition format, HTTP endpoint, absent figures stay absent."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from fedclient.metrics import DeviceStats, client_registry
from fedcore.metrics import CONTENT_TYPE, MetricsServer, Registry, split_listen
from fedcore.records import device_figure
from fedserver.metrics import server_registry


def test_exposition_format_with_labels_escaping_and_removal():
    reg = Registry()
    c = reg.counter("x_bytes_total", "bytes\nmoved")
    g = reg.gauge("x_g", 'a "gauge"')
    c.set(3, direction="down")
    c.set(1.5e9, direction="up")
    g.set(0.25, device='a"b\\c')
    g.set(float("nan"), device="n")
    g.set(7, device="gone")
    g.set(None, device="gone")  # None removes: no value is not 0
    assert reg.render() == (
        "# HELP x_bytes_total bytes\\nmoved\n"
        "# TYPE x_bytes_total counter\n"
        'x_bytes_total{direction="down"} 3\n'
        'x_bytes_total{direction="up"} 1500000000\n'
        '# HELP x_g a "gauge"\n'
        "# TYPE x_g gauge\n"
        'x_g{device="a\\"b\\\\c"} 0.25\n'
        'x_g{device="n"} NaN\n')


def test_counter_names_and_kinds_are_checked():
    reg = Registry()
    with pytest.raises(ValueError, match="_total"):
        reg.counter("rounds", "x")
    reg.gauge("same_total", "x")
    with pytest.raises(ValueError, match="already a gauge"):
        reg.counter("same_total", "x")


def test_listen_addresses():
    assert split_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_listen(":9464") == ("0.0.0.0", 9464)
    assert split_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:99999"):
        with pytest.raises(ValueError, match="host:port"):
            split_listen(bad)


def test_http_endpoint_serves_metrics_and_404s_elsewhere():
    reg = Registry()
    n = {"scrapes": 0}
    fam = reg.counter("scrapes_total", "scrapes so far")

    def collect() -> None:
        n["scrapes"] += 1
        fam.set(n["scrapes"])

    reg.collector(collect)
    srv = MetricsServer(reg, "127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{srv.port}"
        for expected in (1, 2):
            with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
                assert r.status == 200 and r.headers["Content-Type"] == CONTENT_TYPE
                assert f"scrapes_total {expected}\n" in r.read().decode()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/nope", timeout=30)
        assert e.value.code == 404
    finally:
        srv.close()


def test_device_figures_come_from_the_record_or_its_extra_map_and_never_default_to_zero():
    assert device_figure({"power_w": 12.5}, "power_w") == 12.5
    assert device_figure({"extra": {"power_w": 9.0}}, "power_w") == 9.0
    for rec in ({}, {"power_w": None}, {"extra": {"power_w": None}}, {"power_w": float("nan")}, {"power_w": True}):
        assert device_figure(rec, "power_w") is None


def _snapshot(records: list[dict]) -> dict:
    return {"rounds_completed_here": 1, "round": 1, "rounds_completed": 1, "rounds_total": 2, "round_open": False,
            "devices_connected": 2, "devices_known": 2, "polls_waiting": 1, "bytes_total": {"down": 100, "up": 80},
            "transfers_in_flight": {"down": 0, "up": 1}, "participants": [],
            "last_round": {"round": 1, "t_comm_s": 2.0, "t_comp_s": 1.0, "g": 0.5, "bytes_down": 100,
                           "bytes_up": 80},
            "last_records": records}


class _Coord:
    def __init__(self, snap: dict) -> None:
        self.snap = snap

    def snapshot(self) -> dict:
        return self.snap


def test_server_exports_the_power_figures_a_device_reported_and_nothing_for_the_others():
    recs = [{"client": "orin", "status": "aggregated", "t_comm_s": 2.0, "t_comp_s": 1.0,
             "extra": {"power_w": 31.5, "energy_j": 410.0}, "tokens_per_s": 1200.0},
            {"client": "cpu", "status": "aggregated", "t_comm_s": 1.0, "t_comp_s": 0.5, "power_w": None}]
    text = server_registry(_Coord(_snapshot(recs))).render()  # type: ignore[arg-type]
    assert 'fedtune_server_device_power_watts{device="orin"} 31.5' in text
    assert 'fedtune_server_device_energy_joules{device="orin"} 410' in text
    assert 'fedtune_server_device_tokens_per_second{device="orin"} 1200' in text
    assert 'device="cpu"} ' not in "".join(ln for ln in text.splitlines() if "power" in ln or "energy" in ln)
    assert "fedtune_server_device_mfu{" not in text and "fedtune_server_device_eta_e{" not in text
    assert 'fedtune_server_bytes_total{direction="up"} 80' in text
    assert 'fedtune_server_transfers_in_flight{direction="up"} 1' in text
    assert "fedtune_server_last_round_g 0.5" in text


def test_daemon_exports_its_rounds_bytes_and_only_the_figures_it_measured():
    stats = DeviceStats(connected=True, round=3)
    reg = client_registry(stats, "orin-07")
    before = reg.render()
    assert 'fedtune_client_rounds_completed_total{device="orin-07"} 0' in before
    assert "fedtune_client_last_round_t_comp_seconds{" not in before  # nothing measured yet
    stats.finish_round({"round": 3, "t_down_s": 1.0, "t_up_s": 2.0, "t_wait_s": 1.0, "t_comp_s": 8.0,
                        "bytes_down": 10, "bytes_up": 20, "extra": {"tokens_per_s": 500.0, "power_w": 15.0}})
    text = reg.render()
    assert 'fedtune_client_rounds_completed_total{device="orin-07"} 1' in text
    assert 'fedtune_client_bytes_total{device="orin-07",direction="up"} 20' in text
    assert 'fedtune_client_last_round_t_comm_seconds{device="orin-07"} 4' in text
    assert 'fedtune_client_last_round_g{device="orin-07"} 2' in text
    assert 'fedtune_client_power_watts{device="orin-07"} 15' in text
    assert "fedtune_client_energy_joules{" not in text and "fedtune_client_mfu{" not in text

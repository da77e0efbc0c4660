"""The bare grpc.aio floor the load benchmark sets fedserver's memory against."""
from __future__ import annotations

import math

from bench.fleet_load import FleetResult, floor_line
from bench.grpc_floor import FloorResult, measure, slope_kb, table


def test_each_device_holds_a_connection_and_a_waiting_call() -> None:
    r = measure(12, procs=2, limit_s=60.0)
    assert not r.notes, table([r])
    assert r.connections == 12
    assert r.rest_mb > 0 and r.connected_mb >= r.rest_mb - 1 and r.waiting_mb >= r.rest_mb - 1, table([r])
    assert math.isclose(r.idle_kb, r.conn_kb + r.call_kb)


def test_shared_channels_and_mutual_tls() -> None:
    # Mutual TLS with fedserver's own credentials: a device whose certificate the CA did not sign would fail.
    r = measure(6, tls=True, procs=1, per_channel=3, limit_s=60.0)
    assert not r.notes, table([r])
    assert r.tls and r.connections == 2


def test_floor_line_sets_fedserver_against_the_floor() -> None:
    fleets = [FleetResult(devices=100, joined=100, server_idle_rss_mb=500.0),
              FleetResult(devices=1100, joined=1100, server_idle_rss_mb=540.0)]
    floors = [FloorResult(devices=100, waiting_mb=300.0, conn_kb=20.0, call_kb=15.0),
              FloorResult(devices=1100, waiting_mb=330.0, conn_kb=18.0, call_kb=12.0)]
    assert math.isclose(slope_kb(floors[0], floors[1]), 30.72)
    line = floor_line(fleets, floors)
    # 40 MB over 1,000 devices = 40.96 KB each; the floor 30.72 KB; 10.24 KB above it.
    assert "fedserver 41.0 KB" in line and "30.7 KB" in line and "above that floor: 10.2 KB" in line, line

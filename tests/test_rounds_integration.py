"""A real server and real daemons on loopback: the rounds aggregate exactly what was sent."""
from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

from fedcore.clock import manual_clock
from fedcore.wire import digest
from fedlab.simulate import SimulateConfig, run
from fedserver.storage import CheckpointDir, RoundLog, load_checkpoint
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import Fleet, start_daemon, start_server, stop, tiny_server_config

pytestmark = pytest.mark.slow


def test_two_rounds_aggregate_the_sampled_updates_exactly(tmp_path):
    cfg = SimulateConfig.of(out=tmp_path / "run", preset="tiny", base="random", rounds=2, devices=3, devices_per_round=2,
                         local_steps=1, batch_size=8, max_input_tokens=128, max_target_tokens=32,
                         data_size=60, eval_size=4, save_updates=True, round_deadline_s=120)
    lines: list[str] = []
    assert run(cfg, echo=lines.append) == 0, "\n".join(lines)
    out = cfg.out
    summary = json.loads((out / "summary.json").read_text())["rounds"]
    assert [s["round"] for s in summary] == [0, 1, 2]
    records = RoundLog(out / "rounds.jsonl").read()
    ckpts = CheckpointDir(out / "checkpoints")
    for rnd in (1, 2):
        recs = [r for r in records if r["round"] == rnd]
        assert len(recs) == 2 and all(r["status"] == "aggregated" for r in recs)
        for r in recs:
            for key in ("t_comp_s", "t_down_s", "t_up_s", "t_wait_s", "t_comm_s", "bytes_down", "bytes_up",
                        "tokens", "tokens_per_s", "g", "flops_per_token", "peak_flops", "mfu", "power_w",
                        "energy_j", "eta_e", "power_source"):
                assert key in r, key
            # Unknown power is null, never 0; a known one comes with its source, energy and efficiency.
            known = r["power_source"] is not None
            assert all((r[k] is not None) == known for k in ("power_w", "energy_j", "eta_e")), r
            if r["peak_flops"] is not None:
                assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"],
                                                 rel=1e-3)
            assert r["flops_per_token"] > 0 and r["hardware"]
        # The new global model must be the sample-weighted mean of exactly the sampled devices' uploads.
        files = sorted((out / "updates" / f"round-{rnd:06d}").glob("*.safetensors"))
        assert sorted(f.stem for f in files) == sorted(r["client"] for r in recs)
        total = 0.0
        acc: dict[str, torch.Tensor] = {}
        for f in files:
            state, meta = load_checkpoint(f)
            n = float(meta["num_samples"])
            assert n == next(r["num_samples"] for r in recs if r["client"] == f.stem)
            total += n
            for k, v in state.items():
                acc[k] = acc.get(k, torch.zeros_like(v, dtype=torch.float64)) + n * v.double()
        model, meta = load_checkpoint(ckpts.path_for(rnd))
        expected = {k: (v / total) for k, v in acc.items()}
        for k, v in expected.items():
            torch.testing.assert_close(model[k].double(), v, rtol=1e-5, atol=1e-6, msg=k)
        assert model["encoder.embed_tokens.weight"] is model["shared.weight"], "tie restored on reload"
        assert meta["version"] == digest({k: v for k, v in model.items() if not k.startswith("server_opt/")})
    assert "ROUGE-L" in "\n".join(lines)


def test_daemon_started_before_server_waits_and_joins(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fleet = Fleet(tmp_path / "pki")
    d = start_daemon(f"127.0.0.1:{port}", "early", tmp_path / "early.log", fleet=fleet)
    try:
        time.sleep(3)  # the daemon is retrying against nothing
        assert d.poll() is None, (tmp_path / "early.log").read_text()
        srv = start_server(tiny_server_config(tmp_path / "srv", fleet, rounds=1), port=port)
        try:
            assert srv.wait(180), "round did not finish"
            assert d.wait(60) == 0, (tmp_path / "early.log").read_text()
            recs = RoundLog(tmp_path / "srv" / "rounds.jsonl").read()
            assert [(r["client"], r["status"]) for r in recs] == [("early", "aggregated")]
        finally:
            srv.close()
    finally:
        stop([d])


def test_dead_device_does_not_hold_the_round_past_its_deadline(tmp_path):
    cfg = tiny_server_config(tmp_path / "srv", rounds=1, devices_per_round=2, min_updates=1, round_deadline_s=25)
    clock = manual_clock()  # the deadline passes when the test says so, not after 25 real seconds
    srv = start_server(cfg, clock=clock)
    procs = []
    try:
        # A device that joins, takes its task and then goes silent, as a killed daemon would.
        stub = srv.stub("ghost")
        join = stub.Join(pb.JoinRequest(device_id="ghost", num_samples=10))
        procs.append(start_daemon(srv.address, "alive", tmp_path / "alive.log", fleet=srv.fleet))
        task = None
        while task is None or task.kind != pb.Task.TRAIN:
            task = stub.GetTask(pb.TaskRequest(device_id="ghost", session_id=join.session_id))
        alive = srv.coord.current.assignments["alive"]
        t_end = time.monotonic() + 150
        while alive.status != "aggregated" and time.monotonic() < t_end:
            time.sleep(0.1)
        assert alive.status == "aggregated", (tmp_path / "alive.log").read_text()
        time.sleep(0.5)
        assert not srv.coord.current.closed, "the round must wait for the ghost until its deadline"
        clock.advance(24.0)
        time.sleep(0.5)
        assert not srv.coord.current.closed, "one second before the deadline the round still waits"
        clock.advance(1.0)
        assert srv.wait(60), "the round waited for the dead device beyond its deadline"
        recs = {r["client"]: r["status"] for r in RoundLog(tmp_path / "srv" / "rounds.jsonl").read()}
        assert recs == {"alive": "aggregated", "ghost": "missing"}
    finally:
        stop(procs)
        srv.close()


def test_upload_out_of_turn_and_bad_ids_get_clear_statuses(tmp_path):
    srv = start_server(tiny_server_config(tmp_path / "srv", rounds=1, devices_per_round=1))
    try:
        stub = srv.stub("d1")
        with pytest.raises(grpc.RpcError) as e:
            stub.Join(pb.JoinRequest(device_id="bad id with spaces"))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'d1'" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            srv.stub("nobody").GetTask(pb.TaskRequest(device_id="nobody", session_id="x"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Join" in e.value.details()
        j = stub.Join(pb.JoinRequest(device_id="d1", num_samples=5))
        hdr = pb.UploadHeader(device_id="d1", session_id=j.session_id, task_id="not-mine", round=1,
                              num_samples=5)
        task = stub.GetTask(pb.TaskRequest(device_id="d1", session_id=j.session_id))
        while task.kind == pb.Task.WAIT:  # the baseline evaluation runs before round 1
            task = stub.GetTask(pb.TaskRequest(device_id="d1", session_id=j.session_id))
        assert task.kind == pb.Task.TRAIN
        hdr.base_version = task.model_version
        with pytest.raises(grpc.RpcError) as e:
            stub.Upload(iter([pb.UploadMessage(header=hdr)]))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            stub.Upload(iter([pb.UploadMessage(chunk=pb.Chunk(tensor="x"))]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            stub.ReportMetrics(pb.RoundMetrics(device_id="d1", session_id=j.session_id, task_id=task.task_id,
                                               round=1, extra={"mfu": float("nan")}))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mfu" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Download(pb.DownloadRequest(device_id="d1", session_id=j.session_id,
                                                  model_version="sha256:0")))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.close()

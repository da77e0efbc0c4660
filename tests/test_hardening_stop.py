"""Issue 14, section 3 (server side): a stop is not the end of a run, a device that lost its task gets it again,
and figures a device lost are unknown in the round log, never zeros."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from fedcore.config import to_dict
from fedcore.wire import StateEncoder, TransferSpec, codec_name, encoding_name
from fedlab.simulate import free_port, write_toml
from fedserver.storage import RoundLog
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import RunningServer, fleet_of, start_daemon, start_server, stop, tiny_server_config

pytestmark = pytest.mark.slow


def _wait_for(what: str, cond, limit_s: float, poll: float = 0.1) -> None:
    end = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _join(srv: RunningServer, device: str, num_samples: int = 10) -> tuple[object, str]:
    stub = srv.stub(device)
    return stub, stub.Join(pb.JoinRequest(device_id=device, num_samples=num_samples), timeout=30).session_id


def _train_task(stub, device: str, session: str) -> pb.Task:
    for _ in range(60):
        task = stub.GetTask(pb.TaskRequest(device_id=device, session_id=session), timeout=30)
        if task.kind == pb.Task.TRAIN:
            return task
    raise AssertionError(f"{device} got no task")


def _encoder(srv: RunningServer, task: pb.Task) -> StateEncoder:
    """The task's upload of the global model itself (a valid update of norm 0), encoded as the task asks."""
    up = task.upload
    spec = TransferSpec(encoding=encoding_name(up.encoding), codec=codec_name(up.codec), zstd_level=up.zstd_level or 3,
                        block_size=up.block_size, chunk_elems=up.chunk_elems, payload="weights")
    return StateEncoder(srv.coord.state, spec)


def _upload(stub, device: str, session: str, task: pb.Task, enc: StateEncoder, chunks: int | None = None,
            num_samples: int = 10) -> pb.UploadReply:
    """Stream the first `chunks` chunks (all: None) of enc as task's update, from the start."""
    header = pb.UploadHeader(device_id=device, session_id=session, task_id=task.task_id, round=task.round,
                             base_version=task.model_version, num_samples=num_samples, manifest=enc.manifest)

    def messages():
        yield pb.UploadMessage(header=header)
        for i, chunk in enumerate(enc.chunks(None)):
            if chunks is not None and i >= chunks:
                return
            yield pb.UploadMessage(chunk=chunk)

    return stub.Upload(messages(), timeout=60)


def test_stop_sigterm_sends_polling_daemons_away_to_come_back_and_a_restart_completes_the_run(tmp_path):
    """SIGTERM: the daemon is told to reconnect, not SHUTDOWN; the restarted server resumes with the same daemon."""
    port = free_port()
    # Two devices a round: the first server waits for a second one while dev-a polls.
    cfg = tiny_server_config(tmp_path / "srv", listen=f"127.0.0.1:{port}", devices_per_round=2, min_updates=2,
                             poll_seconds=2, eval_size=0)
    write_toml(tmp_path / "server.toml", to_dict(cfg))
    fleet = fleet_of(cfg)
    argv = [sys.executable, "-m", "fedserver", "run", "--config", str(tmp_path / "server.toml")]
    logs = [tmp_path / "server1.log", tmp_path / "server2.log"]
    server = subprocess.Popen(argv, stdout=open(logs[0], "w"), stderr=subprocess.STDOUT)
    dev_a = start_daemon(f"127.0.0.1:{port}", "dev-a", tmp_path / "a.log", fleet=fleet)
    procs = [server, dev_a]
    try:
        _wait_for("dev-a to join", lambda: "joined 127.0.0.1" in (tmp_path / "a.log").read_text(), 300)
        seen = len((tmp_path / "a.log").read_text())
        server.send_signal(signal.SIGTERM)
        assert server.wait(120) == 0, logs[0].read_text()[-3000:]
        # The daemon learns of the stop at its next poll (or finds the server gone) and backs off.
        _wait_for("dev-a to notice the stop", lambda: "retry" in (tmp_path / "a.log").read_text()[seen:]
                  or dev_a.poll() is not None, 60)
        a_log = (tmp_path / "a.log").read_text()
        assert dev_a.poll() is None and "server ended the run" not in a_log, a_log[-3000:]
        server = subprocess.Popen(argv, stdout=open(logs[1], "w"), stderr=subprocess.STDOUT)
        dev_b = start_daemon(f"127.0.0.1:{port}", "dev-b", tmp_path / "b.log", fleet=fleet)
        procs += [server, dev_b]
        assert server.wait(600) == 0, logs[1].read_text()[-3000:]
        assert dev_a.wait(120) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert dev_b.wait(120) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        stop(procs)
    recs = RoundLog(cfg.out / "rounds.jsonl").read()
    assert sorted((r["client"], r["status"]) for r in recs) == [("dev-a", "aggregated"), ("dev-b", "aggregated")]
    assert "devices will reconnect" in logs[0].read_text()
    assert "server ended the run after round 1" in (tmp_path / "a.log").read_text()


def test_stop_answers_polls_unavailable_and_only_a_finished_run_says_shutdown(tmp_path):
    cfg = tiny_server_config(tmp_path / "srv", devices_per_round=2, eval_size=0)
    srv = start_server(cfg)
    try:
        stub, session = _join(srv, "dev-a")
        srv.coord.stop()
        assert srv.wait(30)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetTask(pb.TaskRequest(device_id="dev-a", session_id=session), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume" in info.value.details() and "reconnect" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            srv.stub("dev-b").Join(pb.JoinRequest(device_id="dev-b", num_samples=1), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not srv.coord.finished and srv.coord.phase == "stopped" and not srv.coord.told_shutdown
    finally:
        srv.close()
    # The same out dir once its last round is committed: that run is finished, and only it says SHUTDOWN.
    srv.coord.checkpoints.save(1, dict(srv.coord.state), {"round": "1", "version": srv.coord.version})
    srv = start_server(cfg)
    try:
        assert srv.wait(30)
        stub, session = _join(srv, "dev-a")
        task = stub.GetTask(pb.TaskRequest(device_id="dev-a", session_id=session), timeout=30)
        assert task.kind == pb.Task.SHUTDOWN and srv.coord.phase == "finished"
    finally:
        srv.close()


def test_stop_a_device_that_lost_its_task_gets_the_same_task_again(tmp_path):
    """After a dropped upload (same session) or a rejoin (new session) the unsettled task comes back at once."""
    cfg = tiny_server_config(tmp_path / "srv", eval_size=0, round_deadline_s=600, poll_seconds=1)
    srv = start_server(cfg)
    try:
        stub, session = _join(srv, "dev-a")
        task = _train_task(stub, "dev-a", session)
        enc = _encoder(srv, task)
        assert len(list(enc.chunks(None))) > 4
        # The upload breaks off after 2 chunks: staged, status "uploading". The device drops it and asks again.
        assert not _upload(stub, "dev-a", session, task, enc, chunks=2).complete
        again = stub.GetTask(pb.TaskRequest(device_id="dev-a", session_id=session), timeout=30)
        assert (again.kind, again.task_id, again.round) == (pb.Task.TRAIN, task.task_id, task.round)
        # A daemon without a state dir is killed and rejoins: a new session, the same task, at once.
        stub, session = _join(srv, "dev-a")
        again = stub.GetTask(pb.TaskRequest(device_id="dev-a", session_id=session), timeout=30)
        assert (again.kind, again.task_id) == (pb.Task.TRAIN, task.task_id)
        # What was staged is kept: a resume from UploadStatus still works...
        st = stub.UploadStatus(pb.UploadStatusRequest(device_id="dev-a", session_id=session, task_id=task.task_id),
                               timeout=30)
        assert st.known and not st.complete and st.HasField("next")
        # ...and a fresh upload replaces it and completes the round.
        reply = _upload(stub, "dev-a", session, task, enc)
        assert reply.complete and reply.digest == enc.manifest.digest
        assert srv.wait(120), "the round waited for its deadline"
        after = stub.GetTask(pb.TaskRequest(device_id="dev-a", session_id=session), timeout=30)
        assert after.kind == pb.Task.SHUTDOWN, "a settled task is never given again"
    finally:
        srv.close()
    recs = RoundLog(cfg.out / "rounds.jsonl").read()
    assert [(r["client"], r["status"]) for r in recs] == [("dev-a", "aggregated")]


def test_stop_a_replaced_upload_stream_cannot_finish_over_the_newer_one(tmp_path):
    """A stream the device gave up on (it started the task's upload again) never completes the task."""
    cfg = tiny_server_config(tmp_path / "srv", eval_size=0, round_deadline_s=600)
    srv = start_server(cfg)
    try:
        stub, session = _join(srv, "dev-a")
        task = _train_task(stub, "dev-a", session)
        enc = _encoder(srv, task)
        chunks = list(enc.chunks(None))
        header = pb.UploadHeader(device_id="dev-a", session_id=session, task_id=task.task_id, round=task.round,
                                 base_version=task.model_version, num_samples=10, manifest=enc.manifest)
        go_on = threading.Event()

        def old_stream():
            yield pb.UploadMessage(header=header)
            yield pb.UploadMessage(chunk=chunks[0])
            go_on.wait(60)
            for c in chunks[1:]:
                yield pb.UploadMessage(chunk=c)

        old = stub.Upload.future(old_stream(), timeout=120)
        _wait_for("the old stream's first chunk", lambda: srv.coord.current.assignments["dev-a"].chunks_in > 0, 30)
        new = _upload(stub, "dev-a", session, task, enc)
        go_on.set()
        with pytest.raises(grpc.RpcError):
            old.result(timeout=60)
        assert new.complete
        assert srv.wait(120)
    finally:
        srv.close()
    recs = RoundLog(cfg.out / "rounds.jsonl").read()
    assert [(r["client"], r["status"]) for r in recs] == [("dev-a", "aggregated")]


def test_stop_lost_upload_figures_are_unknown_not_zero(tmp_path):
    """A device whose upload figures were lost (0 bytes reported) or whose metrics never came: null, noted."""
    cfg = tiny_server_config(tmp_path / "srv", eval_size=0, devices_per_round=3, min_updates=3)
    srv = start_server(cfg)
    devices = {d: _join(srv, d) for d in ("lost", "silent", "whole")}
    try:
        tasks = {d: _train_task(stub, d, s) for d, (stub, s) in devices.items()}
        enc = _encoder(srv, tasks["lost"])
        for d, (stub, s) in devices.items():
            assert _upload(stub, d, s, tasks[d], enc).complete
        wire = enc.manifest.wire_bytes

        def report(d: str, **m) -> None:
            stub, s = devices[d]
            stub.ReportMetrics(pb.RoundMetrics(device_id=d, session_id=s, task_id=tasks[d].task_id, round=1,
                                               t_down_s=0.5, tokens=100, **m), timeout=30)

        # "lost" restarted after the acknowledgement: it knows its compute time, not its upload figures.
        report("lost", t_comp_s=3.0, t_up_s=0.0, t_wait_s=0.0, bytes_up=0)
        report("whole", t_comp_s=1.0, t_up_s=2.0, t_wait_s=0.5, bytes_up=wire)
        # "silent" never reports; the round closes after its short grace for metrics.
        assert srv.wait(120)
    finally:
        srv.close()
    recs = {r["client"]: r for r in RoundLog(cfg.out / "rounds.jsonl").read()}
    lost, silent, whole = recs["lost"], recs["silent"], recs["whole"]
    assert lost["bytes_up"] > 0 and lost["bytes_up"] == srv.coord.current.assignments["lost"].bytes_in
    assert lost["t_up_s"] is None and lost["t_comm_s"] is None and lost["g"] is None and "0 bytes up" in lost["note"]
    assert lost["t_comp_s"] == 3.0, "what the device did report is kept"
    assert silent["status"] == "aggregated" and "no metrics" in silent["note"] and silent["bytes_up"] > 0
    assert "t_comm_s" not in silent and "g" not in silent
    assert whole["t_comm_s"] == pytest.approx(3.0) and "note" not in whole
    summary = json.loads((cfg.out / "summary.json").read_text())["rounds"][-1]
    # T_comm and G from the device whose figures are known, never from the zeros of the other two.
    assert summary["t_comm_s"] == pytest.approx(3.0) and summary["g"] == pytest.approx(1.0 / 3.0)
    assert sorted(summary["figures_unknown"]) == ["lost", "silent"]
    assert summary["bytes_up"] == lost["bytes_up"] + silent["bytes_up"] + wire

"""A full disk under memory-mapped staging files: one clear error, never SIGBUS, and the round goes on.

A sparse file that is mapped and then written on a full file system kills
the writer with SIGBUS. fedcore.tensorfile reserves a new file's blocks
before mapping it; the server answers an upload it cannot stage with
RESOURCE_EXHAUSTED and keeps running, so the device keeps its update and
retries.
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from bench.fuzz import join_and_wait
from fedclient.transfer import Limits, download, upload
from fedcore.channel import ClientSecurity, open_channel
from fedcore import tensorfile
from fedcore.tensorfile import map_tensors
from fedcore.wire import TransferSpec, codec_name, encoding_name, unique_tensors
from fedcore.wire import clone_tied
from fedserver.storage import RoundLog
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from fedhelpers import start_server, tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = [("a", torch.float32, (256, 256)), ("b", torch.int64, (3,))]  # 256 KiB + 64 bytes
SIZE = 256 * 256 * 4 + 64


def _no_space(*_args) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_map_tensors_raises_one_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorfile.os, "posix_fallocate", _no_space)
    path = tmp_path / "staging" / "up.bin"
    with pytest.raises(OSError) as e:
        map_tensors(path, LAYOUT, create=True)
    exc = e.value
    assert isinstance(exc, tensorfile.DiskFullError) and exc.errno == errno.ENOSPC
    msg = str(exc)
    assert str(path) in msg and "it needs 256.1 KiB" in msg and " free" in msg, msg
    assert exc.needed == SIZE and exc.free > 0
    assert not path.exists(), "a file that could not be reserved is not left behind"


def test_disk_full_space_is_reserved_before_the_file_is_mapped(tmp_path):
    path = tmp_path / "up.bin"
    out = map_tensors(path, LAYOUT, create=True)
    assert os.stat(path).st_size == SIZE
    # Blocks allocated now, not when a page is first written (a sparse file has none).
    assert os.stat(path).st_blocks * 512 >= SIZE
    assert not out["a"].any() and not out["b"].any(), "zero-filled"


def test_disk_recreating_a_staging_file_leaves_an_older_mapping_intact(tmp_path):
    """A fresh start of an upload makes its file again while an older stream may still write the old one."""
    path = tmp_path / "up.bin"
    old = map_tensors(path, LAYOUT, create=True)
    old["a"].fill_(3.0)
    new = map_tensors(path, LAYOUT, create=True)
    old["a"][0, 0] = 4.0  # a write after the file was made again: no fault, and it stays in the old file
    assert float(old["a"][1, 1]) == 3.0 and float(old["a"][0, 0]) == 4.0
    assert not new["a"].any(), "the new file starts from zeros"


def _send(ch: grpc.Channel, dev: str, sid: str, task: pb.Task, base: dict[str, torch.Tensor]) -> pb.UploadReply:
    """The global model plus a small change on every float tensor, ties kept, sent without retries."""
    state = clone_tied(base)
    for e in unique_tensors(state):
        if e.tensor.is_floating_point():
            e.tensor.add_(1e-3)
    up = task.upload
    spec = TransferSpec(encoding_name(up.encoding), codec_name(up.codec), block_size=up.block_size,
                        chunk_elems=up.chunk_elems)
    hdr = pb.UploadHeader(device_id=dev, session_id=sid, task_id=task.task_id, round=task.round,
                          base_version=task.model_version, num_samples=8)

    def no_retry(_attempt: int) -> None:
        raise AssertionError("no retries here")

    reply, _ = upload(pbg.FederationStub(ch), hdr, state, spec, Limits(retries=0, stall_s=120), no_retry)
    return reply


def test_disk_full_upload_is_refused_as_exhausted_and_the_device_can_retry(tmp_path, monkeypatch, caplog):
    cfg = tiny_server_config(tmp_path / "srv", rounds=1, devices_per_round=1, eval_size=0, round_deadline_s=600)
    srv = start_server(cfg)
    try:
        base = clone_tied(srv.coord.state)
        ch = srv.channel("d1")
        sid, task = join_and_wait(pbg.FederationStub(ch), "d1")
        with monkeypatch.context() as m:
            m.setattr(tensorfile.os, "posix_fallocate", _no_space)
            with pytest.raises(grpc.RpcError) as e:
                _send(ch, "d1", sid, task, base)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"server staging dir {cfg.out / 'staging'} is full" in e.value.details()
        assert " free" in e.value.details()
        assert any(r.levelname == "ERROR" and "staging dir" in r.getMessage() for r in caplog.records)
        assert srv.coord.current.assignments["d1"].status == "sampled", "the task is still the device's"
        # Space again: the same update goes through and the round completes.
        assert _send(ch, "d1", sid, task, base).complete
        assert srv.wait(120), "the round did not complete"
        assert [r["status"] for r in RoundLog(cfg.out / "rounds.jsonl").read()] == ["aggregated"]
    finally:
        srv.close()


@pytest.mark.root
@pytest.mark.slow
def test_disk_full_staging_on_a_small_tmpfs_is_refused_and_the_server_survives(tmp_path):
    """A real file system that is full: the server process answers RESOURCE_EXHAUSTED instead of dying of SIGBUS."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    out = tmp_path / "srv"
    staging = out / "staging"
    staging.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(staging)], check=True)
    server = None
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [sys.executable, "-m", "fedserver", "run", "--listen", f"127.0.0.1:{port}", "--out", str(out),
                "--insecure", "--preset", "tiny", "--rounds", "1", "--devices-per-round", "1",
                "--local-steps", "1", "--batch-size", "8", "--eval-size", "0", "--round-deadline-s", "600",
                "--poll-seconds", "1"]
        server = subprocess.Popen(argv, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
        with open_channel(f"127.0.0.1:{port}", ClientSecurity(insecure=True)) as ch:
            stub = pbg.FederationStub(ch)
            sid, task = join_and_wait(stub, "d1")
            base, _ = download(stub, "d1", sid, task.model_version, None, Limits(stall_s=60), lambda _a: None)
            with pytest.raises(grpc.RpcError) as e:
                _send(ch, "d1", sid, task, base)
            log = (tmp_path / "server.log").read_text()
            assert server.poll() is None, f"the server died ({server.returncode}):\n{log[-3000:]}"
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
            assert "is full" in e.value.details() and str(staging) in e.value.details()
            # The server still serves the round: the task is the device's, and it is not done.
            st = stub.UploadStatus(pb.UploadStatusRequest(device_id="d1", session_id=sid, task_id=task.task_id))
            assert not st.known and not st.complete
            # The operator makes room; the device's retry is taken and the run finishes.
            subprocess.run(["mount", "-o", "remount,size=64m", str(staging)], check=True)
            assert _send(ch, "d1", sid, task, base).complete
        assert server.wait(120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert [r["status"] for r in RoundLog(out / "rounds.jsonl").read()] == ["aggregated"]
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(10)
        for _ in range(20):  # the server may still hold a file there for a moment
            if subprocess.run(["umount", str(staging)]).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(staging)])

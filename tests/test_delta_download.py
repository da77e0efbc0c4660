"""A real server over gRPC: broadcast-delta downloads reconstruct each global version exactly, a device too
far behind gets the full model, and link-aware encoding picks and logs each device's upload encoding."""
from __future__ import annotations

import torch

from fedclient.transfer import Limits, fetch, upload
from fedcore.wire import TransferSpec, codec_name, digest, encoding_name, unique_tensors
from fedserver.storage import RoundLog
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import start_server, tiny_server_config


def no_backoff(_: int) -> None:
    pass


def next_task(stub, sid: str) -> pb.Task:
    while True:
        task = stub.GetTask(pb.TaskRequest(device_id="d1", session_id=sid))
        if task.kind in (pb.Task.TRAIN, pb.Task.SHUTDOWN):
            return task


def train_and_upload(stub, sid: str, task: pb.Task, held: dict[str, torch.Tensor], seed: int) -> None:
    """Stand in for local training: upload a small random delta, then report metrics with link rates."""
    g = torch.Generator().manual_seed(seed)
    entries = unique_tensors(held)
    delta = {e.name: torch.randn(e.tensor.shape, generator=g) * 1e-3 for e in entries}
    tied = {a: delta[e.name] for e in entries for a in (e.name, *e.aliases)}
    up = task.upload
    spec = TransferSpec(encoding_name(up.encoding), codec_name(up.codec), block_size=up.block_size,
                        chunk_elems=up.chunk_elems, payload="delta")
    header = pb.UploadHeader(device_id="d1", session_id=sid, task_id=task.task_id, round=task.round,
                             base_version=task.model_version, num_samples=5)
    reply, ust = upload(stub, header, tied, spec, Limits(retries=0), no_backoff)
    assert reply.complete
    stub.ReportMetrics(pb.RoundMetrics(device_id="d1", session_id=sid, task_id=task.task_id, round=task.round,
                                       t_up_s=ust.seconds, t_comp_s=1.0, bytes_up=ust.bytes, num_samples=5,
                                       extra={"link_up_bps": 1e6, "link_down_bps": 4e6}))


def test_delta_downloads_match_the_global_digest_and_old_versions_get_the_full_model(tmp_path):
    cfg = tiny_server_config(tmp_path / "srv", rounds=5, eval_size=0, download_payload="delta",
                             download_delta_encoding="int8", download_codec="zstd-bg", download_delta_keep=2,
                             upload_payload="delta", upload_encoding="fp32", link_aware=True,
                             link_encodings="fp32,int8", link_byte_budget=2_000_000)
    srv = start_server(cfg)
    try:
        stub = srv.stub("d1")
        sid = stub.Join(pb.JoinRequest(device_id="d1", num_samples=5)).session_id
        held: dict[str, torch.Tensor] | None = None
        held_version = ""
        kept: dict[int, tuple[dict[str, torch.Tensor], str]] = {}  # round -> (state, version) the device held
        seen = []
        # (round, which held version the device starts from, delta steps expected)
        plan = [(1, None, 0), (2, 1, 1), (3, 2, 1), (4, 2, 2), (5, 2, 0)]
        for rnd, start_from, deltas in plan:
            task = next_task(stub, sid)
            assert task.kind == pb.Task.TRAIN and task.round == rnd
            if start_from is not None:
                held, held_version = kept[start_from]  # rounds 4, 5: a device that sat out some rounds
            state, st = fetch(stub, "d1", sid, task.model_version, held, held_version, Limits(retries=0), no_backoff)
            assert digest(state) == task.model_version == srv.coord.version, rnd
            assert st.deltas == deltas, (rnd, st.deltas)
            assert st.exact
            seen.append((rnd, st.bytes, encoding_name(task.upload.encoding)))
            kept[rnd] = (state, task.model_version)
            train_and_upload(stub, sid, task, state, rnd)
        full = seen[0][1]
        assert all(b < full / 3 for r, b, _ in seen if r in (2, 3)), seen  # one int8 delta: a quarter of fp32
        assert seen[4][1] > full * 0.8, "version 3 behind with keep=2: the full model"
        # Link-aware: the configured fp32 before any measurement, then int8 to fit the 2 MB budget.
        assert [e for _, _, e in seen] == ["fp32", "int8", "int8", "int8", "int8"]
        assert srv.wait(60)
        recs = RoundLog(tmp_path / "srv" / "rounds.jsonl").read()
        assert recs[0]["upload_encoding"] == "fp32" and "no link measurement" in recs[0]["encoding_reason"]
        assert recs[1]["upload_encoding"] == "int8" and "budget" in recs[1]["encoding_reason"]
    finally:
        srv.close()

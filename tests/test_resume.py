"""Transfers resume from the last verified chunk: after a break, and after a process restart (state_dir)."""
from __future__ import annotations

import grpc
import pytest
import torch

from fedclient.statedir import PendingUpload, StateDir
from fedclient.transfer import Limits, download, upload
from fedcore.wire import StateEncoder, TransferSpec, digest, unique_tensors
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import CallFuture

SPEC = TransferSpec(chunk_elems=64, block_size=64)


def model_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(10, 32, generator=g)
    return {"shared.weight": shared, "enc.w": torch.randn(300, generator=g), "steps": torch.arange(5),
            "dec.embed": shared}


class Broken(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "link dropped (test)"


class DownloadCall:
    """A server stream that breaks after `limit` chunks."""

    def __init__(self, enc: StateEncoder, start: pb.Position | None, limit: int | None) -> None:
        self.enc, self.start, self.limit = enc, start, limit

    def cancel(self) -> None:
        pass

    def __iter__(self):
        yield pb.DownloadMessage(manifest=self.enc.manifest)
        for i, c in enumerate(self.enc.chunks(self.start)):
            if self.limit is not None and i >= self.limit:
                raise Broken()
            yield pb.DownloadMessage(chunk=c)


class FakeStub:
    def __init__(self, state, breaks: list[int | None]) -> None:
        self.enc = StateEncoder(state, SPEC, digest=digest(state))
        self.breaks = list(breaks)
        self.starts: list[tuple[int, int] | None] = []

    def Download(self, req, timeout=None, wait_for_ready=None):
        self.starts.append((req.start.tensor_index, req.start.offset) if req.HasField("start") else None)
        return DownloadCall(self.enc, req.start if req.HasField("start") else None,
                            self.breaks.pop(0) if self.breaks else None)


def no_wait(_attempt: int) -> None:
    pass


def test_download_resumes_after_a_break_and_after_a_restart_from_disk(tmp_path):
    state = model_state()
    n_chunks = sum(1 for _ in StateEncoder(state, SPEC).chunks())
    # First process: the stream breaks after 2 chunks, the retry after 2 more, then the process "dies"
    # (the retries run out) with 4 verified chunks on disk.
    stub = FakeStub(state, [2, 2, 0, 0])
    with pytest.raises(grpc.RpcError):
        download(stub, "d", "s", "v", None, Limits(retries=1, stall_s=0), no_wait, store=StateDir(tmp_path).downloads)
    assert stub.starts[:3] == [None, (0, 128), (0, 256)], "each retry starts at the first chunk not held"
    # Second process: a fresh StateDir on the same directory finds them and asks only for the rest.
    stub2 = FakeStub(state, [])
    got, stats = download(stub2, "d", "s", "v", None, Limits(stall_s=0), no_wait, store=StateDir(tmp_path).downloads)
    assert stub2.starts[-1] == (0, 256), "resumed after the 4 chunks kept on disk"
    rest = list(StateEncoder(state, SPEC).chunks(pb.Position(tensor_index=0, offset=256)))
    assert len(rest) == n_chunks - 4
    assert stats.bytes == sum(len(c.payload) for c in rest), "only the rest moved"
    assert digest(got) == digest(state) and got["dec.embed"] is got["shared.weight"]
    # Third process: the complete model is kept and found without any transfer, bit-exact (a base for deltas).
    version, kept, exact = StateDir(tmp_path).downloads.cached()
    assert version == digest(state) and digest(kept) == digest(state) and exact


def test_corrupt_disk_state_is_discarded_not_trusted(tmp_path):
    state = model_state()
    store = StateDir(tmp_path).downloads
    with pytest.raises(grpc.RpcError):
        download(FakeStub(state, [3, 0]), "d", "s", "v", None, Limits(retries=0, stall_s=0), no_wait, store=store)
    (data,) = (tmp_path / "download").glob("*/tensors.bin")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF  # a chunk the log calls verified is damaged on disk
    data.write_bytes(bytes(raw))
    # The resumed download fails its digest: the partial is thrown away and the model fetched from the start.
    stub = FakeStub(state, [])
    got, _ = download(stub, "d", "s", "v", None, Limits(stall_s=0), no_wait, store=StateDir(tmp_path).downloads)
    assert digest(got) == digest(state)
    assert stub.starts[-1] is None, "the second request starts from the beginning, not from the damaged partial"
    assert StateDir(tmp_path).downloads.cached()[0] == digest(state), "only the fresh, verified copy is kept"


class UploadStub:
    """Takes `take` chunks per stream, but the server 'holds' only `hold` of them when asked where to resume."""

    def __init__(self, manifest_state, take: int, hold: int) -> None:
        self.take, self.hold = take, hold
        self.held: set[tuple[str, int]] = set()
        self.order = [(c.tensor, c.offset) for c in StateEncoder(manifest_state, SPEC).chunks()]
        self.calls = 0
        self.Upload = self
        self.status_calls = 0

    def future(self, messages, timeout=None, wait_for_ready=None):
        def consume():
            self.calls += 1
            it = iter(messages)
            next(it)  # header
            got = []
            for msg in it:
                got.append((msg.chunk.tensor, msg.chunk.offset))
                if len(got) == self.take and self.calls == 1:
                    self.held.update(got[:self.hold])  # the rest was lost in flight
                    raise Broken()
            self.held.update(got)
            return pb.UploadReply(complete=len(self.held) == len(self.order))
        return CallFuture(consume)

    def UploadStatus(self, req, timeout=None):
        self.status_calls += 1
        missing = [p for p in self.order if p not in self.held]
        if not missing:
            return pb.UploadStatusReply(known=False, complete=True)
        ti = [e.name for e in unique_tensors(model_state())].index(missing[0][0])
        return pb.UploadStatusReply(known=True, next=pb.Position(tensor_index=ti, offset=missing[0][1]))


def test_upload_resumes_where_the_server_is_and_counts_what_it_sends_twice():
    state = model_state()
    stub = UploadStub(state, take=4, hold=3)
    reply, stats = upload(stub, pb.UploadHeader(task_id="t"), state, SPEC, Limits(stall_s=0), no_wait)
    assert reply.complete and stats.attempts == 2
    assert stats.bytes_resent == 64 * 4, "exactly the one chunk lost in flight is sent again"


def test_pending_upload_survives_a_restart_and_resumes_with_the_same_manifest(tmp_path):
    state = model_state()
    entries = [(e.name, e.tensor, e.aliases) for e in unique_tensors(state)]
    StateDir(tmp_path).uploads.save(PendingUpload("t1", 3, "sha256:base", 42, {"encoding": "fp32", "codec": "none",
                                    "chunk_elems": 64, "block_size": 64}, {"t_comp_s": 1.5}), entries)
    pending, kept = StateDir(tmp_path).uploads.load()
    assert (pending.task_id, pending.round, pending.num_samples, pending.metrics) == ("t1", 3, 42, {"t_comp_s": 1.5})
    assert kept["dec.embed"] is kept["shared.weight"]
    assert StateEncoder(kept, SPEC).manifest == StateEncoder(state, SPEC).manifest, "resume positions stay valid"
    # The server held everything already (the reply was lost): nothing is sent again.
    stub = UploadStub(state, take=10_000, hold=0)
    stub.held = set(stub.order)
    reply, stats = upload(stub, pb.UploadHeader(task_id="t1"), kept, SPEC, Limits(stall_s=0), no_wait, resume=True)
    assert reply.complete and stub.calls == 0 and stats.bytes == 0


def test_pending_upload_keeps_the_error_feedback_residual_that_goes_with_it(tmp_path):
    """A delta compensated with the old residual travels with the new one: a restarted daemon that delivers
    the update commits that residual, not the stale committed one (nor none)."""
    state = model_state()
    entries = [(e.name, e.tensor, e.aliases) for e in unique_tensors(state)]
    residual = {e.name: torch.full(e.tensor.shape, 0.25) for e in unique_tensors(state) if e.tensor.is_floating_point()}
    pending = PendingUpload("t2", 4, "sha256:base", 7, {"encoding": "int8", "codec": "none", "chunk_elems": 64,
                                                        "block_size": 64, "payload": "delta"})
    StateDir(tmp_path).uploads.save(pending, entries, residual)
    kept = StateDir(tmp_path).uploads.residual()
    assert kept is not None and set(kept) == set(residual)
    assert all(torch.equal(kept[k], residual[k]) for k in residual)
    # An update without error feedback leaves none behind, also after replacing one that had it.
    StateDir(tmp_path).uploads.save(pending, entries)
    assert StateDir(tmp_path).uploads.residual() is None

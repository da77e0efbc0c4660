"""The device daemon against damaged durable state, a busy or full world, and unusable tasks (issue 14).

Each test names its class: durable (state dir checked before use), upload (retries bounded whatever the
progress, a busy server waited out), metrics (figures of an acknowledged upload survive a kill), disk (a
state dir that cannot hold a transfer), config (a task no training could run).
"""
from __future__ import annotations

import errno
import logging
import math
import time
from pathlib import Path

import grpc
import pytest
import torch

from fedclient.config import ClientConfig
from fedclient.statedir import PendingUpload, StateDir
from fedclient.transfer import Limits, download, upload
from fedcore.models import build_model, config_json
from fedcore.wire import StateEncoder, TransferSpec, digest, unique_tensors
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import CallFuture

SPEC = TransferSpec(chunk_elems=1024, block_size=64)


def big_state() -> dict[str, torch.Tensor]:
    """About 160 KiB at fp32 with a tied tensor: room to zero 16 KiB and 64 KiB of it."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(64, 128, generator=g)
    return {"shared.weight": shared, "enc.w": torch.randn(128, 256, generator=g), "steps": torch.arange(5),
            "dec.embed": shared}


def no_wait(_attempt: int) -> None:
    pass


class RpcFailure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "test") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class Runaway(Exception):
    """A fake server's guard: the device kept retrying far past any sane budget."""


# ------------------------------------------------------------------ fake server
class DownloadCall:
    """A download stream; with `limit`, the link drops after that many chunks."""

    def __init__(self, enc: StateEncoder, start: pb.Position | None, manifest: pb.Manifest,
                 limit: int | None = None) -> None:
        self.enc, self.start, self.manifest, self.limit = enc, start, manifest, limit

    def cancel(self) -> None:
        pass

    def __iter__(self):
        yield pb.DownloadMessage(manifest=self.manifest)
        for i, c in enumerate(self.enc.chunks(self.start)):
            if self.limit is not None and i >= self.limit:
                raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "link dropped")
            yield pb.DownloadMessage(chunk=c)


class FakeServer:
    """Enough of the Federation service for one daemon: tasks, a model to download, uploads, metrics."""

    def __init__(self, state: dict[str, torch.Tensor] | None = None, tasks: list[pb.Task] | None = None,
                 bad_digest: bool = False) -> None:
        self.enc = StateEncoder(state, TransferSpec(chunk_elems=4096, block_size=64), digest=digest(state)) \
            if state is not None else None
        self.manifest = pb.Manifest()
        if self.enc is not None:
            self.manifest.CopyFrom(self.enc.manifest)
            if bad_digest:
                self.manifest.digest = "sha256:" + "0" * 64
        self.tasks = list(tasks or [])
        self.download_limit: int | None = None
        self.downloads: list[tuple[int, int] | None] = []
        self.uploads: list[pb.UploadHeader] = []
        self.held_all = False
        self.metrics: list[pb.RoundMetrics] = []
        self.upload_failures: list[grpc.RpcError] = []  # raised by the next Upload calls, in order
        self.Upload = self

    def GetTask(self, req, timeout=None):
        return self.tasks.pop(0) if self.tasks else pb.Task(kind=pb.Task.SHUTDOWN)

    def Download(self, req, timeout=None, wait_for_ready=None):
        start = req.start if req.HasField("start") else None
        self.downloads.append(None if start is None else (start.tensor_index, start.offset))
        return DownloadCall(self.enc, start, self.manifest, self.download_limit)

    def future(self, messages, timeout=None, wait_for_ready=None):
        def consume():
            it = iter(messages)
            self.uploads.append(next(it).header)
            if self.upload_failures:
                raise self.upload_failures.pop(0)
            for _ in it:
                pass
            self.held_all = True
            return pb.UploadReply(complete=True)
        return CallFuture(consume)

    def UploadStatus(self, req, timeout=None):
        return pb.UploadStatusReply(known=False, complete=self.held_all)

    def ReportMetrics(self, req, timeout=None):
        self.metrics.append(req)
        return pb.MetricsAck()


TINY = build_model("tiny")


@pytest.fixture
def make_daemon(tmp_path, one_torch_thread):
    from fedclient.daemon import Daemon

    def make(state_dir: bool = True, **over) -> Daemon:
        cfg = ClientConfig(device_id="dev-t", data_size=16, insecure=True, device="cpu", power_source="none",
                           retry_initial_s=0.001, retry_max_s=0.002, state_dir=tmp_path / "state" if state_dir
                           else None, **over)
        cfg.validate()
        d = Daemon(cfg)
        d.session_id = "s"
        d.model_config = config_json(TINY)
        d._build_model()
        return d
    return make


def train_task(task_id: str = "task-1", **training) -> pb.Task:
    tr = dict(local_steps=1, batch_size=2, learning_rate=1e-3, max_input_tokens=32, max_target_tokens=8, seed=1)
    tr.update(training)
    return pb.Task(kind=pb.Task.TRAIN, round=1, task_id=task_id, model_version=digest(TINY.state_dict()),
                   training=pb.TrainingSettings(**tr), upload=TransferSpec().settings(),
                   deadline_unix=time.time() + 600)


def keep_download(root: Path, state: dict[str, torch.Tensor], spec: TransferSpec = SPEC) -> None:
    """A complete download of `state` kept in the state dir at `root`, as a daemon leaves it."""
    stub = FakeServer(state)
    stub.enc = StateEncoder(state, spec, digest=digest(state))
    stub.manifest.CopyFrom(stub.enc.manifest)
    download(stub, "d", "s", "v", None, Limits(stall_s=0), no_wait, store=StateDir(root).downloads)


def zero(path: Path, offset: int, nbytes: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + nbytes] = bytes(nbytes)
    path.write_bytes(bytes(raw))


def warnings_of(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


# ------------------------------------------------------------ 1. kept model
@pytest.mark.parametrize("damage", ["zeroed 16 KiB", "lossy, zeroed 16 KiB", "truncated", "manifest garbage"])
def test_durable_kept_model_is_digest_checked_before_it_is_a_base(tmp_path, make_daemon, caplog, damage):
    state = big_state()
    keep_download(tmp_path / "state", state, TransferSpec("int8", chunk_elems=1024, block_size=64)
                  if damage.startswith("lossy") else SPEC)
    (d,) = (tmp_path / "state" / "download").iterdir()
    if "zeroed" in damage:
        zero(d / "tensors.bin", 20_000, 16 * 1024)
    elif damage == "truncated":
        (d / "tensors.bin").write_bytes((d / "tensors.bin").read_bytes()[:-4096])
    else:
        (d / "manifest.pb").write_bytes(b"\xff\x00garbage")
    caplog.set_level(logging.INFO)
    daemon = make_daemon()
    assert daemon.base is None and daemon.base_version == "", "a damaged kept model is never used as a base"
    damaged = [m for m in warnings_of(caplog) if "damaged" in m]
    assert len(damaged) == 1 and str(d) in damaged[0], "one warning line naming where"
    assert not d.exists(), "discarded: the next round downloads the model again"


def test_durable_intact_kept_model_is_still_used(tmp_path, make_daemon):
    state = big_state()
    keep_download(tmp_path / "state", state, TransferSpec("int8", chunk_elems=1024, block_size=64))
    daemon = make_daemon()
    assert daemon.base is not None and not daemon.base_exact, "an intact lossy copy is kept, not bit-exact"


# -------------------------------------------------------- 2. pending upload
METRICS = {"t_down_s": 1.0, "t_comp_s": 2.0, "bytes_down": 10, "tokens": 5, "train_loss": 1.0,
           "download_cached": False, "step_times": {}, "extra": {}}


def save_pending(root: Path, state: dict[str, torch.Tensor], task_id: str = "t1") -> PendingUpload:
    entries = [(e.name, e.tensor, e.aliases) for e in unique_tensors(state)]
    pending = PendingUpload(task_id, 3, "sha256:base", 42, {"encoding": "fp32", "codec": "none",
                                                            "chunk_elems": 1024, "block_size": 64}, dict(METRICS))
    StateDir(root).uploads.save(pending, entries)
    return pending


def test_durable_damaged_pending_upload_is_dropped_not_sent(tmp_path, caplog):
    save_pending(tmp_path, big_state())
    zero(tmp_path / "upload" / "tensors.bin", 16_384, 64 * 1024)
    caplog.set_level(logging.WARNING)
    assert StateDir(tmp_path).uploads.load() is None, "a damaged update is never uploaded"
    lines = [m for m in warnings_of(caplog) if "damaged" in m]
    assert len(lines) == 1 and "t1" in lines[0] and "asks for work again" in lines[0]
    assert not (tmp_path / "upload").exists()
    # An intact one loads, tied tensors tied again.
    save_pending(tmp_path, big_state())
    pending, kept = StateDir(tmp_path).uploads.load()
    assert kept["dec.embed"] is kept["shared.weight"] and digest(kept) == digest(big_state())


def test_durable_damaged_pending_upload_makes_the_daemon_ask_for_work(tmp_path, make_daemon):
    save_pending(tmp_path / "state", big_state())
    zero(tmp_path / "state" / "upload" / "tensors.bin", 0, 64 * 1024)
    daemon = make_daemon()
    server = FakeServer()
    daemon._deliver_pending(server)
    assert server.uploads == [] and server.metrics == [], "nothing of the damaged update leaves the device"


class ResumingServer:
    """An upload endpoint that holds the first `held` chunks of a staged copy and answers like fedserver."""

    def __init__(self, state, refuse_resume: str = "", fail: grpc.StatusCode | None = None,
                 ack_one_per_attempt: bool = False, spec: TransferSpec = SPEC) -> None:
        self.order = [(c.tensor, c.offset) for c in StateEncoder(state, spec).chunks()]
        self.names = [e.name for e in unique_tensors(state)]
        self.held: set[tuple[str, int]] = {self.order[0]}  # one chunk staged from before
        self.refuse_resume, self.fail, self.ack_one = refuse_resume, fail, ack_one_per_attempt
        self.calls: list[tuple[int, int] | None] = []
        self.Upload = self

    def future(self, messages, timeout=None, wait_for_ready=None):
        def consume():
            if len(self.calls) >= 100:
                raise Runaway(f"{len(self.calls)} upload attempts")
            it = iter(messages)
            h = next(it).header
            self.calls.append((h.start.tensor_index, h.start.offset) if h.HasField("start") else None)
            got = []
            for msg in it:  # gRPC pulls chunks before the server answers: bytes are "sent" every time
                got.append((msg.chunk.tensor, msg.chunk.offset))
                if len(got) == 3:
                    break
            if h.HasField("start") and self.refuse_resume:
                raise RpcFailure(grpc.StatusCode.ABORTED, self.refuse_resume)
            if self.fail is not None:
                if self.ack_one:
                    self.held.add(next(p for p in self.order if p not in self.held))
                raise RpcFailure(self.fail, "chunk damaged in flight")
            if not h.HasField("start"):
                self.held = set()  # a fresh start replaces the staged copy
            got.extend((m.chunk.tensor, m.chunk.offset) for m in it)
            self.held.update(got)
            return pb.UploadReply(complete=set(self.order) <= self.held)
        return CallFuture(consume)

    def UploadStatus(self, req, timeout=None):
        missing = [p for p in self.order if p not in self.held]
        if not missing:
            return pb.UploadStatusReply(known=False, complete=True)
        return pb.UploadStatusReply(known=True, next=pb.Position(tensor_index=self.names.index(missing[0][0]),
                                                                 offset=missing[0][1]))


def test_upload_starts_from_the_beginning_when_the_server_says_so():
    """The staged copy's manifest differs (fedserver: ABORTED '...; start from the beginning'): resuming
    again would be refused again; the device sends the update from its start."""
    state = big_state()
    server = ResumingServer(state, refuse_resume="task t: the resumed upload's manifest differs from the staged "
                                                 "one; start from the beginning")
    reply, stats = upload(server, pb.UploadHeader(task_id="t"), state, SPEC, Limits(stall_s=0), no_wait,
                          resume=True)
    assert reply.complete
    assert server.calls[0] is not None and server.calls[1:] == [None], "one refused resume, then from the start"


def test_upload_retry_budget_is_bounded_whatever_the_bytes_sent():
    """Every attempt hands chunks to gRPC, none is ever acknowledged: the retries run out."""
    state = big_state()
    server = ResumingServer(state, fail=grpc.StatusCode.DATA_LOSS)
    with pytest.raises(grpc.RpcError) as err:
        upload(server, pb.UploadHeader(task_id="t"), state, SPEC, Limits(retries=3, stall_s=0), no_wait)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert len(server.calls) <= 5


def test_upload_attempts_are_capped_in_all_even_with_progress():
    """Each attempt gets one more chunk acknowledged, then breaks: progress, but the attempts in all are capped
    (by default 64: a link that breaks that often within one update is not worth a longer fight)."""
    state = big_state()
    spec = TransferSpec(chunk_elems=256, block_size=64)  # 161 chunks
    server = ResumingServer(state, fail=grpc.StatusCode.INTERNAL, ack_one_per_attempt=True, spec=spec)
    with pytest.raises(grpc.RpcError):
        upload(server, pb.UploadHeader(task_id="t"), state, spec, Limits(retries=3, stall_s=0), no_wait)
    assert len(server.calls) == 65


# ------------------------------------------- 5. a busy server, a lost session
def test_load_daemon_waits_out_a_busy_server_until_the_task_deadline(make_daemon):
    """12 RESOURCE_EXHAUSTED answers (more than transfer_retries) to a finished update: it is delivered."""
    daemon = make_daemon(state_dir=False)
    server = FakeServer(TINY.state_dict(), [train_task()])
    server.upload_failures = [RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "256 RPCs in flight")] * 12
    assert daemon._serve(server) is True
    assert len(server.uploads) == 13 and server.held_all and len(server.metrics) == 1


def test_load_busy_retries_are_bounded_again_past_the_deadline():
    state = big_state()
    server = FakeServer()
    server.upload_failures = [RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")] * 12
    with pytest.raises(grpc.RpcError):
        upload(server, pb.UploadHeader(task_id="t"), state, SPEC,
               Limits(retries=8, stall_s=0, until=time.monotonic() - 1), no_wait)
    assert len(server.uploads) == 9, "past the deadline the server no longer waits for the update"


def test_load_daemon_keeps_a_finished_update_across_a_lost_session(make_daemon):
    """Without a state dir: 'no session, call Join again' while uploading; the update is kept in memory and
    delivered after the rejoin, not dropped."""
    daemon = make_daemon(state_dir=False)
    server = FakeServer(TINY.state_dict(), [train_task()])
    server.upload_failures = [RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, "device 'dev-t' has no session "
                                         "'s' here (not joined, or the server restarted): call Join again")]
    with pytest.raises(grpc.RpcError):
        daemon._serve(server)  # the daemon's loop would join again here
    daemon._deliver_pending(server)
    assert len(server.uploads) == 2 and len(server.metrics) == 1
    assert server.metrics[0].task_id == "task-1" and server.metrics[0].bytes_up > 0


def test_load_daemon_drops_an_update_the_server_refused_as_invalid(make_daemon, caplog):
    """INVALID_ARGUMENT on an upload (a manifest or an update the server will never take) drops the update once,
    in one line; it is not re-sent in a loop of rejoins."""
    daemon = make_daemon(state_dir=False)
    server = FakeServer(TINY.state_dict(), [train_task()])
    server.upload_failures = [RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "upload manifest rejected: tensor 'x' "
                                         "is outside this device's plan for round 1")]
    daemon._serve(server)
    assert len(server.uploads) == 1 and not server.metrics
    assert daemon._unsent is None
    assert "dropping the update" in caplog.text and "outside this device's plan" in caplog.text


# ----------------------------------------------------------- 3. partial download
@pytest.mark.parametrize("damage", ["log names chunks never written", "log names a chunk outside the model",
                                    "manifest garbage"])
def test_durable_damaged_partial_download_is_downloaded_again(tmp_path, caplog, damage):
    state = big_state()
    store = StateDir(tmp_path).downloads

    first = FakeServer(state)
    first.download_limit = 4
    first.enc = StateEncoder(state, SPEC, digest=digest(state))
    first.manifest.CopyFrom(first.enc.manifest)
    with pytest.raises(grpc.RpcError):
        download(first, "d", "s", "v", None, Limits(retries=0, stall_s=0), no_wait, store=store)
    (d,) = (tmp_path / "download").iterdir()
    if damage == "log names chunks never written":
        names = [e.name for e in unique_tensors(state)]
        marks = [f"{names.index(c.tensor)} {c.offset // SPEC.chunk_elems}\n" for c in first.enc.chunks()]
        (d / "chunks.log").write_text("".join(marks))  # every chunk "verified", most never written
    elif damage == "log names a chunk outside the model":
        with open(d / "chunks.log", "a") as f:
            f.write("7 12345\n")
    else:
        (d / "manifest.pb").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    caplog.set_level(logging.WARNING)
    again = FakeServer(state)
    again.enc = StateEncoder(state, SPEC, digest=digest(state))
    again.manifest.CopyFrom(again.enc.manifest)
    got, _ = download(again, "d", "s", "v", None, Limits(stall_s=0), no_wait, store=StateDir(tmp_path).downloads)
    assert digest(got) == digest(state), "a fresh download after the damaged partial"
    assert again.downloads[-1] is None, "the last request starts from the beginning"
    assert StateDir(tmp_path).downloads.cached()[0] == digest(state)


def test_durable_second_digest_mismatch_is_one_line_not_a_crash(make_daemon, caplog):
    """A fresh download that fails its digest (the server's or the link's fault): one error line, the task
    dropped, the daemon goes on serving."""
    daemon = make_daemon(state_dir=True)
    server = FakeServer(TINY.state_dict(), [train_task()], bad_digest=True)
    caplog.set_level(logging.WARNING)
    assert daemon._serve(server) is True, "back to polling; the server then ended the run"
    assert server.uploads == []
    errors = [m for m in warnings_of(caplog, logging.ERROR)]
    assert len(errors) == 1 and "failed its check" in errors[0]
    assert len(server.downloads) == 1, "no download loop"


# ------------------------------------------------- 4. figures of an acked upload
class Killed(BaseException):
    """The daemon is killed here."""


def test_metrics_acknowledged_upload_figures_survive_a_kill_before_the_report(tmp_path, make_daemon):
    first = make_daemon()
    server = FakeServer(TINY.state_dict(), [train_task()])

    def killed(req, timeout=None):
        raise Killed()
    server.ReportMetrics = killed
    with pytest.raises(Killed):
        first._serve(server)
    assert server.held_all, "the server acknowledged the update before the kill"
    second = make_daemon()
    again = FakeServer()
    again.held_all = True
    second._deliver_pending(again)
    (m,) = again.metrics
    assert again.uploads == [], "nothing sent twice"
    assert m.bytes_up > 0 and m.t_up_s > 0, "the first process's measured figures, not zeros"
    assert "upload_figures_lost" not in m.extra and m.extra["upload_attempts"] == 1.0


def test_metrics_figures_lost_in_a_kill_are_reported_unknown_not_zero(tmp_path, make_daemon):
    """Killed after the last bytes left but before the figures were written: reported as lost."""
    save_pending(tmp_path / "state", big_state())
    daemon = make_daemon()
    server = FakeServer()
    server.held_all = True
    daemon._deliver_pending(server)
    (m,) = server.metrics
    assert m.extra["upload_figures_lost"] == 1.0 and m.bytes_up == 0 and m.t_up_s == 0


# ------------------------------------------------------------- 6. a full disk
def test_disk_full_state_dir_leaves_transfers_in_memory(tmp_path, make_daemon, monkeypatch, caplog):
    import fedclient.statedir as statedir
    import fedcore.tensorfile as tensorfile

    real = tensorfile.map_tensors

    def full(path, layout, create=False):
        if create:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, layout, create)
    monkeypatch.setattr(statedir, "map_tensors", full)
    monkeypatch.setattr(tensorfile, "map_tensors", full)  # write_tensors' own call
    daemon = make_daemon()
    server = FakeServer(TINY.state_dict(), [train_task()])
    caplog.set_level(logging.WARNING)
    assert daemon._serve(server) is True
    assert server.held_all and len(server.metrics) == 1, "downloaded, trained and delivered from memory"
    lines = [m for m in warnings_of(caplog) if "cannot hold" in m]
    assert len(lines) == 2, lines
    assert all(str(tmp_path / "state") in m and "MB needed" in m for m in lines)
    assert not (tmp_path / "state" / "upload").exists(), "no half-written update left behind"


# ------------------------------------------------------------- 7. bad tasks
BAD = {
    "learning_rate nan": dict(learning_rate=math.nan),
    "learning_rate inf": dict(learning_rate=math.inf),
    "learning_rate 0": dict(learning_rate=0.0),
    "learning_rate negative": dict(learning_rate=-1e-3),
    "weight_decay negative": dict(weight_decay=-0.1),
    "batch_size 0": dict(batch_size=0),
    "max_input_tokens 0": dict(max_input_tokens=0),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_config_task_with_unusable_training_settings_is_refused(make_daemon, caplog, what):
    daemon = make_daemon(state_dir=False)
    task = train_task(**BAD[what])
    server = FakeServer(TINY.state_dict(), [task, task])
    caplog.set_level(logging.WARNING)
    assert daemon._serve(server) is True, "the daemon keeps serving"
    assert server.downloads == [] and server.uploads == [], "refused before any transfer or training"
    errors = warnings_of(caplog, logging.ERROR)
    assert len(errors) == 1 and what.split()[0] in errors[0], "one line naming the setting, also when handed twice"


@pytest.mark.parametrize("what", ["encoding", "codec", "chunk_elems"])
def test_config_task_with_unusable_upload_settings_is_refused(make_daemon, caplog, what):
    daemon = make_daemon(state_dir=False)
    task = train_task()
    setattr(task.upload, what, 99 if what != "chunk_elems" else 0)
    server = FakeServer(TINY.state_dict(), [task])
    caplog.set_level(logging.WARNING)
    assert daemon._serve(server) is True
    assert server.downloads == [] and server.uploads == []
    assert len(warnings_of(caplog, logging.ERROR)) == 1


def test_config_absurd_work_and_lora_settings_are_refused():
    from fedclient.daemon import plan_work

    cfg = ClientConfig(device_id="d", insecure=True)
    for bad in (dict(local_steps=10**9), dict(local_steps=0, local_epochs=0), dict(local_samples=-1)):
        with pytest.raises(ValueError):
            plan_work(train_task(**bad), cfg)
    task = train_task()
    task.training.lora.CopyFrom(pb.LoraSettings(rank=4, alpha=math.nan, target_modules=["q"]))
    with pytest.raises(ValueError, match="alpha"):
        plan_work(task, cfg)
    assert plan_work(train_task(), cfg).settings.learning_rate == pytest.approx(1e-3)
    assert plan_work(train_task(seed=(1 << 64) - 1), cfg).settings.seed < 1 << 64, "a seed torch accepts"

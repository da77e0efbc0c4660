"""Model transfers from the device's side: resumable download and upload over gRPC."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import grpc
import torch

from fedcore.channel import UPLOAD_RESTART_HINT
from fedcore.methods.zeroorder import SeedPairs, replay
from fedcore.wire import StateEncoder, StateReceiver, TransferSpec, WireError, digest
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from .statedir import DownloadStore

log = logging.getLogger("fedclient.transfer")

# Worth retrying: the link or the server went away, or a chunk was damaged.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
# The server is busy or out of reach for a while: a finished update waits it out until its task's deadline
# (`Limits.until`) instead of counting these against the retries.
BUSY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class GaveUp(grpc.RpcError):
    """A transfer out of attempts without an error of its own (the server kept answering 'incomplete')."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.ABORTED

    def details(self) -> str:
        return self._details


@dataclass
class TransferStats:
    seconds: float = 0.0
    bytes: int = 0
    wait_s: float = 0.0  # upload: last chunk handed to gRPC -> server's reply
    attempts: int = 0
    bytes_resent: int = 0  # upload: bytes of chunks sent again after a break (sender-side count)
    stalls: int = 0  # attempts the watchdog cancelled for lack of progress
    version: str = ""    # download: the version now held
    exact: bool = False  # download: bit-exact (lossless encoding, or a digest-checked delta)
    deltas: int = 0      # download: broadcast deltas applied
    patched: bool = False  # download: only the tensors that changed (LoRA's B) arrived, applied to the held version
    replayed: int = 0    # download: rounds of zero-order seeds replayed onto the held version
    replay_s: float = 0.0  # download: seconds spent replaying them (computation, not in `seconds`)

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Limits:
    """Bounds of one transfer: retries, stall watchdog, and a deadline that scales with the bytes.

    A fixed timeout either kills a big transfer on a slow link or waits far
    too long on a dead one. The per-attempt deadline is instead
    `max(floor_s, safety * bytes_left / rate)` with the device's measured
    rate (none until a transfer was measured), and a call that moves no
    chunk for `stall_s` is cancelled and resumed: TCP alone would sit out a
    dead link for minutes.
    """
    retries: int = 8  # attempts in a row without progress (upload: without a chunk newly acknowledged)
    max_attempts: int = 64  # upload: failed attempts in all, whatever the progress (busy waits before `until` aside)
    until: float | None = None  # upload: time.monotonic() until which a BUSY server is waited for (None: no wait)
    stall_s: float = 60.0
    floor_s: float = 60.0
    safety: float = 3.0
    rate_bps: float | None = None  # bytes per second, measured
    pace_bps: float = 0.0  # upload: send no faster than this (bytes/s; 0: as fast as the link takes)

    def deadline(self, nbytes: int) -> float | None:
        if not self.rate_bps or nbytes <= 0:
            return None
        return max(self.floor_s, self.safety * nbytes / self.rate_bps)


class Watchdog:
    """Calls `cancel` when `poke` was not called for `stall_s` seconds."""

    def __init__(self, stall_s: float, cancel: Callable[[], object]) -> None:
        self.stall_s, self.cancel = stall_s, cancel
        self.last = time.monotonic()
        self.fired = False
        self._done = threading.Event()
        if stall_s > 0:
            threading.Thread(target=self._run, daemon=True, name="transfer-watchdog").start()

    def poke(self) -> None:
        self.last = time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(min(1.0, self.stall_s / 4)):
            if time.monotonic() - self.last > self.stall_s:
                self.fired = True
                self.cancel()
                return

    def close(self) -> None:
        self._done.set()


class Progress:
    """Logs a transfer's progress at most every few seconds; `on_update` hears of every chunk."""

    def __init__(self, what: str, total: int, every_s: float = 5.0,
                 on_update: Callable[[int], None] | None = None) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.on_update = on_update
        self.t0 = self.last = time.monotonic()

    def update(self, done: int) -> None:
        if self.on_update is not None:
            self.on_update(done)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = done / max(now - self.t0, 1e-9) / 1e6
            of = f" of {self.total / 1e6:.1f} MB" if self.total else ""
            log.info("%s: %.1f MB%s at %.2f MB/s", self.what, done / 1e6, of, rate)


# A server keeps a bounded number of deltas; more steps than this is a server bug, not a long chain.
MAX_DELTA_STEPS = 64


def fetch(stub: pbg.FederationStub, device_id: str, session_id: str, version: str,
          held: Mapping[str, torch.Tensor] | None, held_version: str, limits: Limits,
          backoff: Callable[[int], None], store: DownloadStore | None = None, expect_bytes: int = 0,
          on_progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Bring the device to model `version`: broadcast deltas from `held` (exactly `held_version`) when the
    server offers them, otherwise the full model. A delta that fails its digest check falls back to the full model.

    `store` persists full-model downloads only (see `download`)."""
    total = TransferStats()
    state, have = held, held_version if held is not None else ""
    for _ in range(MAX_DELTA_STEPS):
        try:
            state_, st = download(stub, device_id, session_id, version, None, limits, backoff,
                                  base=state if have else None, base_version=have, store=store,
                                  expect_bytes=expect_bytes, on_progress=on_progress)
        except WireError as exc:
            # "base": what arrived does not fit the held version (names, shapes); like a failed digest, the
            # held copy is no use for this version, but the full model still is.
            if not have or exc.kind not in ("digest", "base", "payload"):
                raise
            log.warning("download against the held %s... (delta or patch) failed its check (%s); fetching the full "
                        "model", have[7:19], exc)
            state, have = None, ""
            continue
        total.seconds += st.seconds
        total.bytes += st.bytes
        total.attempts += st.attempts
        total.stalls += st.stalls
        total.deltas += st.deltas
        total.replayed += st.replayed
        total.replay_s += st.replay_s
        total.patched = total.patched or st.patched
        state, have, total.exact = state_, st.version, st.exact
        if have == version:
            total.version = have
            return state, total
        if not st.exact:
            raise WireError("digest", f"the server sent {have[:19]}... lossily, not the version {version[:19]}... "
                                      f"asked for")
    raise WireError("delta", f"no version {version[:19]}... after {MAX_DELTA_STEPS} delta steps")


def download(stub: pbg.FederationStub, device_id: str, session_id: str, version: str,
             dest: Mapping[str, torch.Tensor] | None, limits: Limits, backoff: Callable[[int], None],
             encoding: int = pb.ENCODING_UNSPECIFIED, codec: int = pb.CODEC_UNSPECIFIED,
             store: DownloadStore | None = None, expect_bytes: int = 0,
             base: Mapping[str, torch.Tensor] | None = None, base_version: str = "",
             on_progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Stream model `version` into dest (or into `store` on disk), resuming after breaks and restarts.

    With `base` (exactly `base_version`) the server may answer with a delta to
    the next version instead; the returned stats say which version arrived.
    Only full models go to `store`: a delta is a fraction of the model and
    needs its base in memory anyway, so a delta interrupted by a restart is
    fetched again (from the base kept in `store`, if the server still has the
    steps), while a break within one process resumes it from memory.
    """
    stats = TransferStats()
    receiver: StateReceiver | None = None
    disk: DownloadStore | None = None  # `store`, once the manifest says this is a full model
    from_disk = False  # the receiver started from chunks a previous process kept
    t0 = time.perf_counter()
    failures = 0
    while True:
        stats.attempts += 1
        start = receiver.next_position() if receiver is not None else None
        if receiver is not None and start is None:
            try:
                return _finish_download(receiver, disk, base, stats, t0)  # the disk held every chunk
            except WireError as exc:
                if not _download_again(exc, from_disk):
                    raise
                receiver, disk, from_disk = None, None, False
                continue
        held_before = receiver.bytes_received if receiver is not None else 0
        req = pb.DownloadRequest(device_id=device_id, session_id=session_id, model_version=version,
                                 encoding=encoding, codec=codec, base_version=base_version if base else "")
        if start is not None:
            req.start.CopyFrom(start)
        left = (receiver.manifest.wire_bytes if receiver is not None else expect_bytes) - held_before
        stream = stub.Download(req, timeout=limits.deadline(left), wait_for_ready=True)
        dog = Watchdog(limits.stall_s, stream.cancel)
        try:
            progress: Progress | None = None
            for msg in stream:
                dog.poke()
                if msg.WhichOneof("body") == "replay":
                    if base is None or receiver is not None:
                        raise WireError("payload", "the server sent a seed replay, but this device holds no model "
                                                   "or is receiving one")
                    return _replayed(msg, base, base_version, stats, t0)
                if msg.WhichOneof("body") == "manifest":
                    m = msg.manifest
                    if receiver is None:
                        if m.base_version and (base is None or m.base_version != base_version):
                            raise WireError("payload", f"the server sent a delta from {m.base_version[:19]}..., "
                                                       f"this device holds {base_version[:19] or 'nothing'}")
                        # A delta decodes into fresh tensors, then adds to base; a full model goes in place.
                        disk = None if m.base_version else store
                        receiver, disk, from_disk = _receiver(m, disk, None if m.base_version else dest)
                        if from_disk:
                            # Resumed from disk: ask again from the first chunk not held.
                            raise _Restart()
                    elif (m.digest, m.base_version) != (receiver.manifest.digest, receiver.manifest.base_version):
                        raise WireError("digest", "the server changed model version during a resumed download")
                    progress = Progress(f"download {version[7:19]}", m.wire_bytes, on_update=on_progress)
                    continue
                if receiver is None:
                    raise WireError("manifest", "download stream did not start with a manifest")
                ti, k = receiver.accept(msg.chunk)
                if disk is not None:
                    disk.record(ti, k)
                if progress:
                    progress.update(receiver.bytes_received)
            if receiver is None:
                raise WireError("manifest", "empty download stream")
            return _finish_download(receiver, disk, base, stats, t0)
        except _Restart:
            stream.cancel()
            continue
        except WireError as exc:
            # Chunks kept by a previous process may be damaged where the log says verified (a torn write,
            # a damaged log): the digest catches it, and the discarded partial is downloaded afresh, once.
            if not _download_again(exc, from_disk):
                raise
            receiver, disk, from_disk = None, None, False
            stream.cancel()
            continue
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if dog.fired:
                stats.stalls += 1
            progressed = receiver is not None and receiver.bytes_received > held_before
            failures = 1 if progressed else failures + 1
            if code not in RETRYABLE or failures > limits.retries:
                raise
            log.warning("download broke (%s%s); resuming at %s", "no progress for %.0f s, " % limits.stall_s
                        if dog.fired else "", f"{code.name}: {exc.details()}",  # type: ignore[attr-defined]
                        _pos(receiver.next_position() if receiver else None))
            backoff(failures)
        finally:
            dog.close()


def _replayed(msg: pb.DownloadMessage, base: Mapping[str, torch.Tensor], base_version: str, stats: TransferStats,
              t0: float) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """The version a seed replay leads to; the transfer's time and the replay's computation apart."""
    stats.seconds = time.perf_counter() - t0
    stats.bytes = msg.ByteSize()
    t1 = time.perf_counter()
    state, version = replay(base, msg.replay, base_version)
    stats.replay_s = time.perf_counter() - t1
    stats.version, stats.exact, stats.replayed = version, True, len(msg.replay.rounds)
    log.info("replayed %d round(s) of seeds (%d directions) onto %s... in %.2f s: digest checked",
             stats.replayed, sum(len(r.seeds) for r in msg.replay.rounds), base_version[7:19], stats.replay_s)
    return state, stats


def _download_again(exc: WireError, from_disk: bool) -> bool:
    """Whether a failed download is worth one fresh start: its chunks came from a previous process's disk."""
    if not (from_disk and exc.kind == "digest"):
        return False
    log.warning("the download resumed from disk failed its digest check (%s); the partial was discarded, "
                "downloading again from the start", exc)
    return True


def _receiver(m: pb.Manifest, disk: DownloadStore | None, dest: Mapping[str, torch.Tensor] | None
              ) -> tuple[StateReceiver, DownloadStore | None, bool]:
    """A receiver for a full model (or delta) `m`, primed with the chunks `disk` kept; the store still in use
    (None: receive in memory) and whether chunks came from disk."""
    if disk is None:
        return StateReceiver(m, dest=dest), None, False
    into, held = disk.prepare(m)
    if into is None:  # the state dir cannot hold it (logged): in memory
        return StateReceiver(m, dest=dest), None, False
    receiver = StateReceiver(m, dest=into)
    try:
        for ti, k in held:
            receiver.mark_held(ti, k)
    except WireError as exc:
        log.warning("partial download in %s: its chunk log is damaged (%s); starting again", disk.dir, exc)
        into, held = disk.prepare(m, fresh=True)
        if into is None:
            return StateReceiver(m, dest=dest), None, False
        receiver = StateReceiver(m, dest=into)
    return receiver, disk, bool(held)


def _finish_download(receiver: StateReceiver, store: DownloadStore | None, base: Mapping[str, torch.Tensor] | None,
                     stats: TransferStats, t0: float) -> tuple[dict[str, torch.Tensor], TransferStats]:
    # A manifest with a base version applies to the held model: a broadcast delta, or a patch of some tensors.
    is_delta = bool(receiver.manifest.base_version)
    try:
        state = receiver.finish(verify_digest=True, base=base if is_delta else None)
    except WireError:
        if store is not None:
            store.discard()  # what is on disk is wrong: never resume from it again
        raise
    stats.seconds = time.perf_counter() - t0
    stats.bytes = receiver.bytes_received
    stats.version = receiver.manifest.digest
    stats.exact = is_delta or receiver.lossless
    stats.patched = is_delta and receiver.manifest.payload == pb.WEIGHTS
    stats.deltas = int(is_delta and not stats.patched)
    if store is not None:
        # Lossless: the manifest's digest was just verified; lossy: what is kept is hashed for the restart check.
        verified = receiver.lossless and bool(receiver.manifest.digest)
        store.complete(receiver.manifest.digest if verified else digest(state), exact=stats.exact)
    return state, stats


class _Restart(Exception):
    """Internal: the download found chunks on disk and starts a new stream after them."""


def upload(stub: pbg.FederationStub, header: pb.UploadHeader, state: Mapping[str, torch.Tensor],
           spec: TransferSpec, limits: Limits, backoff: Callable[[int], None], resume: bool = False,
           on_progress: Callable[[int], None] | None = None) -> tuple[pb.UploadReply, TransferStats]:
    """Stream an update; after a break (or with `resume`, after a restart) ask the server where to resume.

    The retries are bounded whatever the bytes sent: only a chunk the server newly acknowledges (its resume
    point moves on) is progress, and `limits.max_attempts` caps the failed attempts in all. A server that is
    busy or out of reach (BUSY) is waited out with backoff until `limits.until`, not counted: a finished
    update is not dropped because the server was loaded for a while."""
    encoder = StateEncoder(state, spec)
    header.manifest.CopyFrom(encoder.manifest)
    stats = TransferStats()
    budget = _Budget(limits)
    start: pb.Position | None = None
    if resume:
        known = _resume_point(stub, header)
        if known is not None:
            start, done = known
            if done:
                return pb.UploadReply(complete=True, digest=encoder.manifest.digest), stats
            budget.acked = _key(start)
    t0 = time.perf_counter()
    ever_sent: set[tuple[str, int]] = set()
    while True:
        stats.attempts += 1
        sent = {"bytes": 0, "at": 0.0}
        h = pb.UploadHeader()
        h.CopyFrom(header)
        if start is not None:
            h.start.CopyFrom(start)
        progress = Progress("upload", encoder.manifest.wire_bytes, on_update=on_progress)
        t_attempt = time.perf_counter()
        # The watchdog exists before the call: gRPC may pull the first chunks before `future` returns.
        call: list[grpc.Future] = []
        dog = Watchdog(limits.stall_s, lambda: call[0].cancel() if call else None)

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=h)
            for chunk in encoder.chunks(start):
                # Counted when handed to gRPC: a chunk lost in flight after this is a re-send next time.
                n = len(chunk.payload) + len(chunk.scales)
                key = (chunk.tensor, chunk.offset)
                if key in ever_sent:
                    stats.bytes_resent += n
                ever_sent.add(key)
                sent["bytes"] += n
                if limits.pace_bps:
                    ahead = t_attempt + sent["bytes"] / limits.pace_bps - time.perf_counter()
                    if ahead > 0:
                        time.sleep(ahead)
                dog.poke()
                progress.update(sent["bytes"])
                yield pb.UploadMessage(chunk=chunk)
            sent["at"] = time.perf_counter()

        future = stub.Upload.future(messages(), timeout=limits.deadline(encoder.manifest.wire_bytes - _done_bytes(
            encoder, start)), wait_for_ready=True)
        call.append(future)
        if dog.fired:  # stalled before the call was known
            future.cancel()
        try:
            reply = future.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as exc:
            code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.CANCELLED  # type: ignore
            details = exc.details() if isinstance(exc, grpc.RpcError) else "cancelled"  # type: ignore
            stats.bytes += sent["bytes"]
            if dog.fired:
                stats.stalls += 1
            if code not in RETRYABLE:
                raise
            log.warning("upload broke (%s%s); %s", "no progress for %.0f s, " % limits.stall_s if dog.fired else "",
                        f"{code.name}: {details}", budget.failed(code))
            if budget.spent_whatever_happens():
                raise  # no progress could save the budget: give up now rather than after a backoff
            backoff(budget.attempt)
            if code == grpc.StatusCode.ABORTED and UPLOAD_RESTART_HINT in (details or ""):
                # What the server staged does not fit this update: asking it where to resume would only
                # repeat the refusal. The fresh start replaces the staged copy.
                log.info("upload: sending task %s again from its start, as the server asks", header.task_id[:8])
                start, budget.acked = None, None
                budget.check(exc)
                continue
            known = _resume_point(stub, header)
            if known is not None:
                start, done = known
                if done:
                    stats.seconds = time.perf_counter() - t0
                    return pb.UploadReply(complete=True, digest=encoder.manifest.digest), stats
                budget.heard(start)
            budget.check(exc)  # unknown resume point: the next attempt starts where this one did
            continue
        finally:
            dog.close()
        done_at = time.perf_counter()
        stats.bytes += sent["bytes"]
        if reply.complete:
            stats.seconds = (sent["at"] or done_at) - t0
            stats.wait_s = done_at - (sent["at"] or done_at)
            return reply, stats
        # The stream ended with the update incomplete at the server: resume where it says.
        start = reply.next if reply.HasField("next") else None
        budget.failed(grpc.StatusCode.ABORTED)
        budget.heard(start)
        budget.check(GaveUp(f"upload incomplete after {stats.attempts} attempts; the server holds up to "
                            f"{_pos(start)}"))


def upload_seeds(stub: pbg.FederationStub, header: pb.UploadHeader, state: Mapping[str, torch.Tensor],
                 limits: Limits, backoff: Callable[[int], None], resume: bool = False
                 ) -> tuple[pb.UploadReply, TransferStats]:
    """Send a zero-order update (its pairs in tensor form) as one message; retried whole, as the chunked
    upload is, within the same budget. After a restart the server is asked first whether it holds it."""
    h = pb.UploadHeader()
    h.CopyFrom(header)
    SeedPairs.from_tensors(state).to_proto(h.seeds)
    stats = TransferStats()
    if resume:
        known = _resume_point(stub, header)
        if known is not None and known[1]:
            return pb.UploadReply(complete=True), stats
    budget = _Budget(limits)
    size = pb.UploadMessage(header=h).ByteSize()
    t0 = time.perf_counter()
    while True:
        stats.attempts += 1
        try:
            reply = stub.Upload(iter([pb.UploadMessage(header=h)]), timeout=limits.deadline(size) or limits.floor_s,
                                wait_for_ready=True)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            stats.bytes += size
            if stats.attempts > 1:
                stats.bytes_resent += size
            if code not in RETRYABLE:
                raise
            log.warning("seed upload failed (%s: %s); %s", code.name, exc.details(),  # type: ignore[attr-defined]
                        budget.failed(code))
            known = _resume_point(stub, header)
            if known is not None and known[1]:
                stats.seconds = time.perf_counter() - t0
                return pb.UploadReply(complete=True), stats
            budget.check(exc)
            backoff(budget.attempt)
            continue
        stats.bytes += size
        if stats.attempts > 1:
            stats.bytes_resent += size
        # One message: handing it over and the server's answer cannot be told apart; all of it is the upload.
        stats.seconds = time.perf_counter() - t0
        return reply, stats


class _Budget:
    """An upload's retry budget: failures in a row without a newly acknowledged chunk, failed attempts in all,
    and for a busy server the task's deadline instead of a count."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.failures = 0  # in a row, without a chunk newly acknowledged
        self.counted = 0  # failed attempts in all (busy ones before `until` aside)
        self.busy = 0  # busy failures in a row, for the backoff
        self.waiting = False  # the last failure was a busy server, waited out until `until`
        self.acked: tuple[int, int] | None = None  # the furthest resume point the server named

    def failed(self, code: grpc.StatusCode) -> str:
        """Count a failed attempt; the log's words for what comes next."""
        until = self.limits.until
        self.waiting = code in BUSY and until is not None and time.monotonic() < until
        if self.waiting:
            self.busy += 1
            return f"the update is kept, retrying until the task's deadline ({until - time.monotonic():.0f} s left)"
        self.busy = 0
        self.failures += 1
        self.counted += 1
        return "asking the server where to resume"

    @property
    def attempt(self) -> int:
        """The backoff's attempt number."""
        return self.busy if self.waiting else self.failures

    def heard(self, position: pb.Position | None) -> None:
        """The server's resume point: one beyond any it named before is real progress."""
        key = _key(position)
        if key is not None and (self.acked is None or key > self.acked):
            self.acked = key
            self.failures = min(self.failures, 1)

    def spent_whatever_happens(self) -> bool:
        """Spent even if the server names a new resume point (heard() lowers failures to 1 at most)."""
        return not self.waiting and (min(self.failures, 1) > self.limits.retries
                                     or self.counted > self.limits.max_attempts)

    def check(self, exc: BaseException) -> None:
        """Raise `exc` when the budget is spent."""
        if not self.waiting and (self.failures > self.limits.retries or self.counted > self.limits.max_attempts):
            raise exc


def _key(position: pb.Position | None) -> tuple[int, int] | None:
    return None if position is None else (position.tensor_index, position.offset)


def _done_bytes(encoder: StateEncoder, start: pb.Position | None) -> int:
    """Wire bytes before `start` (exact without compression, an estimate with it)."""
    if start is None or not encoder.manifest.wire_bytes:
        return 0
    total = sum(e.tensor.numel() for e in encoder.entries) or 1
    before = sum(e.tensor.numel() for e in encoder.entries[:start.tensor_index]) + start.offset
    return encoder.manifest.wire_bytes * before // total


def _resume_point(stub: pbg.FederationStub, header: pb.UploadHeader) -> tuple[pb.Position | None, bool] | None:
    """Where the server wants the upload to continue (None: the start) and whether it already holds all of
    it; None when the server could not be asked (the caller keeps its own idea)."""
    try:
        st = stub.UploadStatus(pb.UploadStatusRequest(device_id=header.device_id, session_id=header.session_id,
                                                      task_id=header.task_id), timeout=30)
    except grpc.RpcError as exc:
        if exc.code() in RETRYABLE:  # type: ignore[attr-defined]
            return None
        raise
    return (st.next if st.known and st.HasField("next") else None), st.complete


def _pos(p: pb.Position | None) -> str:
    return "the start" if p is None else f"tensor {p.tensor_index} offset {p.offset}"

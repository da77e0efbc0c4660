"""Model transfers from the device's side: resumable download and upload over gRPC."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import grpc
import torch

from fedcore.wire import StateEncoder, StateReceiver, TransferSpec, WireError
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

log = logging.getLogger("fedclient.transfer")

# Worth retrying: the link or the server went away, or a chunk was damaged.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.DATA_LOSS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


@dataclass
class TransferStats:
    seconds: float = 0.0
    bytes: int = 0
    wait_s: float = 0.0  # upload: last chunk handed to gRPC -> server's reply
    attempts: int = 0
    version: str = ""    # download: the version now held
    exact: bool = False  # download: bit-exact (lossless encoding, or a digest-checked delta)
    deltas: int = 0      # download: broadcast deltas applied

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


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
          held: Mapping[str, torch.Tensor] | None, held_version: str, retries: int,
          backoff: Callable[[int], None], timeout: float | None = None,
          on_progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Bring the device to model `version`: broadcast deltas from `held` (exactly `held_version`) when the
    server offers them, otherwise the full model. A delta that fails its digest check falls back to the full model."""
    total = TransferStats()
    state, have = held, held_version if held is not None else ""
    for _ in range(MAX_DELTA_STEPS):
        try:
            state_, st = download(stub, device_id, session_id, version, None, retries, backoff, timeout,
                                  base=state if have else None, base_version=have, on_progress=on_progress)
        except WireError as exc:
            if not have or exc.kind != "digest":
                raise
            log.warning("delta download from %s... failed its check (%s); fetching the full model", have[7:19], exc)
            state, have = None, ""
            continue
        total.seconds += st.seconds
        total.bytes += st.bytes
        total.attempts += st.attempts
        total.deltas += st.deltas
        state, have, total.exact = state_, st.version, st.exact
        if have == version:
            total.version = have
            return state, total
        if not st.exact:
            raise WireError("digest", f"the server sent {have[:19]}... lossily, not the version {version[:19]}... "
                                      f"asked for")
    raise WireError("delta", f"no version {version[:19]}... after {MAX_DELTA_STEPS} delta steps")


def download(stub: pbg.FederationStub, device_id: str, session_id: str, version: str,
             dest: Mapping[str, torch.Tensor] | None, retries: int, backoff: Callable[[int], None],
             timeout: float | None = None, encoding: int = pb.ENCODING_UNSPECIFIED,
             codec: int = pb.CODEC_UNSPECIFIED, base: Mapping[str, torch.Tensor] | None = None,
             base_version: str = "",
             on_progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], TransferStats]:
    """Stream model `version` into dest (written in place), resuming after breaks.

    With `base` (exactly `base_version`) the server may answer with a delta to
    the next version instead; the returned stats say which version arrived.
    """
    stats = TransferStats()
    receiver: StateReceiver | None = None
    t0 = time.perf_counter()
    while True:
        stats.attempts += 1
        start = receiver.next_position() if receiver is not None else None
        req = pb.DownloadRequest(device_id=device_id, session_id=session_id, model_version=version,
                                 encoding=encoding, codec=codec, base_version=base_version if base else "")
        if start is not None:
            req.start.CopyFrom(start)
        try:
            stream = stub.Download(req, timeout=timeout)
            progress: Progress | None = None
            for msg in stream:
                if msg.WhichOneof("body") == "manifest":
                    m = msg.manifest
                    if receiver is None:
                        if m.base_version and (base is None or m.base_version != base_version):
                            raise WireError("payload", f"the server sent a delta from {m.base_version[:19]}..., "
                                                       f"this device holds {base_version[:19] or 'nothing'}")
                        receiver = StateReceiver(m, dest=None if m.base_version else dest)
                    elif (m.digest, m.base_version) != (receiver.manifest.digest, receiver.manifest.base_version):
                        raise WireError("digest", "the server changed model version during a resumed download")
                    progress = Progress(f"download {version[7:19]}", msg.manifest.wire_bytes,
                                        on_update=on_progress)
                    continue
                if receiver is None:
                    raise WireError("manifest", "download stream did not start with a manifest")
                receiver.accept(msg.chunk)
                if progress:
                    progress.update(receiver.bytes_received)
            if receiver is None:
                raise WireError("manifest", "empty download stream")
            is_delta = bool(receiver.manifest.base_version)
            state = receiver.finish(verify_digest=True, base=base if is_delta else None)
            stats.seconds = time.perf_counter() - t0
            stats.bytes = receiver.bytes_received
            stats.version = receiver.manifest.digest
            stats.exact = is_delta or receiver.lossless
            stats.deltas = int(is_delta)
            return state, stats
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code not in RETRYABLE or stats.attempts > retries:
                raise
            log.warning("download broke (%s: %s); resuming at %s", code.name, exc.details(),  # type: ignore
                        _pos(receiver.next_position() if receiver else None))
            backoff(stats.attempts)


def upload(stub: pbg.FederationStub, header: pb.UploadHeader, state: Mapping[str, torch.Tensor],
           spec: TransferSpec, retries: int, backoff: Callable[[int], None],
           timeout: float | None = None,
           on_progress: Callable[[int], None] | None = None) -> tuple[pb.UploadReply, TransferStats]:
    """Stream an update; after a break ask the server what it holds and resume there."""
    encoder = StateEncoder(state, spec)
    header.manifest.CopyFrom(encoder.manifest)
    stats = TransferStats()
    start: pb.Position | None = None
    t0 = time.perf_counter()
    while True:
        stats.attempts += 1
        sent = {"bytes": 0, "at": 0.0}
        h = pb.UploadHeader()
        h.CopyFrom(header)
        if start is not None:
            h.start.CopyFrom(start)
        progress = Progress("upload", encoder.manifest.wire_bytes, on_update=on_progress)

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=h)
            for chunk in encoder.chunks(start):
                yield pb.UploadMessage(chunk=chunk)
                sent["bytes"] += len(chunk.payload) + len(chunk.scales)
                progress.update(sent["bytes"])
            sent["at"] = time.perf_counter()

        try:
            reply = stub.Upload(messages(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            stats.bytes += sent["bytes"]
            if code not in RETRYABLE or stats.attempts > retries:
                raise
            log.warning("upload broke (%s: %s); asking the server where to resume", code.name,
                        exc.details())  # type: ignore[attr-defined]
            backoff(stats.attempts)
            start = _resume_point(stub, header)
            continue
        done = time.perf_counter()
        stats.bytes += sent["bytes"]
        if reply.complete:
            stats.seconds = (sent["at"] or done) - t0
            stats.wait_s = done - (sent["at"] or done)
            return reply, stats
        if stats.attempts > retries:
            raise RuntimeError(f"upload incomplete after {stats.attempts} attempts; server holds up to "
                               f"{_pos(reply.next)}")
        start = reply.next


def _resume_point(stub: pbg.FederationStub, header: pb.UploadHeader) -> pb.Position | None:
    try:
        st = stub.UploadStatus(pb.UploadStatusRequest(device_id=header.device_id, session_id=header.session_id,
                                                      task_id=header.task_id), timeout=30)
    except grpc.RpcError:
        return None
    return st.next if st.known and st.HasField("next") else None


def _pos(p: pb.Position | None) -> str:
    return "the start" if p is None else f"tensor {p.tensor_index} offset {p.offset}"

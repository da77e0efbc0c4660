"""gRPC in and out: checks each request, calls the coordinator, maps errors to status codes."""
from __future__ import annotations

import errno
import logging
import math
import random
import socket
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import fedcore
from fedcore.channel import CHANNEL_OPTIONS
from fedcore.wire import WireError
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from .auth import DEVICE_ID, gatekeeper_for, server_credentials
from .rounds import Coordinator, RoundError, UpdateRefused
from .status import device_page, status_message

log = logging.getLogger("fedserver.service")

_ROUND_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "permission": grpc.StatusCode.PERMISSION_DENIED,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "aborted": grpc.StatusCode.ABORTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}
_WIRE_CODES = {"checksum": grpc.StatusCode.DATA_LOSS, "digest": grpc.StatusCode.DATA_LOSS}


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, RoundError):
        context.abort(_ROUND_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
    if isinstance(exc, WireError):
        context.abort(_WIRE_CODES.get(exc.kind, grpc.StatusCode.INVALID_ARGUMENT), f"{exc.kind}: {exc}")
    raise exc


def _check_device(device_id: str, context: grpc.ServicerContext) -> None:
    if not DEVICE_ID.match(device_id):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"device_id {device_id[:40]!r} must be 1-128 characters of letters, digits and ._:-")


class FederationService(pbg.FederationServicer):
    def __init__(self, coord: Coordinator, poll_threads: int) -> None:
        self.coord = coord
        # Until a poll stops costing a thread, only this many threads may wait in GetTask: the rest stay
        # free for uploads, downloads and joins however many devices are polling.
        self._poll_slots = threading.BoundedSemaphore(max(1, poll_threads))

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        _check_device(request.device_id, context)
        caps = request.capabilities
        info = {"accelerator": caps.accelerator, "memory_bytes": caps.memory_bytes,
                "software_version": caps.software_version, "cpu_count": caps.cpu_count,
                "peer": context.peer(), "cached_version": request.cached_version[:80]}
        if caps.HasField("budgets"):
            b = caps.budgets
            if min(b.memory_bytes, b.compute_flops, b.upload_bytes, b.head_fraction) < 0 or b.head_fraction > 1 \
                    or not math.isfinite(b.compute_flops) or not math.isfinite(b.head_fraction):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "capabilities.budgets: budgets must be finite and "
                                                                ">= 0, head_fraction at most 1")
            info["budgets"] = {"memory_bytes": b.memory_bytes, "compute_flops": b.compute_flops,
                               "upload_bytes": b.upload_bytes, "head_fraction": b.head_fraction,
                               "memory_source": b.memory_source[:32]}
        try:
            dev = self.coord.join(request.device_id, request.num_samples, info)
        except RoundError as exc:
            _abort(context, exc)
        return pb.JoinReply(session_id=dev.session_id, model_preset=self.coord.model_preset,
                            model_config_json=self.coord.model_config_json,
                            poll_seconds=self.coord.cfg.poll_seconds, server_version=fedcore.__version__,
                            base_version=self.coord.model.initial_version)

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> pb.Task:
        _check_device(request.device_id, context)
        timeout = float(self.coord.cfg.poll_seconds)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - 1.0))
        held = self._poll_slots.acquire(blocking=False)
        try:
            # Over the limit the poll is answered at once (a task, SHUTDOWN, or WAIT) and its thread freed.
            task = self.coord.next_task(request.device_id, request.session_id, timeout if held else 0.0)
        except RoundError as exc:
            _abort(context, exc)
            raise
        finally:
            if held:
                self._poll_slots.release()
        if not held and task.kind == pb.Task.WAIT:
            # Jittered, so devices sent away together do not come back together.
            task.retry_after_ms = int(1000 * max(1.0, self.coord.cfg.poll_seconds) * random.uniform(0.5, 1.0))
        return task

    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadMessage]:
        _check_device(request.device_id, context)
        try:
            enc = self.coord.encoder_for(request.device_id, request.session_id, request.model_version,
                                         request.encoding, request.codec, request.base_version)
            if isinstance(enc, pb.SeedReplay):
                yield from self._replay(request, enc)
                return
            start = request.start if request.HasField("start") else None
            chunks = enc.chunks(start)
        except (RoundError, WireError) as exc:
            _abort(context, exc)
            raise
        cur = self.coord.current
        board = self.coord.transfers
        t = board.begin(request.device_id, "down", cur.number if cur is not None else self.coord.round_no,
                        enc.manifest.wire_bytes)
        try:
            yield pb.DownloadMessage(manifest=enc.manifest)
            for chunk in chunks:
                self.coord.note_sent(request.device_id, request.model_version or enc.manifest.digest,
                                     enc.manifest.base_version, chunk)
                yield pb.DownloadMessage(chunk=chunk)
                board.add(t, len(chunk.payload) + len(chunk.scales))
        except WireError as exc:
            _abort(context, exc)
        finally:
            board.end(t)

    def _replay(self, request: pb.DownloadRequest, replay: pb.SeedReplay) -> Iterator[pb.DownloadMessage]:
        """A zero-order run's download to a device holding a version: one message of seeds."""
        cur = self.coord.current
        msg = pb.DownloadMessage(replay=replay)
        board = self.coord.transfers
        t = board.begin(request.device_id, "down", cur.number if cur is not None else self.coord.round_no,
                        msg.ByteSize())
        try:
            yield msg
            board.add(t, msg.ByteSize())
        finally:
            board.end(t)

    def Upload(self, request_iterator: Iterator[pb.UploadMessage], context: grpc.ServicerContext) -> pb.UploadReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("body") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload stream must start with an UploadHeader")
        header = first.header
        _check_device(header.device_id, context)
        if header.HasField("seeds"):
            return self._take_seeds(header, request_iterator, context)
        try:
            sess = self.coord.open_upload(header)
        except RoundError as exc:
            _abort(context, exc)
            raise
        if not sess.stream_lock.acquire(blocking=False):
            # The device resumed, so from its side the older stream is dead; after a link drop the
            # server may not notice that for a keepalive period. The newer stream takes over.
            old = sess.context
            if old is not None:
                old.cancel()
            if not sess.stream_lock.acquire(timeout=10.0):
                context.abort(grpc.StatusCode.ABORTED, f"another stream is still uploading task {header.task_id}")
        sess.context = context
        start = (header.start.tensor_index, header.start.offset) if header.HasField("start") else (0, 0)
        nxt = sess.receiver.next_position()
        if start != (0, 0) and (nxt is None or (nxt.tensor_index, nxt.offset) != start):
            # The superseded stream delivered more while it was being cancelled.
            sess.stream_lock.release()
            context.abort(grpc.StatusCode.ABORTED, f"the server now holds task {header.task_id} up to "
                                                   f"{'the end' if nxt is None else (nxt.tensor_index, nxt.offset)}; "
                                                   f"ask UploadStatus")
        board = self.coord.transfers
        t = board.begin(header.device_id, "up", header.round, header.manifest.wire_bytes,
                        done=sess.receiver.bytes_received)
        try:
            for msg in request_iterator:
                if msg.WhichOneof("body") != "chunk":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the upload header")
                try:
                    sess.charge(msg.chunk)
                except UpdateRefused as exc:
                    self.coord.refuse_upload(sess, str(exc), exc.code)
                before = sess.receiver.bytes_received
                try:
                    sess.receiver.accept(msg.chunk)
                except WireError as exc:
                    if exc.kind == "value":  # NaN/Inf: the update itself is bad, not its transport
                        self.coord.refuse_upload(sess, f"{exc}")
                    raise
                board.add(t, sess.receiver.bytes_received - before, done=sess.receiver.bytes_received)
            nxt = sess.receiver.next_position()
            r = sess.receiver
            if nxt is not None:
                # The stream ended early: keep what was verified so the device can resume.
                return pb.UploadReply(complete=False, chunks_received=r.chunks_received,
                                      bytes_received=r.bytes_received, next=nxt)
            digest = self.coord.finish_upload(sess)
            return pb.UploadReply(complete=True, chunks_received=r.chunks_received,
                                  bytes_received=r.bytes_received, digest=digest)
        except WireError as exc:
            log.warning("upload from %s rejected: %s", header.device_id, exc)
            if exc.kind not in ("checksum",):
                self.coord.abandon_upload(sess)
            _abort(context, exc)
            raise
        except RoundError as exc:
            self.coord.abandon_upload(sess)
            _abort(context, exc)
            raise
        finally:
            board.end(t)
            sess.stream_lock.release()

    def _take_seeds(self, header: pb.UploadHeader, rest: Iterator[pb.UploadMessage],
                    context: grpc.ServicerContext) -> pb.UploadReply:
        """A zero-order update: the header carries all of it; nothing may follow."""
        if header.HasField("manifest") or header.HasField("start"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a seed update carries no manifest and no resume point")
        if next(rest, None) is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "nothing may follow an UploadHeader carrying seeds")
        board = self.coord.transfers
        size = header.seeds.ByteSize()
        t = board.begin(header.device_id, "up", header.round, size)
        try:
            digest = self.coord.take_seeds(header)
            board.add(t, size, done=size)
        except RoundError as exc:
            _abort(context, exc)
            raise
        finally:
            board.end(t)
        return pb.UploadReply(complete=True, chunks_received=0, bytes_received=size, digest=digest)

    def UploadStatus(self, request: pb.UploadStatusRequest, context: grpc.ServicerContext) -> pb.UploadStatusReply:
        _check_device(request.device_id, context)
        try:
            known, nxt, complete = self.coord.upload_status(request.device_id, request.session_id, request.task_id)
        except RoundError as exc:
            _abort(context, exc)
            raise
        reply = pb.UploadStatusReply(known=known, complete=complete)
        if nxt is not None:
            reply.next.CopyFrom(nxt)
        return reply

    def ReportMetrics(self, request: pb.RoundMetrics, context: grpc.ServicerContext) -> pb.MetricsAck:
        _check_device(request.device_id, context)
        for name in ("t_down_s", "t_up_s", "t_wait_s", "t_comp_s"):
            v = getattr(request, name)
            if not 0 <= v < 1e7:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}={v} is not a duration in seconds")
        for key, v in request.extra.items():
            if not (len(key) <= 64 and math.isfinite(v) and 0 <= v < 1e30):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"extra[{key[:64]!r}]={v} is not a finite, non-negative figure")
        for name, limit in (("power_source", 32), ("hardware", 128)):
            text = getattr(request, name)
            if len(text) > limit or not text.isprintable():
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{name} must be printable text of at most {limit} characters")
        st = request.step_times
        m = {
            "round": request.round, "task_id": request.task_id, "t_down_s": request.t_down_s,
            "t_up_s": request.t_up_s, "t_wait_s": request.t_wait_s, "t_comp_s": request.t_comp_s,
            "bytes_down": request.bytes_down, "bytes_up": request.bytes_up, "tokens": request.tokens,
            "train_loss": request.train_loss, "download_cached": request.download_cached,
            "step_times": {"batch_loading_s": st.batch_loading_s, "forward_s": st.forward_s, "loss_s": st.loss_s,
                           "backward_s": st.backward_s, "optimizer_step_s": st.optimizer_step_s,
                           "steps": st.steps},
            "extra": dict(request.extra), "power_source": request.power_source, "hardware": request.hardware,
        }
        try:
            self.coord.report_metrics(request.device_id, request.session_id, m)
        except RoundError as exc:
            _abort(context, exc)
        return pb.MetricsAck()

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.ServerStatus:
        coord = self.coord
        try:
            with coord.lock:
                page = device_page(coord.registry, request.devices_after, request.devices_page_size,
                                   coord.clock.monotonic())
        except ValueError as exc:  # a page the request cannot have
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return status_message(coord.snapshot(), *page)


def make_server(coord: Coordinator, listen: str, max_workers: int) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not yet started) server bound to listen; returns the bound port.

    TLS and the gatekeeper come from coord.cfg; every service added to this
    server goes through the gatekeeper. Idle long polls may hold at most half
    of the max_workers threads. A port another process holds is an OSError.
    """
    cfg = coord.cfg
    options = [(k, cfg.max_message_bytes if k == "grpc.max_receive_message_length" else v)
               for k, v in CHANNEL_OPTIONS]
    # gRPC sets SO_REUSEPORT by default: a second server on a held port would start and take half the devices.
    options.append(("grpc.so_reuseport", 0))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                         options=options, maximum_concurrent_rpcs=max_workers * 4,
                         interceptors=[gatekeeper_for(cfg)])
    pbg.add_FederationServicer_to_server(FederationService(coord, max_workers // 2), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    creds = server_credentials(cfg)
    if creds is None:
        log.warning("serving PLAINTEXT gRPC on %s (insecure = true): no TLS, and any caller may claim any "
                    "device id", listen)
    port = _bind(server, listen, creds)
    for name in ("", "fedtune.v1.Federation"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def _bind(server: grpc.Server, listen: str, creds: grpc.ServerCredentials | None) -> int:
    """Bind exactly the port listen names; anything else (in use, out of range, another port) is an error."""
    want = _listen_port(listen)
    # A plain socket asks first, so a port in use is one clear error rather than a gRPC core log line.
    refusal = _bind_refusal(listen, want) if want else None
    if refusal is None:
        try:
            port = server.add_insecure_port(listen) if creds is None else server.add_secure_port(listen, creds)
        except RuntimeError:  # grpcio raises on a failed bind; older versions returned 0
            port = 0
        if port and want and port != want:
            raise OSError(f"cannot listen on {listen}: gRPC bound port {port} instead")
        if port:
            return port
        refusal = _bind_refusal(listen, want) if want else None
    if refusal is not None and refusal.errno == errno.EADDRINUSE:
        raise OSError(f"cannot listen on {listen}: address already in use (another fedserver or another program "
                      f"holds port {want})")
    raise OSError(f"cannot listen on {listen}: "
                  f"{(refusal.strerror or str(refusal)) if refusal is not None else 'gRPC could not bind it'}")


def _listen_port(listen: str) -> int | None:
    """The port of host:port (0: any free port; None: a unix socket); out of 0-65535 is refused here."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return None
    _, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen {listen!r} must be host:port with a port from 0 to 65535 (0: any free port)")
    return int(port)


def _bind_refusal(listen: str, port: int) -> OSError | None:
    """Why the kernel refuses to bind listen's address (None: it would bind), asked with a plain socket."""
    host = listen.rpartition(":")[0].strip("[]") or None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            s.bind(addr)
    except OSError as exc:
        return exc
    return None

"""gRPC in and out (grpc.aio): checks each request, calls the coordinator, maps errors to status codes."""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import math
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import fedcore
from fedcore.channel import CHANNEL_OPTIONS, JOIN_TIMEOUT_S
from fedcore.wire import WireError
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from .auth import DEVICE_ID, gatekeeper_for, server_credentials
from .config import ServerConfig
from .rounds import Coordinator, RoundError, UpdateRefused, UploadSession
from .status import device_page, status_message

log = logging.getLogger("fedserver.service")

T = TypeVar("T")

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


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    if isinstance(exc, RoundError):
        await context.abort(_ROUND_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), str(exc))
    if isinstance(exc, WireError):
        await context.abort(_WIRE_CODES.get(exc.kind, grpc.StatusCode.INVALID_ARGUMENT), f"{exc.kind}: {exc}")
    raise exc


async def _check_device(device_id: str, context: grpc.aio.ServicerContext) -> None:
    if not DEVICE_ID.match(device_id):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"device_id {device_id[:40]!r} must be 1-128 characters of letters, digits and ._:-")


async def _take(lock: threading.Lock, timeout: float) -> bool:
    """Acquire a thread lock from the loop without blocking it; a cancelled wait holds nothing."""
    end = asyncio.get_running_loop().time() + timeout
    while not lock.acquire(blocking=False):
        if asyncio.get_running_loop().time() >= end:
            return False
        await asyncio.sleep(0.02)
    return True


async def _settle(fut: asyncio.Future) -> None:
    """Wait until pool work is done, through any further cancellations (the caller re-raises the first);
    its error, if any, is the caller's to ignore: retrieved here so that it is not logged as lost."""
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError:
            continue
    if not fut.cancelled():
        fut.exception()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """loop.call_soon_threadsafe from any thread; nothing once the server's loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the server stopped: nobody is waiting any more
        pass


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _Ahead:
    """A generator's next item made in the pool while the caller sends the current one."""

    def __init__(self, pool: futures.ThreadPoolExecutor, gen: Iterator[T]) -> None:
        self._pool, self._gen = pool, gen
        self._fut = self._start()

    def _start(self) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._pool, next, self._gen, None)

    async def next(self) -> Any:
        """The next item (None after the last); the one after it is started at once."""
        item = await asyncio.shield(self._fut)
        if item is not None:
            self._fut = self._start()
        return item

    async def close(self) -> None:
        """Wait for work in flight, so the generator is never left running in a thread (a cancelled call)."""
        await _settle(self._fut)


class _Stream:
    """What an upload session holds of the stream feeding it: a way for a newer stream to end it."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.replaced = False

    def cancel(self) -> None:
        """From any thread (the intake calls it in the pool): the older stream stops at its next await and
        says why."""
        if self.replaced:
            return  # one cancellation: a second would cut short the older stream's wait for its pool work
        self.replaced = True
        if self.task is not None:
            _call_soon(self.loop, self.task.cancel)


class FederationService(pbg.FederationServicer):
    """The handlers run on the server's event loop: a poll waiting for work is a future, not a thread.

    Calls that only take the coordinator's lock for a short critical section
    (join, poll, upload status, metrics) run on the loop when the lock is
    free (`_quick`): handing each to a thread costs more than the call, and
    dozens of threads contending for the lock and the GIL during a fleet's
    join storm cost far more (docs/explanation/fleet-scale.md). When the lock
    is held (a round opening, a model being committed) they wait in the pool,
    never on the loop. Work that blocks or computes (opening and finishing an
    upload, encoding and verifying chunks, the status snapshot) runs in the
    pool via `_blocking`.
    """

    def __init__(self, coord: Coordinator, pool: futures.ThreadPoolExecutor) -> None:
        self.coord = coord
        self.pool = pool

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the pool. A cancelled call (the client went away) still waits for fn to return, so
        nothing it touches (an upload's receiver, a chunk generator) is used by two threads at once."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await _settle(fut)
            raise

    async def _quick(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args), a call that takes the coordinator's lock briefly: on the loop when the lock is free,
        else in the pool, so a long holder (a round opening, a model committed) never stalls the loop."""
        lock = self.coord.lock
        if lock.acquire(blocking=False):
            try:
                return fn(*args)  # the lock is reentrant: fn takes it again without waiting
            finally:
                lock.release()
        return await self._blocking(fn, *args)

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        await _check_device(request.device_id, context)
        caps = request.capabilities
        info = {"accelerator": caps.accelerator, "memory_bytes": caps.memory_bytes,
                "software_version": caps.software_version, "cpu_count": caps.cpu_count,
                "peer": context.peer(), "cached_version": request.cached_version[:80]}
        if caps.HasField("budgets"):
            b = caps.budgets
            if min(b.memory_bytes, b.compute_flops, b.upload_bytes, b.head_fraction) < 0 or b.head_fraction > 1 \
                    or not math.isfinite(b.compute_flops) or not math.isfinite(b.head_fraction):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "capabilities.budgets: budgets must be finite "
                                                                      "and >= 0, head_fraction at most 1")
            info["budgets"] = {"memory_bytes": b.memory_bytes, "compute_flops": b.compute_flops,
                               "upload_bytes": b.upload_bytes, "head_fraction": b.head_fraction,
                               "memory_source": b.memory_source[:32]}
        try:
            dev = await self._quick(self.coord.join, request.device_id, request.num_samples, info)
        except RoundError as exc:
            await _abort(context, exc)
        return pb.JoinReply(session_id=dev.session_id, model_preset=self.coord.model_preset,
                            model_config_json=self.coord.model_config_json,
                            poll_seconds=self.coord.cfg.poll_seconds, server_version=fedcore.__version__,
                            base_version=self.coord.model.initial_version)

    async def GetTask(self, request: pb.TaskRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        """Answered at once when there is news, else held (a future, no thread) until there is or the poll ends."""
        await _check_device(request.device_id, context)
        loop = asyncio.get_running_loop()
        timeout = float(self.coord.cfg.poll_seconds)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - 1.0))
        end = loop.time() + timeout
        wakeups = self.coord.wakeups
        while True:
            woken = loop.create_future()
            wake = functools.partial(_call_soon, loop, _resolve, woken)
            # Watched before asking, so a round opening between the two is not missed.
            wakeups.watch(request.device_id, wake)
            try:
                task = await self._quick(self.coord.poll_task, request.device_id, request.session_id)
                if task is not None:
                    return task
                left = end - loop.time()
                if left <= 0:
                    return pb.Task(kind=pb.Task.WAIT, retry_after_ms=0)
                timer = loop.call_later(left, _resolve, woken)  # the poll's end: asked once more, then WAIT
                try:
                    await woken
                finally:
                    timer.cancel()
            except RoundError as exc:
                await _abort(context, exc)
            finally:
                wakeups.unwatch(request.device_id, wake)

    async def Download(self, request: pb.DownloadRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadMessage]:
        await _check_device(request.device_id, context)
        try:
            enc = await self._blocking(self.coord.encoder_for, request.device_id, request.session_id,
                                       request.model_version, request.encoding, request.codec, request.base_version)
            if isinstance(enc, pb.SeedReplay):
                async for msg in self._replay(request, enc):
                    yield msg
                return
            start = request.start if request.HasField("start") else None
            chunks = enc.chunks(start)
        except (RoundError, WireError) as exc:
            await _abort(context, exc)
        cur = self.coord.current
        board = self.coord.transfers
        t = board.begin(request.device_id, "down", cur.number if cur is not None else self.coord.round_no,
                        enc.manifest.wire_bytes)
        # Encoding a chunk (quantizing, compressing, its CRC) is CPU work: in the pool, one chunk ahead of
        # the one being sent.
        ahead = _Ahead(self.pool, chunks)
        try:
            yield pb.DownloadMessage(manifest=enc.manifest)
            while (chunk := await ahead.next()) is not None:
                self.coord.note_sent(request.device_id, request.model_version or enc.manifest.digest,
                                     enc.manifest.base_version, chunk)
                yield pb.DownloadMessage(chunk=chunk)
                board.add(t, len(chunk.payload) + len(chunk.scales))
        except WireError as exc:
            await _abort(context, exc)
        finally:
            await ahead.close()
            board.end(t)

    async def _replay(self, request: pb.DownloadRequest,
                      replay: pb.SeedReplay) -> AsyncIterator[pb.DownloadMessage]:
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

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadMessage],
                     context: grpc.aio.ServicerContext) -> pb.UploadReply:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("body") != "header":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload stream must start with an UploadHeader")
        header = first.header
        await _check_device(header.device_id, context)
        if header.HasField("seeds"):
            return await self._take_seeds(header, messages, context)
        try:
            sess = await self._blocking(self.coord.open_upload, header)
        except RoundError as exc:
            await _abort(context, exc)
        if not sess.stream_lock.acquire(blocking=False):
            # The device resumed, so from its side the older stream is dead; after a link drop the
            # server may not notice that for a keepalive period. The newer stream takes over.
            old = sess.context
            if old is not None:
                old.cancel()
            if not await _take(sess.stream_lock, 10.0):
                await context.abort(grpc.StatusCode.ABORTED,
                                    f"another stream is still uploading task {header.task_id}")
        stream = sess.context = _Stream()
        try:
            start = (header.start.tensor_index, header.start.offset) if header.HasField("start") else (0, 0)
            nxt = sess.receiver.next_position()
            if start != (0, 0) and (nxt is None or (nxt.tensor_index, nxt.offset) != start):
                # The superseded stream delivered more while it was being cancelled.
                await context.abort(grpc.StatusCode.ABORTED,
                                    f"the server now holds task {header.task_id} up to "
                                    f"{'the end' if nxt is None else (nxt.tensor_index, nxt.offset)}; "
                                    f"ask UploadStatus")
            return await self._receive(sess, header, messages, context)
        except asyncio.CancelledError:
            if not stream.replaced:
                raise  # the device went away: nobody to answer
            await context.abort(grpc.StatusCode.ABORTED, f"task {header.task_id}: this upload was replaced by a "
                                                         f"newer stream from the device")
        finally:
            sess.stream_lock.release()

    async def _receive(self, sess: UploadSession, header: pb.UploadHeader, messages: AsyncIterator[pb.UploadMessage],
                       context: grpc.aio.ServicerContext) -> pb.UploadReply:
        """The chunks of an upload whose stream holds the session: verified and staged until the stream ends."""
        board = self.coord.transfers
        t = board.begin(header.device_id, "up", header.round, header.manifest.wire_bytes,
                        done=sess.receiver.bytes_received)
        try:
            async for msg in messages:
                if msg.WhichOneof("body") != "chunk":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the upload header")
                before = sess.receiver.bytes_received
                await self._blocking(self._accept, sess, msg.chunk)
                board.add(t, sess.receiver.bytes_received - before, done=sess.receiver.bytes_received)
            nxt = sess.receiver.next_position()
            r = sess.receiver
            if nxt is not None:
                # The stream ended early: keep what was verified so the device can resume.
                return pb.UploadReply(complete=False, chunks_received=r.chunks_received,
                                      bytes_received=r.bytes_received, next=nxt)
            digest = await self._blocking(self.coord.finish_upload, sess)
            return pb.UploadReply(complete=True, chunks_received=r.chunks_received,
                                  bytes_received=r.bytes_received, digest=digest)
        except WireError as exc:
            log.warning("upload from %s rejected: %s", header.device_id, exc)
            if exc.kind not in ("checksum",):
                self.coord.abandon_upload(sess)
            await _abort(context, exc)
        except RoundError as exc:
            self.coord.abandon_upload(sess)
            await _abort(context, exc)
        finally:
            board.end(t)

    def _accept(self, sess: UploadSession, chunk: pb.Chunk) -> None:
        """Charge, verify and stage one chunk (in the pool: checksums, decompression and disk writes)."""
        try:
            sess.charge(chunk)
        except UpdateRefused as exc:
            self.coord.refuse_upload(sess, str(exc), exc.code)
        try:
            sess.receiver.accept(chunk)
        except WireError as exc:
            if exc.kind == "value":  # NaN/Inf: the update itself is bad, not its transport
                self.coord.refuse_upload(sess, f"{exc}")
            raise

    async def _take_seeds(self, header: pb.UploadHeader, rest: AsyncIterator[pb.UploadMessage],
                          context: grpc.aio.ServicerContext) -> pb.UploadReply:
        """A zero-order update: the header carries all of it; nothing may follow."""
        if header.HasField("manifest") or header.HasField("start"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "a seed update carries no manifest and no resume point")
        if await anext(rest, None) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "nothing may follow an UploadHeader carrying seeds")
        board = self.coord.transfers
        size = header.seeds.ByteSize()
        t = board.begin(header.device_id, "up", header.round, size)
        try:
            digest = await self._blocking(self.coord.take_seeds, header)
            board.add(t, size, done=size)
        except RoundError as exc:
            await _abort(context, exc)
        finally:
            board.end(t)
        return pb.UploadReply(complete=True, chunks_received=0, bytes_received=size, digest=digest)

    async def UploadStatus(self, request: pb.UploadStatusRequest,
                           context: grpc.aio.ServicerContext) -> pb.UploadStatusReply:
        await _check_device(request.device_id, context)
        try:
            known, nxt, complete = await self._quick(self.coord.upload_status, request.device_id,
                                                     request.session_id, request.task_id)
        except RoundError as exc:
            await _abort(context, exc)
        reply = pb.UploadStatusReply(known=known, complete=complete)
        if nxt is not None:
            reply.next.CopyFrom(nxt)
        return reply

    async def ReportMetrics(self, request: pb.RoundMetrics, context: grpc.aio.ServicerContext) -> pb.MetricsAck:
        await _check_device(request.device_id, context)
        for name in ("t_down_s", "t_up_s", "t_wait_s", "t_comp_s"):
            v = getattr(request, name)
            if not 0 <= v < 1e7:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}={v} is not a duration in seconds")
        for key, v in request.extra.items():
            if not (len(key) <= 64 and math.isfinite(v) and 0 <= v < 1e30):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"extra[{key[:64]!r}]={v} is not a finite, non-negative figure")
        for name, limit in (("power_source", 32), ("hardware", 128)):
            text = getattr(request, name)
            if len(text) > limit or not text.isprintable():
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
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
            await self._quick(self.coord.report_metrics, request.device_id, request.session_id, m)
        except RoundError as exc:
            await _abort(context, exc)
        return pb.MetricsAck()

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ServerStatus:
        try:
            return await self._blocking(self._status, request)
        except ValueError as exc:  # a page the request cannot have
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _status(self, request: pb.StatusRequest) -> pb.ServerStatus:
        coord = self.coord
        with coord.lock:
            page = device_page(coord.registry, request.devices_after, request.devices_page_size,
                               coord.clock.monotonic())
        return status_message(coord.snapshot(), *page)


def server_options(cfg: ServerConfig) -> list[tuple[str, Any]]:
    """The gRPC core options the server is built with (bench.grpc_floor builds a bare server with the same)."""
    options: list[tuple[str, Any]] = [(k, cfg.max_message_bytes if k == "grpc.max_receive_message_length" else v)
                                      for k, v in CHANNEL_OPTIONS]
    # gRPC sets SO_REUSEPORT by default: a second server on a held port would start and take half the devices.
    options.append(("grpc.so_reuseport", 0))
    # gRPC core queues calls the Python server has not picked up yet and sheds them (the caller sees
    # CANCELLED) beyond 1,000 to 3,000 of them or after 30 s in the queue: a fleet joining at once is a
    # longer queue than that, and its devices wait JOIN_TIMEOUT_S for their Join. The bound that matters
    # is max_rpcs.
    backlog = cfg.max_rpcs or 1_000_000
    options += [("grpc.server.max_pending_requests", backlog),
                ("grpc.server.max_pending_requests_hard_limit", backlog),
                ("grpc.server_max_unrequested_time_in_server", int(JOIN_TIMEOUT_S))]
    return options


class RpcServer:
    """The grpc.aio server, on an event loop of its own thread, started and stopped from any other thread.

    Idle long polls are futures on that loop (no thread each); blocking work
    runs in a pool of max_workers threads. TLS and the gatekeeper come from
    coord.cfg; every service added goes through the gatekeeper.
    """

    def __init__(self, coord: Coordinator, listen: str, max_workers: int) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        self.pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc")
        self.health = health.aio.HealthServicer()
        try:
            self.server, self.port = self._call(self._build(coord, listen))
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coro: Any, timeout: float | None = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _build(self, coord: Coordinator, listen: str) -> tuple[grpc.aio.Server, int]:
        cfg = coord.cfg
        server = grpc.aio.server(options=server_options(cfg), maximum_concurrent_rpcs=cfg.max_rpcs or None,
                                 interceptors=[gatekeeper_for(cfg)])
        pbg.add_FederationServicer_to_server(FederationService(coord, self.pool), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        creds = server_credentials(cfg)
        if creds is None:
            log.warning("serving PLAINTEXT gRPC on %s (insecure = true): no TLS, and any caller may claim any "
                        "device id", listen)
        port = _bind(server, listen, creds)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return server, port

    async def _set_health(self, status: int) -> None:
        for name in ("", "fedtune.v1.Federation"):
            await self.health.set(name, status)

    def start(self) -> None:
        self._call(self.server.start())

    def not_serving(self, wait: bool = True) -> None:
        """Health checks answer NOT_SERVING (the run is over, stopped or failed); calls are still answered.
        wait=False from a signal handler: the loop may be waiting for a lock the interrupted thread holds."""
        fut = asyncio.run_coroutine_threadsafe(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING),
                                               self.loop)
        if wait:
            fut.result()

    def stop(self, grace: float | None) -> None:
        """Stop serving: calls in flight get `grace` seconds to finish; then the loop and its thread end."""
        if not self.loop.is_closed():
            try:
                self._call(self._stop(grace))
            finally:
                self._close_loop()

    async def _stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        # Whatever is left (a handler waiting for pool work) ends here, its finally blocks run, before
        # the loop closes.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            self.loop.close()


def make_server(coord: Coordinator, listen: str, max_workers: int) -> RpcServer:
    """A ready (not yet started) server bound to listen; its port is `.port`. A port another process holds is
    an OSError."""
    return RpcServer(coord, listen, max_workers)


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

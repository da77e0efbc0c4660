"""Load a real `fedserver run` with a fleet of lightweight devices and measure what each fleet size costs.

    python -m bench.fleet_load --devices 100,1000,10000 --rounds 2 [--procs 4] [--devices-per-channel 1]
                               [--devices-per-round 10] [--round-deadline-s 30] [--timeout-s 300]
                               [--server-arg=--max-workers=64 ...] [--server-logs DIR]
                               [--server-cpus 0 --device-cpus 1] [--no-floor] [--json]

For each N: one `fedserver run` process (tiny preset, plaintext on
127.0.0.1, a temporary run directory), and N devices spread over a few
processes, each an asyncio loop sharing a few `grpc.aio` channels. Every
device Joins (retrying refusals), long-polls GetTask, and when sampled
downloads the model and uploads the same weights back as its update through
the real Download/Upload streams. Prints one row per N: devices joined,
refusals by status code, task hand-out latency, rounds completed, the
server's peak RSS and CPU seconds, and RSS/CPU per idle device relative to
the first (smallest) N. Every wait is bounded: a fleet the server cannot
hold is reported, not waited for.

Hand-out latency is measured from the round's start, which every TRAIN task
carries exactly (deadline_unix - round_deadline_s while deadlines are not
derived from estimates), to the moment the device's GetTask returned it.

Columns: `join refused` / `GetTask refused` count refused calls by status
code (a refused Join is retried with backoff, so `joined` can still reach N);
`handed` is TRAIN tasks received / (device, round) pairs the server's log
says it sampled; `sent away` counts polls answered WAIT at once because the
server's long-poll slots were full; `idle RSS` is sampled when round 1 is
sampled (fleet connected, no transfer yet); KB and ms per idle device are
(this row - first row) / (extra joined devices).

Each device has a connection of its own by default, as in a real fleet: a
connection costs the server memory of its own in gRPC core. Sharing
connections (--devices-per-channel N) leaves the per-call cost alone; a
plaintext server knows a caller only by its peer address, so its per-device
rate and stream limits then apply per connection.

Last, unless --no-floor, bench.grpc_floor measures a bare grpc.aio server
built with the same options at the first and last N, and one line sets
fedserver's KB per idle device beside that floor: what fedserver adds, and
what gRPC itself costs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench._procs import raise_fd_limit
from bench.grpc_floor import FloorResult
from bench.grpc_floor import measure as measure_floor
from bench.grpc_floor import slope_kb as floor_slope_kb

SAMPLED = re.compile(r"round (\d+): sampled (.*?); policy")


@dataclass
class FleetSettings:
    """One fleet against one server."""
    devices: int
    rounds: int = 2
    devices_per_round: int = 10
    round_deadline_s: float = 30.0
    poll_seconds: int = 60         # the server's default
    procs: int = 4
    devices_per_channel: int = 1   # a connection per device, as a real fleet has
    min_frac: float = 1.0          # share of the fleet that must be connected before round 1 starts
    timeout_s: float = 0.0         # 0: derived from the settings
    server_args: list[str] = field(default_factory=list)
    server_cpus: tuple[int, ...] = ()  # CPUs the server may run on (empty: any)
    device_cpus: tuple[int, ...] = ()  # CPUs the devices' processes may run on (empty: any)

    def limit_s(self) -> float:
        if self.timeout_s:
            return self.timeout_s
        # Server start, joins (slower as N grows), the rounds, and the end-of-run drain.
        return 60.0 + self.devices / 100.0 + self.rounds * (self.round_deadline_s + 10.0) + self.poll_seconds


@dataclass
class FleetResult:
    """What one fleet saw; latencies in seconds."""
    devices: int
    joined: int = 0
    join_refused: dict[str, int] = field(default_factory=dict)    # status code -> refused Join calls
    poll_refused: dict[str, int] = field(default_factory=dict)    # status code -> refused GetTask calls
    transfer_failed: dict[str, int] = field(default_factory=dict)  # status code -> failed Download/Upload
    upload_retried: dict[str, int] = field(default_factory=dict)   # status code -> Upload calls sent again
    polls_sent_away: int = 0       # WAIT at once with retry_after_ms: the server's long-poll slots were full
    sampled: int = 0               # (device, round) pairs the server's log says it sampled
    handed_out: int = 0            # TRAIN tasks the devices received
    uploaded: int = 0              # updates the server acknowledged as complete
    handout_p50_s: float = math.nan
    handout_p99_s: float = math.nan
    handout_max_s: float = math.nan
    handout_p99_by_round: dict[int, float] = field(default_factory=dict)
    rounds_completed: int = 0
    rounds_total: int = 0
    shutdown_seen: int = 0         # devices told SHUTDOWN: the run ended for them cleanly
    server_peak_rss_mb: float = math.nan
    server_idle_rss_mb: float = math.nan  # sampled once the fleet joined, before round 1's hand-out
    server_cpu_s: float = math.nan
    server_exit: int | None = None
    wall_s: float = 0.0
    timed_out: bool = False
    notes: list[str] = field(default_factory=list)
    first_refusals: dict[str, str] = field(default_factory=dict)  # "RPC CODE" -> what the first one said


# ------------------------------------------------------------------ devices

def _code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    try:
        return code().name if callable(code) else type(exc).__name__
    except Exception:  # an aio error without a status yet
        return type(exc).__name__


def _first(out: dict[str, Any], rpc: str, exc: Any) -> None:
    """Keep what the first refusal of each kind said: a count alone does not say who refused."""
    key = f"{rpc} {_code(exc)}"
    if key not in out["first_refusals"]:
        out["first_refusals"][key] = f"{exc.details()} {exc.debug_error_string()}"[:300]


async def _device(dev: str, stub: Any, target: str, s: FleetSettings, stop_at: float, out: dict[str, Any]) -> None:
    """One device: Join, then poll; on TRAIN download the model and upload it back unchanged."""
    import grpc
    from fedcore.channel import JOIN_TIMEOUT_S  # as the daemon waits
    from fedtune.v1 import fedtune_pb2 as pb

    def left() -> float:
        return stop_at - time.time()

    backoff = 0.5
    session = ""
    while left() > 1:
        try:
            reply = await stub.Join(pb.JoinRequest(device_id=dev, num_samples=8,
                                                   capabilities=pb.Capabilities(accelerator="cpu")),
                                    timeout=min(JOIN_TIMEOUT_S, left()), wait_for_ready=True)
            session = reply.session_id
            break
        except grpc.aio.AioRpcError as exc:
            out["join_refused"][_code(exc)] += 1
            _first(out, "Join", exc)
            # Jittered so that refused devices do not come back as one wave.
            await asyncio.sleep(min(left(), random.uniform(0.5, 1.0) * backoff))
            backoff = min(backoff * 2, 8.0)
    if not session:
        return
    out["joined"] += 1
    backoff = 0.5
    while left() > 1:
        try:
            task = await stub.GetTask(pb.TaskRequest(device_id=dev, session_id=session),
                                      timeout=min(s.poll_seconds + 10.0, left()))
        except grpc.aio.AioRpcError as exc:
            out["poll_refused"][_code(exc)] += 1
            _first(out, "GetTask", exc)
            await asyncio.sleep(min(left(), random.uniform(0.5, 1.0) * backoff))
            backoff = min(backoff * 2, 8.0)
            continue
        backoff = 0.5
        if task.kind == pb.Task.SHUTDOWN:
            out["shutdown"] += 1
            return
        if task.kind == pb.Task.TRAIN:
            got = time.time()
            out["handouts"].append((dev, task.round, got - (task.deadline_unix - s.round_deadline_s)))
            out["handed_at"][(dev, task.round)] = got
            await _train(dev, session, target, task, left, out)
            continue
        if task.retry_after_ms:
            out["sent_away"] += 1
            await asyncio.sleep(min(left(), task.retry_after_ms / 1000))


async def _train(dev: str, session: str, target: str, task: Any, left: Any, out: dict[str, Any]) -> None:
    """Download the task's model and send the same chunks back as the update, as the daemon's streams do.

    The transfers take a connection of their own, as a real device's would: a plaintext server counts
    streams per connection, and polls share theirs among many devices.
    """
    import grpc
    from fedcore.channel import CHANNEL_OPTIONS
    from fedtune.v1 import fedtune_pb2 as pb
    from fedtune.v1 import fedtune_pb2_grpc as pbg

    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS + [("fedtune.bench.channel", dev)])
    stub = pbg.FederationStub(channel)
    try:
        stage = "Download"
        manifest = None
        chunks = []
        call = stub.Download(pb.DownloadRequest(device_id=dev, session_id=session, model_version=task.model_version),
                             timeout=min(60.0, left()))
        async for msg in call:
            if msg.WhichOneof("body") == "manifest":
                manifest = msg.manifest
            elif msg.WhichOneof("body") == "chunk":
                chunks.append(msg.chunk)
        if manifest is None:
            out["transfer_failed"]["NO_MANIFEST"] += 1
            return
        header = pb.UploadHeader(device_id=dev, session_id=session, task_id=task.task_id, round=task.round,
                                 base_version=task.model_version, num_samples=8, manifest=manifest)

        async def messages():  # type: ignore[no-untyped-def]
            yield pb.UploadMessage(header=header)
            for c in chunks:
                yield pb.UploadMessage(chunk=c)

        stage = "Upload"
        for attempt in range(6):
            try:
                reply = await stub.Upload(messages(), timeout=min(60.0, left()))
                break
            except grpc.aio.AioRpcError as exc:
                # As the daemon does: a busy server (all upload slots staged) is asked again after a backoff.
                # A refused stream can end INTERNAL on this side when the refusal beats its last write.
                if _code(exc) not in ("RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE") or attempt == 5:
                    raise
                out["upload_retried"][_code(exc)] += 1
                await asyncio.sleep(min(left(), random.uniform(0.5, 1.0) * 2 ** attempt))
        if reply.complete:
            out["uploaded"] += 1
        # Metrics end the server's wait for this device at once instead of after its grace period.
        stage = "ReportMetrics"
        await stub.ReportMetrics(pb.RoundMetrics(device_id=dev, session_id=session, task_id=task.task_id,
                                                 round=task.round, num_samples=8), timeout=min(15.0, left()))
    except grpc.aio.AioRpcError as exc:
        out["transfer_failed"][_code(exc)] += 1
        out.setdefault("notes", []).append(f"{dev} {stage}: {_code(exc)}: {exc.details()} {exc.debug_error_string()}"[:400])
    finally:
        await channel.close(grace=None)


async def _fleet_part(target: str, ids: list[str], s: FleetSettings, stop_at: float) -> dict[str, Any]:
    import grpc
    from fedcore.channel import CHANNEL_OPTIONS
    from fedtune.v1 import fedtune_pb2_grpc as pbg

    out: dict[str, Any] = {"joined": 0, "uploaded": 0, "shutdown": 0, "sent_away": 0, "handouts": [],
                           "join_refused": Counter(), "poll_refused": Counter(), "transfer_failed": Counter(),
                           "upload_retried": Counter(), "first_refusals": {}, "handed_at": {}, "handout_lag": {}}
    ticks: list[tuple[float, float]] = []  # (time, how late this process's event loop ran a 50 ms sleep)
    monitor = asyncio.ensure_future(_loop_lag(ticks, stop_at))
    n_ch = max(1, math.ceil(len(ids) / max(1, s.devices_per_channel)))
    # A distinct option per channel: gRPC would otherwise share one subchannel (one TCP connection) among them.
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS + [("fedtune.bench.channel", i)])
                for i in range(n_ch)]
    stubs = [pbg.FederationStub(ch) for ch in channels]
    tasks = [asyncio.ensure_future(_device(d, stubs[i % n_ch], target, s, stop_at, out)) for i, d in enumerate(ids)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), max(1.0, stop_at - time.time() + 5))
    except asyncio.TimeoutError:
        out.setdefault("notes", []).append("a device loop outlived its deadline")
    monitor.cancel()
    for ch in channels:
        await ch.close(grace=None)
    # A hand-out's latency is the server's and this process's: how late its own loop ran meanwhile.
    handed_at = out.pop("handed_at")
    for dev, rnd, lat in out["handouts"]:
        got = handed_at[(dev, rnd)]
        out["handout_lag"][f"{dev} {rnd}"] = max((late for t, late in ticks if got - lat <= t <= got + 0.2),
                                                 default=0.0)
    out["loop_lag_max"] = max((late for _, late in ticks), default=0.0)
    return out


async def _loop_lag(ticks: list[tuple[float, float]], stop_at: float, tick: float = 0.05) -> None:
    while time.time() < stop_at:
        t0 = time.monotonic()
        await asyncio.sleep(tick)
        ticks.append((time.time(), time.monotonic() - t0 - tick))


def _worker(target: str, ids: list[str], s: FleetSettings, stop_at: float, q: Any) -> None:
    """A process of devices; puts its counts on q."""
    raise_fd_limit()
    if s.device_cpus:
        os.sched_setaffinity(0, s.device_cpus)
    try:
        out = asyncio.run(_fleet_part(target, ids, s, stop_at))
    except BaseException as exc:  # report, never leave the parent waiting
        out = {"error": f"{type(exc).__name__}: {exc}"}
    for k in ("join_refused", "poll_refused", "transfer_failed", "upload_retried"):
        if k in out:
            out[k] = dict(out[k])
    q.put(out)


# ------------------------------------------------------------------- server

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def server_argv(s: FleetSettings, port: int, out: Path) -> list[str]:
    """`fedserver run` for a tiny plaintext loopback run that waits for the fleet."""
    min_devices = max(s.devices_per_round, math.ceil(s.min_frac * s.devices))
    return [sys.executable, "-m", "fedserver", "run", "--listen", f"127.0.0.1:{port}", "--out", str(out),
            "--preset", "tiny", "--insecure", "--rounds", str(s.rounds),
            "--devices-per-round", str(min(s.devices_per_round, s.devices)),
            "--min-devices", str(min_devices), "--min-updates", "1",
            "--round-deadline-s", str(s.round_deadline_s), "--local-steps", "1", "--batch-size", "4",
            "--max-input-tokens", "64", "--max-target-tokens", "16", "--eval-size", "0",
            "--poll-seconds", str(s.poll_seconds), "--threads", "1", "--liveness-s",
            str(max(60.0, 3.0 * s.poll_seconds)), *s.server_args]


class _Sampler(threading.Thread):
    """Samples the server's RSS and CPU time until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.rss = 0
        self.cpu_s = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with self.proc.oneshot():
                    self.rss = self.proc.memory_info().rss
                    t = self.proc.cpu_times()
                self.peak_rss = max(self.peak_rss, self.rss)
                self.cpu_s = t.user + t.system
            except Exception:  # gone (or a zombie): the last sample stands
                return
            self.done.wait(0.2)


def _rounds_completed(out: Path) -> int:
    try:
        data = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return 0
    rounds = data.get("rounds") if isinstance(data, dict) else None
    if not isinstance(rounds, list):
        return 0
    # Round 0 is the initial model's record, not a completed round.
    return len({r.get("round") for r in rounds if isinstance(r, dict) and isinstance(r.get("round"), int)
                and r["round"] >= 1})


def _sampled(log_text: str) -> set[tuple[str, int]]:
    got: set[tuple[str, int]] = set()
    for m in SAMPLED.finditer(log_text):
        got.update((d.strip(), int(m.group(1))) for d in m.group(2).split(","))
    return got


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def run_fleet(s: FleetSettings, workdir: Path | None = None, keep_log: Path | None = None) -> FleetResult:
    """One server process and s.devices devices; everything ends within s.limit_s() (plus a few seconds)."""
    raise_fd_limit()  # the server inherits it
    res = FleetResult(devices=s.devices, rounds_total=s.rounds)
    t0 = time.time()
    stop_at = t0 + s.limit_s()
    with tempfile.TemporaryDirectory(prefix="fleet-load-", dir=workdir) as tmp:
        out = Path(tmp) / "run"
        log_path = Path(tmp) / "server.log"
        port = _free_port()
        with open(log_path, "w") as log_f:
            # Pinned before exec, so every thread the server starts inherits the CPUs.
            pin = (lambda: os.sched_setaffinity(0, s.server_cpus)) if s.server_cpus else None
            server = subprocess.Popen(server_argv(s, port, out), stdout=log_f, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=pin)
        sampler = _Sampler(server.pid)
        sampler.start()
        # Devices start once the server listens: refusals while it imports torch are not load.
        while server.poll() is None and time.time() < stop_at and not _listening(port):
            time.sleep(0.2)
        procs: list[Any] = []
        try:
            ctx = mp.get_context("spawn")  # no inherited gRPC state in the device processes
            q = ctx.Queue()
            ids = [f"dev{i:05d}" for i in range(s.devices)]
            n_procs = max(1, min(s.procs, s.devices))
            for k in range(n_procs):
                p = ctx.Process(target=_worker, args=(f"127.0.0.1:{port}", ids[k::n_procs], s, stop_at, q),
                                daemon=True)
                p.start()
                procs.append(p)
            parts: list[dict[str, Any]] = []
            idle_taken = False
            while len(parts) < n_procs and time.time() < stop_at + 20:
                if not idle_taken and "round 1: sampled" in log_path.read_text(errors="replace"):
                    # The fleet is connected and idle, and no transfer has started yet.
                    res.server_idle_rss_mb = sampler.rss / 2**20
                    idle_taken = True
                try:
                    parts.append(q.get(timeout=0.5))
                except Exception:  # queue.Empty: keep watching the clock
                    pass
            if len(parts) < n_procs:
                res.notes.append(f"{n_procs - len(parts)} device processes never reported")
        finally:
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
            # The server ends by itself after its last round and a poll period of telling devices.
            try:
                res.server_exit = server.wait(max(1.0, min(s.poll_seconds + 10.0, stop_at + 20 - time.time())))
            except subprocess.TimeoutExpired:
                res.timed_out = True
                server.send_signal(signal.SIGTERM)
                try:
                    res.server_exit = server.wait(15)
                except subprocess.TimeoutExpired:
                    server.kill()
                    res.server_exit = server.wait(5)
            sampler.done.set()
            sampler.join(2)
        log_text = log_path.read_text(errors="replace")
        if keep_log is not None:
            keep_log.write_text(log_text)
        res.rounds_completed = _rounds_completed(out)
    handouts: list[tuple[str, int, float]] = []
    lags: dict[str, float] = {}
    loop_lag = 0.0
    for part in parts:
        if "error" in part:
            res.notes.append(f"device process failed: {part['error']}")
            continue
        res.joined += part["joined"]
        res.uploaded += part["uploaded"]
        res.shutdown_seen += part["shutdown"]
        res.polls_sent_away += part["sent_away"]
        handouts += part["handouts"]
        lags.update(part.get("handout_lag", {}))
        loop_lag = max(loop_lag, part.get("loop_lag_max", 0.0))
        res.notes += part.get("notes", [])
        for k, v in part.get("first_refusals", {}).items():
            res.first_refusals.setdefault(k, v)
        for k in ("join_refused", "poll_refused", "transfer_failed", "upload_retried"):
            c = Counter(getattr(res, k))
            c.update(part[k])
            setattr(res, k, dict(c))
    sampled = _sampled(log_text)
    res.sampled = len(sampled)
    res.handed_out = len(handouts)
    lat = [x for _, _, x in handouts]
    res.handout_p50_s, res.handout_p99_s = _pct(lat, 0.50), _pct(lat, 0.99)
    res.handout_max_s = max(lat) if lat else math.nan
    if handouts:
        d, rnd, worst = max(handouts, key=lambda h: h[2])
        res.notes.append(f"slowest hand-out: {d} in round {rnd}, {worst:.2f} s (its process's event loop ran up "
                         f"to {lags.get(f'{d} {rnd}', math.nan):.2f} s late meanwhile; at worst in the run "
                         f"{loop_lag:.2f} s)")
        for r in sorted({r for _, r, _ in handouts}):
            res.handout_p99_by_round[r] = _pct([x for _, rr, x in handouts if rr == r], 0.99)
        res.notes.append("hand-out p99 by round: " + ", ".join(
            f"{r}: {v:.2f} s" for r, v in res.handout_p99_by_round.items()))
    missed = sampled - {(d, r) for d, r, _ in handouts}
    if missed:
        res.notes.append(f"{len(missed)} sampled (device, round) pairs never received their task")
    res.server_peak_rss_mb = sampler.peak_rss / 2**20
    res.server_cpu_s = sampler.cpu_s
    res.wall_s = time.time() - t0
    trouble = [ln for ln in log_text.splitlines() if "Traceback" in ln or "Unexpected [" in ln]
    if trouble:
        res.notes.append(f"the server log has {len(trouble)} tracebacks or unexpected errors; the first: "
                         f"{trouble[0][:300]}")
    if res.server_exit not in (0, None) or res.timed_out or res.rounds_completed < s.rounds:
        tail = " | ".join(log_text.strip().splitlines()[-3:])
        res.notes.append(f"server exited {res.server_exit}; its log ends: {tail[:300]}")
    return res


# ------------------------------------------------------------------- report

def _codes(d: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(d.items())) or "0"


def table(results: list[FleetResult]) -> str:
    """One row per fleet; per-idle-device costs relative to the first row."""
    head = (f"{'N':>6} {'joined':>7} {'join refused':>24} {'GetTask refused':>24} {'handed':>9} "
            f"{'sent away':>9} {'p50 s':>6} {'p99 s':>6} {'rounds':>6} {'peak RSS MB':>11} {'idle RSS MB':>11} {'CPU s':>7} "
            f"{'KB/idle dev':>11} {'ms CPU/dev':>10} {'wall s':>6}")
    rows = [head]
    ref = results[0] if results else None
    for r in results:
        per_kb = per_ms = "-"
        # Per device the server actually held: a fleet that only partly joined is not charged for the rest.
        if ref is not None and r is not ref and r.joined > ref.joined:
            extra = r.joined - ref.joined
            # Idle against idle where both rows have it, else peak against peak: never one against the other.
            idle = not (math.isnan(ref.server_idle_rss_mb) or math.isnan(r.server_idle_rss_mb))
            base_ref = ref.server_idle_rss_mb if idle else ref.server_peak_rss_mb
            base_r = r.server_idle_rss_mb if idle else r.server_peak_rss_mb
            per_kb = f"{(base_r - base_ref) * 1024 / extra:.1f}"
            per_ms = f"{(r.server_cpu_s - ref.server_cpu_s) * 1000 / extra:.2f}"
        rows.append(f"{r.devices:>6} {r.joined:>7} {_codes(r.join_refused):>24} {_codes(r.poll_refused):>24} "
                    f"{r.handed_out:>4}/{r.sampled:<4} {r.polls_sent_away:>9} {r.handout_p50_s:>6.2f} {r.handout_p99_s:>6.2f} "
                    f"{r.rounds_completed:>3}/{r.rounds_total:<2} {r.server_peak_rss_mb:>11.0f} "
                    f"{r.server_idle_rss_mb:>11.0f} {r.server_cpu_s:>7.1f} {per_kb:>11} {per_ms:>10} "
                    f"{r.wall_s:>6.0f}")
    for r in results:
        extra = []
        if r.transfer_failed:
            extra.append(f"transfers failed {_codes(r.transfer_failed)}")
        if r.upload_retried:
            extra.append(f"uploads sent again after {_codes(r.upload_retried)} (server busy)")
        extra += [f"first {k}: {v}" for k, v in sorted(r.first_refusals.items())]
        if r.timed_out:
            extra.append("server did not finish in time (stopped)")
        extra += r.notes
        if extra:
            rows.append(f"  N={r.devices}: " + "; ".join(extra))
    return "\n".join(rows)


def idle_kb(results: list[FleetResult]) -> float:
    """The server's KB per idle device between the first and last fleet (idle RSS, per extra joined device)."""
    ref, r = results[0], results[-1]
    if r.joined <= ref.joined:
        return math.nan
    return (r.server_idle_rss_mb - ref.server_idle_rss_mb) * 1024 / (r.joined - ref.joined)


def floor_line(results: list[FleetResult], floors: list[FloorResult]) -> str:
    """fedserver's memory per idle device beside a bare grpc.aio server's, between the same two fleet sizes."""
    ours, floor = idle_kb(results), floor_slope_kb(floors[0], floors[-1])
    return (f"memory per idle device, N={results[0].devices} to {results[-1].devices}: fedserver {ours:.1f} KB; "
            f"a bare grpc.aio server with the same options (bench.grpc_floor) {floor:.1f} KB "
            f"(connection {floors[-1].conn_kb:.1f} + waiting call {floors[-1].call_kb:.1f} at N={floors[-1].devices}); "
            f"fedserver above that floor: {ours - floor:.1f} KB"
            + "".join(f"; floor N={f.devices}: {'; '.join(f.notes)}" for f in floors if f.notes))


def _cpus(text: str) -> tuple[int, ...]:
    """'0,2-3' -> (0, 2, 3)."""
    out: list[int] = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="100,1000,10000", help="fleet sizes, comma-separated (first is the reference)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--devices-per-round", type=int, default=10)
    ap.add_argument("--round-deadline-s", type=float, default=30.0)
    ap.add_argument("--poll-seconds", type=int, default=60)
    ap.add_argument("--procs", type=int, default=4, help="device processes")
    ap.add_argument("--devices-per-channel", type=int, default=1,
                    help="devices sharing one gRPC channel (one TCP connection); 1: as a real fleet")
    ap.add_argument("--min-frac", type=float, default=1.0, help="share of the fleet connected before round 1")
    ap.add_argument("--timeout-s", type=float, default=0.0, help="per fleet (0: from the settings)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `fedserver run` argument, e.g. --server-arg=--max-workers=128 (repeatable)")
    ap.add_argument("--server-cpus", default="", help="CPUs for the server, e.g. 0 (default: any)")
    ap.add_argument("--device-cpus", default="", help="CPUs for the devices' processes, e.g. 1 (default: any)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--server-logs", type=Path, default=None,
                    help="keep each server's log in this directory as server-N.log")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure a bare grpc.aio server (bench.grpc_floor) at the first and last N, and "
                         "print fedserver's memory per idle device above that floor")
    a = ap.parse_args(argv)
    if a.server_logs is not None:
        a.server_logs.mkdir(parents=True, exist_ok=True)
    results = []
    for n in (int(x) for x in a.devices.split(",") if x.strip()):
        s = FleetSettings(devices=n, rounds=a.rounds, devices_per_round=a.devices_per_round,
                          round_deadline_s=a.round_deadline_s, poll_seconds=a.poll_seconds, procs=a.procs,
                          devices_per_channel=a.devices_per_channel, min_frac=a.min_frac, timeout_s=a.timeout_s,
                          server_args=a.server_arg, server_cpus=_cpus(a.server_cpus),
                          device_cpus=_cpus(a.device_cpus))
        print(f"N={n}: running (limit {s.limit_s():.0f} s) ...", file=sys.stderr, flush=True)
        results.append(run_fleet(s, keep_log=a.server_logs / f"server-{n}.log" if a.server_logs else None))
        print(table(results), flush=True)
    floors: list[FloorResult] = []
    if a.floor and len(results) > 1:
        for n in (results[0].devices, results[-1].devices):
            print(f"N={n}: the bare grpc.aio floor ...", file=sys.stderr, flush=True)
            floors.append(measure_floor(n, procs=a.procs, per_channel=a.devices_per_channel))
        print(floor_line(results, floors), flush=True)
    if a.json:
        print(json.dumps({"fleets": [asdict(r) for r in results], "floor": [asdict(f) for f in floors]},
                         indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

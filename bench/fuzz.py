"""Protocol fuzzing against a running server over mutual TLS, while an honest device keeps working.

    python -m bench.fuzz --inputs 10000 [--seed 0]

Starts a tiny-preset server in this process (real gRPC on loopback, mutual
TLS with a fleet made in a temporary directory), joins an honest device and
a fuzzing device (both sampled in round 1), then sends malformed protobufs,
random bytes, truncated streams, out-of-order and duplicated chunks,
oversized declarations, wrong checksums and wrong ids/versions/task ids from
the fuzzing device's certificate. The honest device downloads and checks the
model throughout. Afterwards the honest device uploads its update, the fuzzer
uploads a NaN update (refused), and the round completes with the honest one.

Prints the inputs per kind, the answers by status code, the honest device's
successes and the global model digest before and after the fuzz. It never
fails on a time.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from fedcore.channel import ClientSecurity, open_channel
from fedcore.wire import StateEncoder, TransferSpec, codec_name, encoding_name, state_digest, unique_tensors
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

SERVICE = "/fedtune.v1.Federation/"
# Generous: a deadline hit on a loaded machine would be counted as an answer the server never gave.
TIMEOUT_S = 300.0
KINDS = ("random_bytes", "malformed_protobuf", "wrong_ids", "oversized", "bad_checksum", "bad_chunk_fields",
         "out_of_order", "duplicate_chunks", "truncated_stream", "random_stream")
# Share of the inputs per kind: cheap unary kinds carry most of the count.
WEIGHTS = {"random_bytes": 30, "malformed_protobuf": 25, "wrong_ids": 14, "oversized": 3, "bad_checksum": 4,
           "bad_chunk_fields": 6, "out_of_order": 3, "duplicate_chunks": 4, "truncated_stream": 4,
           "random_stream": 7}


@dataclass
class FuzzReport:
    inputs: Counter = field(default_factory=Counter)                    # kind -> inputs sent
    codes: dict[str, Counter] = field(default_factory=dict)             # kind -> status name -> count
    honest_ok: int = 0
    honest_failed: list[str] = field(default_factory=list)
    digest_before: str = ""
    digest_after: str = ""
    seconds: float = 0.0

    def record(self, kind: str, code: grpc.StatusCode) -> None:
        self.inputs[kind] += 1
        self.codes.setdefault(kind, Counter())[code.name] += 1

    @property
    def total(self) -> int:
        return sum(self.inputs.values())

    def by_code(self) -> Counter:
        out: Counter = Counter()
        for c in self.codes.values():
            out.update(c)
        return out

    def render(self) -> str:
        codes = sorted(self.by_code())
        head = f"{'kind':<20}{'inputs':>8}  " + "  ".join(f"{c:>19}" for c in codes)
        lines = [head, "-" * len(head)]
        for k in KINDS:
            if self.inputs[k]:
                lines.append(f"{k:<20}{self.inputs[k]:>8}  " +
                             "  ".join(f"{self.codes[k].get(c, 0):>19}" for c in codes))
        tot = self.by_code()
        lines.append(f"{'total':<20}{self.total:>8}  " + "  ".join(f"{tot[c]:>19}" for c in codes))
        return "\n".join(lines)


def _code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()  # type: ignore[attr-defined]


class Fuzzer:
    """Crafts bad inputs from a valid session, task and model, and sends them as the fuzzing device."""

    def __init__(self, channel: grpc.Channel, device_id: str, session_id: str, task: pb.Task,
                 state: dict[str, torch.Tensor], rng: random.Random, max_message_bytes: int) -> None:
        self.ch, self.dev, self.sid, self.task, self.rng = channel, device_id, session_id, task, rng
        self.max_message_bytes = max_message_bytes
        up = task.upload
        spec = TransferSpec(encoding_name(up.encoding), codec_name(up.codec), block_size=up.block_size,
                            chunk_elems=up.chunk_elems)
        enc = StateEncoder(state, spec)
        self.manifest = enc.manifest
        self.chunks = list(enc.chunks())
        self.unary = {m: channel.unary_unary(SERVICE + m, request_serializer=None, response_deserializer=None)
                      for m in ("Join", "GetTask", "UploadStatus", "ReportMetrics")}
        self.download = channel.unary_stream(SERVICE + "Download", request_serializer=None,
                                             response_deserializer=None)
        self.upload = channel.stream_unary(SERVICE + "Upload", request_serializer=None, response_deserializer=None)

    # ------------------------------------------------------------- valid bases
    def header(self, **over) -> pb.UploadHeader:
        h = pb.UploadHeader(device_id=self.dev, session_id=self.sid, task_id=self.task.task_id,
                            round=self.task.round, base_version=self.task.model_version, num_samples=10)
        h.manifest.CopyFrom(self.manifest)
        for k, v in over.items():
            if k == "manifest":
                h.manifest.CopyFrom(v)
            else:
                setattr(h, k, v)
        return h

    def valid_unary(self) -> tuple[str, bytes]:
        """A valid, side-effect-free request (no Join: a re-join would replace the session)."""
        if self.rng.random() < 0.5:
            return "UploadStatus", pb.UploadStatusRequest(device_id=self.dev, session_id=self.sid,
                                                          task_id=self.task.task_id).SerializeToString()
        return "ReportMetrics", pb.RoundMetrics(device_id=self.dev, session_id=self.sid, task_id=self.task.task_id,
                                                round=self.task.round, t_comp_s=1.0,
                                                tokens=10).SerializeToString()

    def chunk(self, i: int | None = None) -> pb.Chunk:
        c = pb.Chunk()
        c.CopyFrom(self.chunks[self.rng.randrange(len(self.chunks)) if i is None else i])
        return c

    # ------------------------------------------------------------- mutations
    def mutate(self, data: bytes) -> bytes:
        b = bytearray(data)
        op = self.rng.randrange(6)
        if op == 0 and b:  # flip bits
            for _ in range(self.rng.randint(1, 4)):
                b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        elif op == 1 and b:  # truncate
            del b[self.rng.randrange(len(b)):]
        elif op == 2:  # a field with an invalid wire type (6 and 7 do not exist)
            b[self.rng.randrange(len(b) + 1):0] = bytes([(self.rng.randint(1, 15) << 3) | self.rng.choice((6, 7))])
        elif op == 3:  # a length-delimited field claiming more bytes than follow
            b += bytes([(self.rng.randint(1, 15) << 3) | 2, 0xFF, 0xFF, 0xFF, 0x0F]) + b"x"
        elif op == 4:  # an unterminated varint
            b += bytes([(self.rng.randint(1, 15) << 3), 0xFF, 0xFF, 0xFF])
        else:  # random bytes spliced in
            pos = self.rng.randrange(len(b) + 1)
            b[pos:pos] = self.rng.randbytes(self.rng.randint(1, 8))
        return bytes(b)

    # ----------------------------------------------------------------- senders
    def send_unary_batch(self, report: FuzzReport, kind: str, calls: list[tuple[str, bytes]],
                         window: int = 8) -> None:
        """Pipelined unary calls: up to `window` in flight on the one channel (the server caps concurrent RPCs)."""
        inflight: list[grpc.Future] = []

        def drain(n: int) -> None:
            while len(inflight) > n:
                f = inflight.pop(0)
                try:
                    f.result()
                    report.record(kind, grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    report.record(kind, _code_of(exc))

        for method, data in calls:
            if method == "Download":
                drain(0)
                report.record(kind, self._download(data))
                continue
            inflight.append(self.unary[method].future(data, timeout=TIMEOUT_S))
            drain(window)
        drain(0)

    def _download(self, data: bytes) -> grpc.StatusCode:
        call = self.download(data, timeout=TIMEOUT_S)
        try:
            # The manifest comes first even for a bad resume position; the first chunk shows it was served.
            for n, _ in enumerate(call):
                if n == 1:
                    call.cancel()
                    break
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return _code_of(exc)

    def send_stream(self, report: FuzzReport, kind: str, messages: list[bytes]) -> None:
        try:
            self.upload(iter(messages), timeout=TIMEOUT_S)
            report.record(kind, grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            report.record(kind, _code_of(exc))

    def up(self, msg: pb.UploadHeader | pb.Chunk) -> bytes:
        key = "header" if isinstance(msg, pb.UploadHeader) else "chunk"
        return pb.UploadMessage(**{key: msg}).SerializeToString()

    # ------------------------------------------------------------------ kinds
    def random_bytes(self, report: FuzzReport, n: int) -> None:
        methods = ["Join", "GetTask", "UploadStatus", "ReportMetrics", "Download"]
        calls = [(self.rng.choice(methods), self.rng.randbytes(self.rng.randint(0, 200))) for _ in range(n)]
        self.send_unary_batch(report, "random_bytes", calls)

    def malformed_protobuf(self, report: FuzzReport, n: int) -> None:
        calls = []
        for _ in range(n):
            method, data = self.valid_unary()
            calls.append((method, self.mutate(data)))
        self.send_unary_batch(report, "malformed_protobuf", calls)

    def wrong_ids(self, report: FuzzReport, n: int) -> None:
        t, r = self.task, self.rng
        makers: list[Callable[[], tuple[str, bytes]]] = [
            # speaking for another device
            lambda: ("UploadStatus", pb.UploadStatusRequest(device_id="honest", session_id=self.sid,
                                                            task_id=t.task_id).SerializeToString()),
            lambda: ("Join", pb.JoinRequest(device_id=r.choice(["honest", "dev-99", ""]),
                                            num_samples=1).SerializeToString()),
            lambda: ("ReportMetrics", pb.RoundMetrics(device_id="honest", session_id=self.sid, task_id=t.task_id,
                                                      round=t.round).SerializeToString()),
            # wrong session
            lambda: ("GetTask", pb.TaskRequest(device_id=self.dev, session_id=r.randbytes(8).hex())
                     .SerializeToString()),
            lambda: ("UploadStatus", pb.UploadStatusRequest(device_id=self.dev, session_id="stale",
                                                            task_id=t.task_id).SerializeToString()),
            # wrong model version, task id, round
            lambda: ("Download", pb.DownloadRequest(device_id=self.dev, session_id=self.sid,
                                                    model_version="sha256:" + r.randbytes(32).hex())
                     .SerializeToString()),
            lambda: ("ReportMetrics", pb.RoundMetrics(device_id=self.dev, session_id=self.sid,
                                                      task_id=r.randbytes(16).hex(), round=t.round)
                     .SerializeToString()),
            lambda: ("ReportMetrics", pb.RoundMetrics(device_id=self.dev, session_id=self.sid, task_id=t.task_id,
                                                      round=t.round, t_comp_s=-1.0).SerializeToString()),
        ]
        calls = [r.choice(makers)() for _ in range(n)]
        self.send_unary_batch(report, "wrong_ids", calls)
        # Upload headers with wrong ids: each its own stream.
        headers = [lambda: self.header(device_id="honest"), lambda: self.header(task_id=r.randbytes(16).hex()),
                   lambda: self.header(round=t.round + r.randint(1, 5)),
                   lambda: self.header(base_version="sha256:" + r.randbytes(32).hex()),
                   lambda: self.header(session_id="stale"), lambda: self.header(num_samples=-r.randint(1, 99))]
        for _ in range(max(1, n // 10)):
            self.send_stream(report, "wrong_ids", [self.up(r.choice(headers)()), self.up(self.chunk())])

    def oversized(self, report: FuzzReport, n: int) -> None:
        r = self.rng
        for i in range(n):
            m = pb.Manifest()
            m.CopyFrom(self.manifest)
            choice = i % 5
            if choice == 0:  # a tensor declared far larger than the model's
                m.tensors[r.randrange(len(m.tensors))].shape[:] = [1 << 30, 1 << 20]
            elif choice == 1:  # chunks larger than the server allows
                m.chunk_elems = 1 << 24
            elif choice == 2:  # more tensors than the model has
                for j in range(200):
                    m.tensors.add(name=f"extra.{j}", dtype="float32", shape=[1 << 20])
            elif choice == 3:  # a download resuming far past the end
                req = pb.DownloadRequest(device_id=self.dev, session_id=self.sid, model_version=self.task.model_version)
                req.start.tensor_index = r.randint(10_000, 1 << 40)
                req.start.offset = r.randint(0, 1 << 40)
                report.record("oversized", self._download(req.SerializeToString()))
                continue
            else:  # a chunk claiming more elements than its tensor
                c = self.chunk()
                c.count = r.randint(1 << 20, 1 << 40)
                self.send_stream(report, "oversized", [self.up(self.header()), self.up(c)])
                continue
            self.send_stream(report, "oversized", [self.up(self.header(manifest=m))])
        # A few messages beyond the server's message size limit (gRPC refuses them before parsing).
        for _ in range(min(3, n)):
            c = self.chunk()
            c.payload = bytes(self.max_message_bytes + 1024)
            self.send_stream(report, "oversized", [self.up(self.header()), self.up(c)])

    def bad_checksum(self, report: FuzzReport, n: int) -> None:
        for _ in range(n):
            c = self.chunk()
            if c.payload and self.rng.random() < 0.7:
                p = bytearray(c.payload)
                p[self.rng.randrange(len(p))] ^= 0xFF  # payload corrupted in transit
                c.payload = bytes(p)
            else:
                c.crc32c ^= 1 << self.rng.randrange(32)
            self.send_stream(report, "bad_checksum", [self.up(self.header()), self.up(c)])

    def bad_chunk_fields(self, report: FuzzReport, n: int) -> None:
        r = self.rng
        edits: list[Callable[[pb.Chunk], None]] = [
            lambda c: setattr(c, "tensor", "no.such.tensor"),
            lambda c: setattr(c, "dtype", r.choice(["float16", "int64", "complex64", "bogus"])),
            lambda c: c.shape.append(2),
            lambda c: setattr(c, "offset", r.choice([-1, 1, 1 << 50])),
            lambda c: setattr(c, "count", c.count + r.randint(1, 9)),
            lambda c: setattr(c, "raw_len", c.raw_len + r.randint(1, 9)),
            lambda c: setattr(c, "encoding", r.choice([pb.INT8, pb.NF4, 99])),
            lambda c: setattr(c, "codec", r.choice([pb.ZSTD, 77])),
            lambda c: setattr(c, "block_size", r.randint(1, 1 << 30)),
            lambda c: setattr(c, "scales", r.randbytes(8)),
        ]
        for _ in range(n):
            c = self.chunk()
            r.choice(edits)(c)
            self.send_stream(report, "bad_chunk_fields", [self.up(self.header()), self.up(c)])

    def out_of_order(self, report: FuzzReport, n: int) -> None:
        # Every chunk but one, shuffled: the receiver takes any order, and the upload stays incomplete.
        for _ in range(n):
            idx = list(range(len(self.chunks)))
            self.rng.shuffle(idx)
            idx = idx[:self.rng.randint(1, len(idx) - 1)]
            self.send_stream(report, "out_of_order", [self.up(self.header())] + [self.up(self.chunk(i)) for i in idx])

    def duplicate_chunks(self, report: FuzzReport, n: int) -> None:
        for _ in range(n):
            c = self.chunk()
            msgs = [self.up(self.header()), self.up(c), self.up(c)]
            if self.rng.random() < 0.5:
                msgs.insert(2, self.up(self.chunk()))
            self.send_stream(report, "duplicate_chunks", msgs)

    def truncated_stream(self, report: FuzzReport, n: int) -> None:
        for _ in range(n):
            k = self.rng.randint(0, len(self.chunks) - 1)
            msgs = [self.up(self.header())] + [self.up(self.chunk(i)) for i in range(k)]
            if self.rng.random() < 0.5:  # the last message cut short on the wire
                last = self.up(self.chunk(k))
                msgs.append(last[:self.rng.randrange(1, len(last))])
            self.send_stream(report, "truncated_stream", msgs)

    def random_stream(self, report: FuzzReport, n: int) -> None:
        for _ in range(n):
            msgs = [self.rng.randbytes(self.rng.randint(0, 300)) for _ in range(self.rng.randint(0, 4))]
            if self.rng.random() < 0.5:
                msgs.insert(0, self.up(self.header()))
            self.send_stream(report, "random_stream", msgs)


def plan(inputs: int) -> dict[str, int]:
    total = sum(WEIGHTS.values())
    counts = {k: max(1, inputs * WEIGHTS[k] // total) for k in KINDS}
    counts["random_bytes"] += max(0, inputs - sum(counts.values()))
    return counts


class HonestDevice:
    """Downloads the model again and again while the fuzz runs; counts what worked."""

    def __init__(self, channel: grpc.Channel, device_id: str, session_id: str, task: pb.Task) -> None:
        self.stub = pbg.FederationStub(channel)
        self.dev, self.sid, self.task = device_id, session_id, task
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []

    def loop(self) -> None:
        from fedclient.transfer import Limits, download

        while not self.stop.is_set():
            try:
                state, _ = download(self.stub, self.dev, self.sid, self.task.model_version, None,
                                    Limits(retries=0, stall_s=TIMEOUT_S), _no_retry)
                if state_digest(unique_tensors(state)) != self.task.model_version:
                    self.failed.append("downloaded model does not match its version")
                st = self.stub.UploadStatus(pb.UploadStatusRequest(device_id=self.dev, session_id=self.sid,
                                                                   task_id=self.task.task_id), timeout=TIMEOUT_S)
                if st.complete:
                    self.failed.append("upload reported complete before it was sent")
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - any failure of the honest device is a finding
                self.failed.append(f"{type(exc).__name__}: {exc}"[:200])
            time.sleep(0.05)


def _no_retry(_attempt: int) -> None:
    raise RuntimeError("no retries in the fuzz harness")


def join_and_wait(stub: pbg.FederationStub, device_id: str, polls: int = 300) -> tuple[str, pb.Task]:
    """Join and long-poll until the device is given a task."""
    j = stub.Join(pb.JoinRequest(device_id=device_id, num_samples=10), timeout=60, wait_for_ready=True)
    for _ in range(polls):
        task = stub.GetTask(pb.TaskRequest(device_id=device_id, session_id=j.session_id), timeout=120)
        if task.kind == pb.Task.TRAIN:
            return j.session_id, task
        if task.kind == pb.Task.SHUTDOWN:
            break
    raise RuntimeError(f"{device_id} was given no task after {polls} polls")


def run_fuzz(address: str, fuzzer: ClientSecurity, honest: ClientSecurity, inputs: int, seed: int,
             digest: Callable[[], str], max_message_bytes: int,
             honest_device: str = "honest", fuzz_device: str = "fuzzer") -> tuple[FuzzReport, dict]:
    """Fuzz a server whose round has sampled both devices; returns the report and the honest side's context."""
    from fedclient.transfer import Limits, download

    rng = random.Random(seed)
    report = FuzzReport()
    h_ch, f_ch = open_channel(address, honest), open_channel(address, fuzzer)
    results: dict[str, tuple[str, pb.Task]] = {}
    threads = [threading.Thread(target=lambda d=d, c=c: results.__setitem__(d, join_and_wait(pbg.FederationStub(c), d)))
               for d, c in ((honest_device, h_ch), (fuzz_device, f_ch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h_sid, h_task = results[honest_device]
    f_sid, f_task = results[fuzz_device]
    state, _ = download(pbg.FederationStub(f_ch), fuzz_device, f_sid, f_task.model_version, None,
                        Limits(retries=0, stall_s=TIMEOUT_S), _no_retry)
    fz = Fuzzer(f_ch, fuzz_device, f_sid, f_task, state, rng, max_message_bytes)
    honest_dev = HonestDevice(h_ch, honest_device, h_sid, h_task)
    report.digest_before = digest()
    worker = threading.Thread(target=honest_dev.loop, daemon=True)
    t0 = time.monotonic()
    worker.start()
    try:
        for kind, n in plan(inputs).items():
            getattr(fz, kind)(report, n)
    finally:
        honest_dev.stop.set()
        worker.join(120)
    report.seconds = time.monotonic() - t0
    report.digest_after = digest()
    report.honest_ok, report.honest_failed = honest_dev.ok, honest_dev.failed
    ctx = {"honest_channel": h_ch, "fuzz_channel": f_ch, "honest_session": h_sid, "honest_task": h_task,
           "fuzz_session": f_sid, "fuzz_task": f_task, "state": state}
    return report, ctx


def finish_round(ctx: dict, honest_device: str = "honest", fuzz_device: str = "fuzzer",
                 seed: int = 0) -> tuple[dict[str, torch.Tensor], grpc.StatusCode, str]:
    """The honest device uploads base + noise; the fuzzer uploads NaN. Returns (honest update, fuzzer's code, details)."""
    from fedclient.transfer import Limits, upload

    state: dict[str, torch.Tensor] = ctx["state"]
    g = torch.Generator().manual_seed(seed)
    # Perturb the canonical tensors and keep ties tied.
    honest: dict[str, torch.Tensor] = {}
    for e in unique_tensors(state):
        t = e.tensor + 1e-3 * torch.randn(e.tensor.shape, generator=g) if e.tensor.is_floating_point() else e.tensor
        for n in (e.name, *e.aliases):
            honest[n] = t
    honest = {k: honest[k] for k in state}
    bad = {k: v.clone() for k, v in honest.items()}
    first = next(k for k, v in bad.items() if v.is_floating_point())
    bad[first].view(-1)[0] = float("nan")

    def send(dev: str, ch: grpc.Channel, sid: str, task: pb.Task, st: dict[str, torch.Tensor]) -> pb.UploadReply:
        up = task.upload
        spec = TransferSpec(encoding_name(up.encoding), codec_name(up.codec), block_size=up.block_size,
                            chunk_elems=up.chunk_elems)
        hdr = pb.UploadHeader(device_id=dev, session_id=sid, task_id=task.task_id, round=task.round,
                              base_version=task.model_version, num_samples=10)
        reply, _ = upload(pbg.FederationStub(ch), hdr, st, spec, Limits(retries=0, stall_s=120), _no_retry)
        return reply

    code, details = grpc.StatusCode.OK, ""
    try:
        send(fuzz_device, ctx["fuzz_channel"], ctx["fuzz_session"], ctx["fuzz_task"], bad)
    except grpc.RpcError as exc:
        code, details = _code_of(exc), exc.details()  # type: ignore[attr-defined]
    send(honest_device, ctx["honest_channel"], ctx["honest_session"], ctx["honest_task"], honest)
    return honest, code, details


def fuzz_server_config(out: Path, fleet_settings: dict, **over):
    """The fuzz scenario's server: two devices a round, so both the honest device and the fuzzer are sampled."""
    from fedserver.config import ServerConfig

    base = dict(listen="127.0.0.1:0", out=out, preset="tiny", rounds=1, devices_per_round=2, min_updates=1,
                round_deadline_s=3600.0, eval_size=0, poll_seconds=1, liveness_s=3600.0, checkpoint_keep=1,
                # The fuzzer sends thousands of requests a second by design; limits are tested on their own.
                rate_limit_rps=0.0, max_streams_per_device=0, max_update_bytes=1 << 40, max_update_chunks=1 << 30)
    base.update(fleet_settings)
    base.update(over)
    cfg = ServerConfig(**base)
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)

    from fedserver.app import build_coordinator
    from fedserver.certs import write_fleet
    from fedserver.service import make_server
    from fedserver.storage import RoundLog

    with tempfile.TemporaryDirectory() as tmp:
        fleet = write_fleet(Path(tmp) / "certs", ["honest", "fuzzer"])
        cfg = fuzz_server_config(Path(tmp) / "run", fleet.server_settings())
        coord = build_coordinator(cfg)
        server = make_server(coord, "127.0.0.1:0", 16)
        port = server.port
        server.start()
        loop = threading.Thread(target=coord.run, daemon=True)
        loop.start()

        def sec(d: str) -> ClientSecurity:
            c, k = fleet.device(d)
            return ClientSecurity(fleet.ca_cert, c, k)

        try:
            report, ctx = run_fuzz(f"127.0.0.1:{port}", sec("fuzzer"), sec("honest"), args.inputs, args.seed,
                                   lambda: coord.version, cfg.max_message_bytes)
            print(f"fuzz: {report.total} inputs in {report.seconds:.1f} s against a running server "
                  f"(mutual TLS, loopback), seed {args.seed}")
            print(report.render())
            print(f"honest device during the fuzz: {report.honest_ok} model downloads verified, "
                  f"{len(report.honest_failed)} failures")
            print(f"global model digest before: {report.digest_before}")
            print(f"global model digest after:  {report.digest_after}  "
                  f"({'unchanged' if report.digest_after == report.digest_before else 'CHANGED'})")
            honest, code, details = finish_round(ctx, seed=args.seed)
            ok = loop_wait(loop, 600)
            print(f"then: fuzzer's NaN update -> {code.name} ({details}); honest update sent; round 1 "
                  f"{'completed' if ok else 'did NOT complete'}")
            for rec in RoundLog(cfg.out / "rounds.jsonl").read():
                print(f"  round log: {rec['client']}: {rec['status']}" +
                      (f" ({rec['reason']})" if rec.get("reason") else ""))
            diff = max(float((coord.state[k].float() - honest[k].float()).abs().max()) for k in honest)
            print(f"global model digest after round 1: {coord.version}; max |global - honest update| = {diff:.3g}")
        finally:
            coord.stop()
            server.stop(0)
    return 0 if not report.honest_failed and report.digest_after == report.digest_before else 1


def loop_wait(thread: threading.Thread, timeout: float) -> bool:
    thread.join(timeout)
    return not thread.is_alive()


if __name__ == "__main__":
    sys.exit(main())

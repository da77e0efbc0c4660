"""Issue 14, sections 4 and 5 (server side): a port in use is refused, and an upload wins over a flood of idle polls."""
from __future__ import annotations

import multiprocessing
import random
import re
import signal
import socket
import threading
import time
from collections import Counter

import grpc
import pytest

from fedserver.app import build_coordinator
from fedserver.service import make_server
from fedserver.storage import RoundLog
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from fedhelpers import start_daemon, stop, tiny_server_config

POLLERS = 100
MAX_WORKERS = 8


def test_config_a_port_in_use_is_refused_with_one_line(tmp_path):
    coord = build_coordinator(tiny_server_config(tmp_path / "srv", insecure=True, eval_size=0))
    first = make_server(coord, "127.0.0.1:0", 4)
    port = first.port
    first.start()
    try:
        # Another fedserver on the port: no second listener sharing it through SO_REUSEPORT.
        with pytest.raises(OSError, match="address already in use") as info:
            make_server(coord, f"127.0.0.1:{port}", 4)
        assert f"127.0.0.1:{port}" in str(info.value) and "\n" not in str(info.value)
    finally:
        first.stop(0)
    with socket.socket() as other:  # another program listening on it
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError, match="address already in use"):
            make_server(coord, f"127.0.0.1:{other.getsockname()[1]}", 4)
    for listen in ("127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:http"):
        with pytest.raises(ValueError, match="port from 0 to 65535"):  # never a random port
            make_server(coord, listen, 4)


def _poller(address: str, n: int, results: multiprocessing.Queue, joined, stop_after_s: float) -> None:
    """n idle devices that join and long-poll until SHUTDOWN, as daemons do; counts each RPC's outcome."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + stop_after_s

    def count(what: str) -> None:
        with lock:
            counts[what] += 1
        if what == "Join OK":
            with joined.get_lock():
                joined.value += 1

    def device(i: int) -> None:
        dev = f"idle-{i:03d}"
        time.sleep(random.uniform(0.0, 1.0))  # a fleet does not start in the same millisecond
        with grpc.insecure_channel(address) as channel:
            stub = pbg.FederationStub(channel)
            session = ""
            while time.monotonic() < end:
                try:
                    if not session:
                        session = stub.Join(pb.JoinRequest(device_id=dev, num_samples=1), timeout=30).session_id
                        count("Join OK")
                    task = stub.GetTask(pb.TaskRequest(device_id=dev, session_id=session), timeout=30)
                except grpc.RpcError as exc:
                    count(f"{'GetTask' if session else 'Join'} {exc.code().name}")
                    time.sleep(random.uniform(0.1, 1.0))  # the daemon's reconnect backoff, shortened
                    continue
                count("GetTask OK")
                if task.kind == pb.Task.SHUTDOWN:
                    return
                time.sleep(task.retry_after_ms / 1000)

    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(dict(counts))


@pytest.mark.slow
def test_load_an_upload_wins_over_a_flood_of_idle_polls(tmp_path):
    """8 threads, 100 idle devices long-polling, one real daemon sampled before them that must upload."""
    cfg = tiny_server_config(tmp_path / "srv", insecure=True, eval_size=0, poll_seconds=3, round_deadline_s=600,
                             local_steps=2)
    coord = build_coordinator(cfg)
    server = make_server(coord, "127.0.0.1:0", MAX_WORKERS)
    port = server.port
    server.start()
    loop = threading.Thread(target=coord.run, daemon=True)
    loop.start()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "real.log"
    # Paced upload (about 4 s for the tiny model): the stream must hold its thread while the polls go on.
    daemon = start_daemon(address, "real", log, "--max-upload-mbit", "8", "--compute-slowdown", "4")
    ctx = multiprocessing.get_context("spawn")
    results, joined = ctx.Queue(), ctx.Value("i", 0)
    pollers = None
    try:
        # The real device alone is sampled; it is held (SIGSTOP) once it has its task, until the flood is on.
        end = time.monotonic() + 300
        while "round 1: task" not in log.read_text() and daemon.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        daemon.send_signal(signal.SIGSTOP)
        assert list(coord.current.assignments) == ["real"], log.read_text()
        pollers = ctx.Process(target=_poller, args=(address, POLLERS, results, joined, 300.0))
        pollers.start()
        end = time.monotonic() + 120
        while joined.value < POLLERS and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(2 * cfg.poll_seconds)  # every idle device is polling now
        daemon.send_signal(signal.SIGCONT)
        t0 = time.monotonic()
        assert daemon.wait(300) == 0, log.read_text()[-3000:]
        under_load_s = time.monotonic() - t0  # printed, never asserted on
        loop.join(60)
        counts = results.get(timeout=120)
    finally:
        if pollers is not None:
            pollers.join(30)
            if pollers.is_alive():
                pollers.kill()
        daemon.send_signal(signal.SIGCONT)
        stop([daemon])
        coord.stop()
        server.stop(0)
    text = log.read_text()
    up = re.search(r"uploaded ([\d.]+) MB .* in ([\d.]+) s .* (\d+) attempts", text)
    refused = {k: v for k, v in counts.items() if not k.endswith(" OK")}
    print(f"\nload: {POLLERS} pollers, {MAX_WORKERS} threads: {dict(sorted(counts.items()))}; real device: "
          f"{up.group(0) if up else 'no upload line'}; RESOURCE_EXHAUSTED in its log: "
          f"{text.count('RESOURCE_EXHAUSTED')}; its round under load took {under_load_s:.1f} s")
    recs = RoundLog(cfg.out / "rounds.jsonl").read()
    assert [(r["client"], r["status"]) for r in recs] == [("real", "aggregated")]
    assert up and up.group(3) == "1", "the real device's upload went through at its first attempt"
    assert "RESOURCE_EXHAUSTED" not in text, "no RPC of the real device was refused"
    assert counts.get("Join OK") == POLLERS and not refused, f"idle polls were refused: {refused}"

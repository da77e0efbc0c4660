"""Helpers for tests that run a real server in-process and daemons as processes."""
from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedserver.app import build_coordinator
from fedserver.config import ServerConfig
from fedserver.rounds import Coordinator
from fedserver.service import make_server
from fedtune.v1 import fedtune_pb2_grpc as pbg


def tiny_server_config(out: Path, **over) -> ServerConfig:
    base = dict(listen="127.0.0.1:0", out=out, preset="tiny", rounds=1, devices_per_round=1, min_updates=1,
                round_deadline_s=120.0, local_steps=1, batch_size=8, learning_rate=1e-3, max_input_tokens=128,
                max_target_tokens=32, eval_size=4, eval_batch_size=4, poll_seconds=1, liveness_s=30.0)
    base.update(over)
    cfg = ServerConfig(**base)
    cfg.validate()
    return cfg


@dataclass
class RunningServer:
    coord: Coordinator
    server: grpc.Server
    port: int
    thread: threading.Thread

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stub(self) -> pbg.FederationStub:
        return pbg.FederationStub(grpc.insecure_channel(self.address))

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.coord.stop()
        self.thread.join(10)
        self.server.stop(0)


def start_server(cfg: ServerConfig, port: int = 0) -> RunningServer:
    coord = build_coordinator(cfg)
    server, bound, _ = make_server(coord, f"127.0.0.1:{port}", 16)
    server.start()
    t = threading.Thread(target=coord.run, daemon=True)
    t.start()
    return RunningServer(coord, server, bound, t)


def start_daemon(address: str, device_id: str, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fedclient", "run", "--server", address, "--device-id", device_id,
            "--data-size", "24", "--threads", "1", "--retry-initial-s", "0.2", "--retry-max-s", "1", *extra]
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)

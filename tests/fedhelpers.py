"""Helpers for tests that run a real server in-process (mutual TLS) and daemons as processes."""
from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcore.channel import ClientSecurity, open_channel
from fedcore.clock import SYSTEM, Clock
from fedserver.app import build_coordinator
from fedserver.certs import Authority, write_cert, write_key
from fedserver.config import ServerConfig
from fedserver.rounds import Coordinator
from fedserver.service import RpcServer, make_server
from fedtune.v1 import fedtune_pb2_grpc as pbg


_FLEETS: dict[Path, Fleet] = {}


class Fleet:
    """A CA and a loopback server certificate; device certificates are issued on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = Authority.create()
        write_cert(root / "ca.pem", self.ca.cert)
        key, cert = self.ca.server(["localhost", "127.0.0.1"])
        write_cert(root / "server.pem", cert)
        write_key(root / "server.key", key)
        self.serials: dict[str, str] = {}
        _FLEETS[root / "ca.pem"] = self

    def server_settings(self) -> dict[str, Path]:
        return {"tls_cert": self.root / "server.pem", "tls_key": self.root / "server.key",
                "tls_ca": self.root / "ca.pem"}

    def security(self, device_id: str) -> ClientSecurity:
        cert_path, key_path = self.root / f"{device_id}.pem", self.root / f"{device_id}.key"
        if not cert_path.exists():
            key, cert = self.ca.device(device_id)
            write_cert(cert_path, cert)
            write_key(key_path, key)
            self.serials[device_id] = format(cert.serial_number, "x")
        return ClientSecurity(tls_ca=self.root / "ca.pem", tls_cert=cert_path, tls_key=key_path)

    def admin_security(self, name: str = "admin") -> ClientSecurity:
        """An operator's certificate (fedtune://admin/<name>): may read status, never act for a device."""
        cert_path, key_path = self.root / f"admin-{name}.pem", self.root / f"admin-{name}.key"
        if not cert_path.exists():
            key, cert = self.ca.admin(name)
            write_cert(cert_path, cert)
            write_key(key_path, key)
        return ClientSecurity(tls_ca=self.root / "ca.pem", tls_cert=cert_path, tls_key=key_path)

    def client_args(self, device_id: str) -> list[str]:
        s = self.security(device_id)
        return ["--tls-ca", str(s.tls_ca), "--tls-cert", str(s.tls_cert), "--tls-key", str(s.tls_key)]


def tiny_server_config(out: Path, fleet: Fleet | None = None, **over) -> ServerConfig:
    """A tiny-preset server config with mutual TLS (a fleet under out/pki unless one is given)."""
    base = dict(listen="127.0.0.1:0", out=out, preset="tiny", rounds=1, devices_per_round=1, min_updates=1,
                round_deadline_s=120.0, local_steps=1, batch_size=8, learning_rate=1e-3, max_input_tokens=128,
                max_target_tokens=32, eval_size=4, eval_batch_size=4, poll_seconds=1, liveness_s=30.0)
    if not over.get("insecure"):
        base.update((fleet or Fleet(Path(out) / "pki")).server_settings())
    base.update(over)
    cfg = ServerConfig(**base)
    cfg.validate()
    return cfg


@dataclass
class RunningServer:
    coord: Coordinator
    server: RpcServer
    port: int
    thread: threading.Thread
    fleet: Fleet | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, device_id: str) -> grpc.Channel:
        """A mutual-TLS channel with device_id's certificate (plaintext if the server is insecure)."""
        security = ClientSecurity(insecure=True) if self.fleet is None else self.fleet.security(device_id)
        return open_channel(self.address, security)

    def stub(self, device_id: str) -> pbg.FederationStub:
        return pbg.FederationStub(self.channel(device_id))

    def wait(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self) -> None:
        self.coord.stop()
        self.thread.join(10)
        self.server.stop(0)


def fleet_of(cfg: ServerConfig) -> Fleet | None:
    """The Fleet whose CA a config made by tiny_server_config trusts."""
    return None if cfg.insecure or cfg.tls_ca is None else _FLEETS[Path(cfg.tls_ca)]


def start_server(cfg: ServerConfig, port: int = 0, clock: Clock = SYSTEM, max_workers: int = 16) -> RunningServer:
    """A server in this process; `clock` (fedcore.clock.manual_clock) lets a test pass deadlines at once."""
    coord = build_coordinator(cfg, clock=clock)
    server = make_server(coord, f"127.0.0.1:{port}", max_workers)
    server.start()
    t = threading.Thread(target=coord.run, daemon=True)
    t.start()
    return RunningServer(coord, server, server.port, t, fleet_of(cfg))


def start_daemon(address: str, device_id: str, log: Path, *extra: str, fleet: Fleet | None = None
                 ) -> subprocess.Popen:
    tls = fleet.client_args(device_id) if fleet is not None else ["--insecure"]
    argv = [sys.executable, "-m", "fedclient", "run", "--server", address, "--device-id", device_id,
            "--data-size", "24", "--threads", "1", "--retry-initial-s", "0.2", "--retry-max-s", "1", *tls, *extra]
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


class CallFuture:
    """What a fake stub's `Upload.future` returns: the call runs when its result is asked for."""

    def __init__(self, fn):
        self.fn = fn

    def result(self):
        return self.fn()

    def cancel(self):
        pass

"""sd_notify: READY, WATCHDOG, STOPPING reach $NOTIFY_SOCKET from the real server and daemon."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedcore.sdnotify import Notifier, Watchdog
from fedserver.config import ServerConfig
from fedlab.simulate import free_port, write_toml
from fedcore.config import to_dict

from fedhelpers import Fleet


def _listen(abstract: bool, tmp_path: Path) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"fedtune-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        return sock, "@" + name
    path = str(tmp_path / f"notify-{uuid.uuid4().hex[:8]}.sock")
    sock.bind(path)
    return sock, path


def _recv_all(sock: socket.socket, timeout: float) -> list[str]:
    sock.settimeout(timeout)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
            sock.settimeout(0.05)
    except socket.timeout:
        return out


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_notifier_sends_to_the_socket(tmp_path, abstract):
    sock, addr = _listen(abstract, tmp_path)
    with sock:
        n = Notifier({"NOTIFY_SOCKET": addr})
        assert n.enabled
        assert n.ready("serving")
        assert n.stopping()
        n.close()
        assert _recv_all(sock, 2) == ["READY=1\nSTATUS=serving", "STOPPING=1"]


def test_notifier_is_a_no_op_outside_systemd():
    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None
    assert n.ready() is False
    assert Watchdog(n).start()._thread is None


def test_watchdog_belongs_to_the_pid_systemd_named():
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000"}).watchdog_s == 4.0
    mine = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_s == 4.0
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_s is None


def test_watchdog_withholds_pings_when_the_main_loop_is_wedged(tmp_path):
    sock, addr = _listen(True, tmp_path)
    with sock:
        wd = Watchdog(Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "10000000"}), status=lambda: "busy")
        wd.beat()
        assert wd.tick()
        wd._last_beat -= 11.0  # the main loop has not beaten for longer than the watchdog period
        assert not wd.tick()
        wd.beat()
        assert wd.tick()
        assert _recv_all(sock, 2) == ["WATCHDOG=1\nSTATUS=busy"] * 2


def _wait_for(sock: socket.socket, wanted: set[str], proc: subprocess.Popen, log: Path, limit_s: float) -> list[str]:
    """Collect messages until every wanted line was seen (the limit only guards against a hang:
    on a loaded 2-core machine a tiny run's start-up and initial evaluation have taken minutes)."""
    got: list[str] = []
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        lines = {ln for m in got for ln in m.splitlines()}
        if wanted <= lines:
            return got
        got += _recv_all(sock, 0.5)
        if proc.poll() is not None:
            got += _recv_all(sock, 0.5)
            lines = {ln for m in got for ln in m.splitlines()}
            if not wanted <= lines:
                pytest.fail(f"process exited ({proc.returncode}) having sent {got}:\n{log.read_text()[-3000:]}")
    pytest.fail(f"no {wanted} within {limit_s} s; got {got}:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_server_and_daemon_notify_ready_watchdog_and_stopping(tmp_path):
    srv_sock, srv_addr = _listen(True, tmp_path)
    dev_sock, dev_addr = _listen(False, tmp_path)
    port = free_port()
    fleet = Fleet(tmp_path / "pki")
    cfg = ServerConfig(listen=f"127.0.0.1:{port}", out=tmp_path / "srv", preset="tiny", rounds=1,
                       devices_per_round=1, min_updates=1, round_deadline_s=120.0, local_steps=2, batch_size=4,
                       max_input_tokens=64, max_target_tokens=16, eval_size=2, eval_batch_size=2, poll_seconds=1,
                       **fleet.server_settings())
    write_toml(tmp_path / "server.toml", to_dict(cfg))
    # 2 s watchdog: pings every second while the loops beat.
    env = dict(os.environ, WATCHDOG_USEC="2000000")
    srv_log, dev_log = tmp_path / "server.log", tmp_path / "dev.log"
    server = subprocess.Popen([sys.executable, "-m", "fedserver", "run", "--config", str(tmp_path / "server.toml")],
                              env=dict(env, NOTIFY_SOCKET=srv_addr), stdout=open(srv_log, "w"),
                              stderr=subprocess.STDOUT)
    daemon = subprocess.Popen([sys.executable, "-m", "fedclient", "run", "--server", f"127.0.0.1:{port}",
                               "--device-id", "notified", "--data-size", "16", "--threads", "1",
                               "--retry-initial-s", "0.2", "--retry-max-s", "1", *fleet.client_args("notified")],
                              env=dict(env, NOTIFY_SOCKET=dev_addr), stdout=open(dev_log, "w"),
                              stderr=subprocess.STDOUT)
    try:
        with srv_sock, dev_sock:
            srv_msgs = _wait_for(srv_sock, {"READY=1", "WATCHDOG=1"}, server, srv_log, 900)
            dev_msgs = _wait_for(dev_sock, {"READY=1", "WATCHDOG=1"}, daemon, dev_log, 900)
            assert daemon.wait(900) == 0, dev_log.read_text()[-3000:]
            assert server.wait(300) == 0, srv_log.read_text()[-3000:]
            srv_msgs += _recv_all(srv_sock, 0.5)
            dev_msgs += _recv_all(dev_sock, 0.5)
    finally:
        for p in (daemon, server):
            if p.poll() is None:
                p.kill()
            p.wait(10)
    for msgs in (srv_msgs, dev_msgs):
        lines = [ln for m in msgs for ln in m.splitlines()]
        # READY comes once, before any STOPPING; STOPPING is the last thing said.
        assert lines.count("READY=1") == 1
        assert "STOPPING=1" in lines and lines.index("READY=1") < lines.index("STOPPING=1")
    assert any(m.startswith("READY=1\nSTATUS=serving on port") for m in srv_msgs), srv_msgs
    assert any(m.startswith("READY=1\nSTATUS=joined 127.0.0.1") for m in dev_msgs), dev_msgs
    assert any(m.startswith("WATCHDOG=1\nSTATUS=") for m in dev_msgs)


def test_watchdog_pings_at_once_on_start(tmp_path):
    # A long period: only the immediate first ping can arrive within the receive window.
    sock, addr = _listen(True, tmp_path)
    with sock:
        wd = Watchdog(Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "600000000"}), status=lambda: "up")
        wd.beat()
        wd.start()
        try:
            assert _recv_all(sock, 5) == ["WATCHDOG=1\nSTATUS=up"]
        finally:
            wd.stop()

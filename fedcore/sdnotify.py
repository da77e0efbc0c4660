"""systemd's notify protocol (sd_notify) without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

A service started with ``Type=notify`` gets ``$NOTIFY_SOCKET``: an AF_UNIX
datagram socket (a path, or ``@name`` in the abstract namespace) to which it
sends newline-separated ``KEY=value`` assignments. With ``WatchdogSec=`` set,
systemd also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and restarts
the service when no ``WATCHDOG=1`` arrives within that time. Outside systemd
the variables are unset and every call here is a no-op.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("fedcore.sdnotify")


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace: leading NUL instead of '@'
    if raw.startswith("/"):
        return raw
    return None  # vsock addresses and the like: not for us


class Notifier:
    """Sends notify messages to ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract address; not notifying systemd", raw)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process systemd watches; a child that inherited
        # the environment must not ping on its parent's behalf.
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines, e.g. ``send(READY=1, STATUS="serving")``; False if not sent."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(text.encode("utf-8", "replace"), self.address)
                return True
            except OSError as exc:
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
                return False

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self, status: str = "") -> bool:
        return self.send(STOPPING=1, STATUS=status) if status else self.send(STOPPING=1)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """Pings systemd's watchdog from a thread, but only while the main loop shows it is alive.

    The main loop calls :meth:`beat` whenever it makes progress (a poll, a
    chunk, a training step). The thread sends ``WATCHDOG=1`` every half of the
    watchdog period as long as the last beat is younger than the period, so a
    wedged main loop stops the pings and systemd restarts the service. With
    ``status`` given, each ping also refreshes ``STATUS=``.
    """

    def __init__(self, notifier: Notifier, status: Callable[[], str] | None = None) -> None:
        self.notifier = notifier
        self.status = status
        self.period_s = notifier.watchdog_s
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._withheld = False

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def start(self) -> Watchdog:
        if self.period_s is None or not self.notifier.enabled or self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        assert self.period_s is not None
        # First ping at once: a short-lived run (or a slow first period) must not leave
        # systemd, or a test reading the socket, without a sign of life.
        self.tick()
        while not self._stop.wait(self.period_s / 2):
            self.tick()

    def tick(self) -> bool:
        """One watchdog period: ping if the main loop beat recently; True when a ping was sent."""
        if self.period_s is None:
            return False
        silent = time.monotonic() - self._last_beat
        if silent >= self.period_s:
            if not self._withheld:
                log.error("main loop silent for %.0f s: withholding the watchdog ping so systemd restarts us",
                          silent)
                self._withheld = True
            return False
        self._withheld = False
        fields: dict[str, str | int] = {"WATCHDOG": 1}
        if self.status is not None:
            try:
                fields["STATUS"] = self.status()
            except Exception as exc:  # a status line must never stop the pings
                log.debug("status for systemd failed: %s", exc)
        return self.notifier.send(**fields)

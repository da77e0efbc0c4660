"""Devices known to the server, when each was last heard from, and what it measured.

The registry is durable (`registry.json` in the run directory, rewritten
atomically on every change): after a server restart the devices' link and
compute estimates, which the round policies and deadlines use, are still
there. Sessions are not: every device must join again, and does so on its own
when the server answers that it does not know its session.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedcore.clock import SYSTEM, Clock

log = logging.getLogger("fedserver.registry")


@dataclass
class Device:
    device_id: str
    session_id: str
    num_samples: int
    capabilities: dict[str, Any]
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    # Measured in earlier rounds: down_Bps, up_Bps, step_s, overhead_s, bytes_down, bytes_up.
    estimates: dict[str, float] = field(default_factory=dict)


class Registry:
    """Not thread-safe by itself: the coordinator calls it under its lock."""

    def __init__(self, liveness_s: float, path: Path | None = None, clock: Clock = SYSTEM) -> None:
        self.liveness_s = liveness_s
        self.clock = clock
        self.path = path
        self.devices: dict[str, Device] = {}
        if path is not None and path.exists():
            try:
                for d in json.loads(path.read_text()).get("devices", []):
                    dev = Device(**d)
                    dev.session_id = ""  # sessions die with the process that issued them
                    dev.last_seen = float("-inf")
                    self.devices[dev.device_id] = dev
                log.info("registry: %d devices known from before a restart", len(self.devices))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("registry %s unreadable (%s); starting empty", path, exc)

    def save(self) -> None:
        if self.path is None:
            return
        from .storage import write_json_atomic
        devices = []
        for d in self.devices.values():
            rec = asdict(d)
            rec["last_seen"] = 0.0  # monotonic clocks mean nothing to another process
            devices.append(rec)
        write_json_atomic(self.path, {"devices": devices})

    def join(self, device_id: str, num_samples: int, capabilities: dict[str, Any]) -> Device:
        # A rejoin (daemon or server restart) gets a new session; the old one stops working.
        old = self.devices.get(device_id)
        dev = Device(device_id, uuid.uuid4().hex, num_samples, capabilities, joined_at=self.clock.time(),
                     last_seen=self.clock.monotonic(), estimates=dict(old.estimates) if old else {})
        self.devices[device_id] = dev
        self.save()
        return dev

    def touch(self, device_id: str, session_id: str) -> Device | None:
        dev = self.devices.get(device_id)
        if dev is None or not session_id or dev.session_id != session_id:
            return None
        dev.last_seen = self.clock.monotonic()
        return dev

    def alive(self) -> list[str]:
        now = self.clock.monotonic()
        return sorted(d.device_id for d in self.devices.values() if now - d.last_seen <= self.liveness_s)

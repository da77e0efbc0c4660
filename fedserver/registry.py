"""Devices known to the server and when each was last heard from."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Device:
    device_id: str
    session_id: str
    num_samples: int
    capabilities: dict[str, Any]
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)


class Registry:
    """Not thread-safe by itself: the coordinator calls it under its lock."""

    def __init__(self, liveness_s: float) -> None:
        self.liveness_s = liveness_s
        self.devices: dict[str, Device] = {}

    def join(self, device_id: str, num_samples: int, capabilities: dict[str, Any]) -> Device:
        # A rejoin (daemon restart) gets a new session; the old one stops working.
        dev = Device(device_id, uuid.uuid4().hex, num_samples, capabilities)
        self.devices[device_id] = dev
        return dev

    def touch(self, device_id: str, session_id: str) -> Device | None:
        dev = self.devices.get(device_id)
        if dev is None or dev.session_id != session_id:
            return None
        dev.last_seen = time.monotonic()
        return dev

    def alive(self) -> list[str]:
        now = time.monotonic()
        return sorted(d.device_id for d in self.devices.values() if now - d.last_seen <= self.liveness_s)

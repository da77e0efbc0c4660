"""Server-side progress of every model transfer: bytes done and total, rate, running byte totals.

The gRPC service reports each chunk it sends or verifies; `fedserver status`
and `/metrics` read snapshots. One small lock, held only to add a number.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

from fedcore.clock import SYSTEM, Clock

DIRECTIONS = ("down", "up")


@dataclass
class Transfer:
    device_id: str
    direction: str  # "down": the global model to a device; "up": an update from one
    round: int
    total: int  # wire bytes announced by the manifest; 0 when unknown in advance (compression)
    done: int = 0  # bytes of this transfer held by the receiver (an upload counts resumed bytes too)
    started: float = 0.0
    ended: float | None = None
    sent_here: int = 0  # bytes that crossed this stream, for the rate

    def seconds(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started

    def rate(self, now: float) -> float:
        s = self.seconds(now)
        return self.sent_here / s if s > 0 else 0.0


class TransferBoard:
    """The current round's transfers (finished ones stay until the next round) and byte totals."""

    def __init__(self, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], Transfer] = {}
        self.bytes_total = dict.fromkeys(DIRECTIONS, 0)

    def begin(self, device_id: str, direction: str, round: int, total: int, done: int = 0) -> Transfer:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}")
        t = Transfer(device_id, direction, round, max(0, total), done, started=self.clock.monotonic())
        with self._lock:
            self._items[(device_id, direction)] = t
        return t

    def add(self, t: Transfer, nbytes: int, done: int | None = None) -> None:
        with self._lock:
            t.sent_here += nbytes
            t.done = t.done + nbytes if done is None else done
            self.bytes_total[t.direction] += nbytes

    def end(self, t: Transfer) -> None:
        with self._lock:
            t.ended = self.clock.monotonic()

    def new_round(self, round: int) -> None:
        """Forget finished transfers of earlier rounds; keep any still running."""
        with self._lock:
            self._items = {k: t for k, t in self._items.items() if t.ended is None or t.round >= round}

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock.monotonic()
        with self._lock:
            items = sorted(self._items.values(), key=lambda t: (t.round, t.device_id, t.direction))
            return [{**{k: v for k, v in asdict(t).items() if k not in ("started", "ended", "sent_here")},
                     "active": t.ended is None, "seconds": t.seconds(now), "rate_bps": t.rate(now)}
                    for t in items]

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(DIRECTIONS, 0)
            for t in self._items.values():
                if t.ended is None:
                    counts[t.direction] += 1
            return counts

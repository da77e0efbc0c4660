"""Who waits for a poll's answer to change: callbacks per device, called by the round loop's thread.

A waiting poll costs one small entry here and no thread: the service
registers a callback that resolves its future on the event loop, and the
coordinator calls the callbacks of the devices whose answer may have
changed (the sampled ones when a round opens, all of them when the run
ends or stops). Callbacks must be cheap and thread-safe.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

Wake = Callable[[], None]


class Wakeups:
    def __init__(self) -> None:
        # Reentrant: a signal handler's stop() wakes everyone, and may interrupt a wake on the same thread.
        self._lock = threading.RLock()
        self._by_device: dict[str, list[Wake]] = {}

    def watch(self, device_id: str, wake: Wake) -> None:
        with self._lock:
            self._by_device.setdefault(device_id, []).append(wake)

    def unwatch(self, device_id: str, wake: Wake) -> None:
        with self._lock:
            waiting = self._by_device.get(device_id)
            if waiting is None:
                return
            try:
                waiting.remove(wake)
            except ValueError:
                pass
            if not waiting:
                del self._by_device[device_id]

    def wake(self, device_ids: Iterable[str]) -> None:
        with self._lock:
            found = [w for d in device_ids for w in self._by_device.get(d, ())]
        for w in found:
            w()

    def wake_all(self) -> None:
        with self._lock:
            found = [w for ws in self._by_device.values() for w in ws]
        for w in found:
            w()

    def __len__(self) -> int:
        """Polls waiting now."""
        with self._lock:
            return sum(len(ws) for ws in self._by_device.values())

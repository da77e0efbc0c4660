"""Time as the code reads it: one object that tests replace to run deadlines without waiting them out.

Everything that measures an interval, sets a deadline or waits on a
condition variable with a timeout asks a `Clock`. `SystemClock` is the real
one; `FakeClock` moves only when told (`advance`) or when a waiter would
otherwise sleep (`wait` jumps to the end of its timeout), so a round whose
deadline is 600 s closes at once in a test, in the same order of events.
"""
from __future__ import annotations

import threading
import time


class Clock:
    """The interface: a monotonic reading, wall time, and waits on a condition."""

    def monotonic(self) -> float:
        raise NotImplementedError

    def time(self) -> float:
        raise NotImplementedError

    def wait(self, cond: threading.Condition, timeout: float) -> bool:
        """Wait on `cond` (held by the caller) for a notify or `timeout` seconds; True if notified."""
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def unix_at(self, monotonic_t: float) -> float:
        """Wall time of a monotonic reading (deadlines told to devices are in Unix time)."""
        return self.time() + (monotonic_t - self.monotonic())


class SystemClock(Clock):
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, cond: threading.Condition, timeout: float) -> bool:
        return cond.wait(timeout)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock(Clock):
    """A clock that tests drive: a wait that is not notified moves the clock on instead of sleeping.

    `wait` yields to other threads for `real_slice` real seconds, so a notify
    ends it early as with a real condition; otherwise it moves the clock by
    its timeout, at most `step` seconds at a time. Callers loop until their
    own deadline, so several waiters (a round loop, long polls) reach their
    deadlines in order, `step` apart at worst, without sleeping through any.
    """

    def __init__(self, start: float = 1000.0, unix: float = 1.8e9, real_slice: float = 0.001,
                 step: float = 1.0) -> None:
        self._now = start
        self._unix0 = unix - start
        self._lock = threading.Lock()
        self.real_slice = real_slice
        self.step = step

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def time(self) -> float:
        with self._lock:
            return self._unix0 + self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._now += seconds

    def wait(self, cond: threading.Condition, timeout: float) -> bool:
        notified = cond.wait(min(max(timeout, 0.0), self.real_slice))
        if not notified:
            self.advance(min(max(timeout, 0.0), self.step))
        return notified

    def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))


SYSTEM = SystemClock()

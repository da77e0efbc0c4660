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
    """A clock that tests drive.

    Auto mode (`step` > 0): a wait that is not notified within `real_slice`
    real seconds moves the clock by its timeout, at most `step` at a time.
    Callers loop until their own deadline, so several waiters (a round loop,
    long polls) reach their deadlines in order, `step` apart at worst,
    without sleeping through any.

    Manual mode (`step` None): time moves only by `advance`; a wait returns
    after `real_slice` real seconds at most (or at a notify), so its caller
    sees an advance within that slice. For tests whose devices do real work
    before a deadline the test then passes at once.
    """

    def __init__(self, start: float = 1000.0, unix: float = 1.8e9, real_slice: float = 0.001,
                 step: float | None = 1.0) -> None:
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
        if not notified and self.step is not None:
            self.advance(min(max(timeout, 0.0), self.step))
        return notified

    def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))


def manual_clock(real_slice: float = 0.05) -> FakeClock:
    """A FakeClock that moves only when the test says so."""
    return FakeClock(real_slice=real_slice, step=None)


SYSTEM = SystemClock()

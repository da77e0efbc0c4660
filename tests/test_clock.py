"""fedcore.clock: the fake clock runs a deadline without waiting it out, and a notify still ends a wait early."""
import threading
import time

from fedcore.clock import SYSTEM, FakeClock


def test_fake_wait_moves_the_clock_not_the_wall():
    clock = FakeClock(step=10.0)
    cond = threading.Condition()
    t0, wall0 = clock.monotonic(), time.monotonic()
    end = t0 + 600.0
    with cond:
        while clock.monotonic() < end:
            clock.wait(cond, end - clock.monotonic())
    assert clock.monotonic() == end
    assert time.monotonic() - wall0 < 5.0  # 60 steps of a millisecond each, not 600 s


def test_fake_wait_is_ended_by_a_notify():
    clock = FakeClock(real_slice=5.0)
    cond = threading.Condition()
    t0 = clock.monotonic()

    def poke():
        time.sleep(0.05)
        with cond:
            cond.notify_all()

    threading.Thread(target=poke).start()
    with cond:
        assert clock.wait(cond, 30.0) is True
    assert clock.monotonic() == t0  # notified: no time passed on the fake clock


def test_unix_at_and_sleep():
    clock = FakeClock(start=100.0, unix=2e9)
    assert clock.unix_at(160.0) == 2e9 + 60.0
    clock.sleep(5.0)
    assert clock.monotonic() == 105.0 and clock.time() == 2e9 + 5.0
    assert abs(SYSTEM.unix_at(SYSTEM.monotonic() + 1.0) - (time.time() + 1.0)) < 0.5


def test_manual_clock_moves_only_when_told():
    from fedcore.clock import manual_clock

    clock = manual_clock(real_slice=0.01)
    cond = threading.Condition()
    t0 = clock.monotonic()
    with cond:
        assert clock.wait(cond, 30.0) is False
    assert clock.monotonic() == t0
    clock.advance(30.0)
    assert clock.monotonic() == t0 + 30.0

"""Issue 19: an idle poll costs no thread, so a sampled device among many idle pollers gets its task at once."""
from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtune.v1 import fedtune_pb2 as pb
from fedserver.metrics import server_registry
from fedcore.clock import FakeClock
from fedserver.rounds import FIRST_POLL_WAIT_S, sample_devices
from fedserver.service import FederationService
from fedserver.wakeups import Wakeups
from fedtune.v1 import fedtune_pb2_grpc as pbg

from fedhelpers import build_coordinator, start_server, tiny_server_config

POLLERS = 300
THREADS = 2  # far fewer server threads than waiting polls


def _wait_for(what: str, cond, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_sampled_device_among_many_idle_pollers_gets_its_task_from_the_poll_it_is_in(tmp_path):
    # The round opens only when the last device joins and polls, once every other device is in a long poll.
    cfg = tiny_server_config(tmp_path / "srv", insecure=True, eval_size=0, devices_per_round=5, min_updates=1,
                             min_devices=POLLERS + 1, poll_seconds=300, liveness_s=600, round_deadline_s=600,
                             rate_limit_rps=0, max_workers=THREADS)
    srv = start_server(cfg, max_workers=THREADS)
    channels = [grpc.insecure_channel(srv.address) for _ in range(6)]
    try:
        stubs = [pbg.FederationStub(c) for c in channels]
        sessions = {}
        for i in range(POLLERS):
            dev = f"dev-{i:04d}"
            sessions[dev] = stubs[i % len(stubs)].Join(pb.JoinRequest(device_id=dev, num_samples=8),
                                                       timeout=30).session_id
        polls = {dev: stubs[i % len(stubs)].GetTask.future(pb.TaskRequest(device_id=dev, session_id=sid),
                                                            timeout=600)
                 for i, (dev, sid) in enumerate(sessions.items())}
        _wait_for("every poll to wait at the server", lambda: len(srv.coord.wakeups) == POLLERS, 60)
        assert not any(f.done() for f in polls.values()), "an idle poll was answered before there was news"
        assert f"fedtune_server_polls_waiting {POLLERS}" in server_registry(srv.coord).render()

        last = f"dev-{POLLERS:04d}"
        t0 = time.monotonic()
        sid = stubs[0].Join(pb.JoinRequest(device_id=last, num_samples=8), timeout=30).session_id
        polls[last] = stubs[0].GetTask.future(pb.TaskRequest(device_id=last, session_id=sid), timeout=600)
        _wait_for("round 1 to open", lambda: srv.coord.current is not None, 60)
        sampled = set(srv.coord.current.assignments)
        got = {dev: polls[dev].result(timeout=60) for dev in sorted(sampled)}
        handed_s = time.monotonic() - t0  # printed, never asserted on
        assert {d: t.kind for d, t in got.items()} == {d: pb.Task.TRAIN for d in sampled}
        assert all(t.task_id == srv.coord.current.assignments[d].task_id for d, t in got.items())
        # The others are still waiting in the same calls: nobody was sent away to make room.
        idle = [f for d, f in polls.items() if d not in sampled]
        assert not any(f.done() for f in idle)
        assert len(srv.coord.wakeups) == POLLERS + 1 - len(sampled)
        print(f"\n{len(sampled)} sampled among {POLLERS} pollers on {THREADS} threads: tasks in {handed_s:.3f} s "
              f"after the last join")
        for f in idle:
            f.cancel()
    finally:
        srv.close()
        for c in channels:
            c.close()


def test_sampling_over_a_large_fleet_is_uniform_seeded_and_order_free():
    fleet = [f"dev-{i:05d}" for i in range(10_000)]
    rounds, k = 1000, 30
    counts = Counter(d for n in range(1, rounds + 1) for d in sample_devices(fleet, k, seed=0, number=n, attempt=1))
    expected = rounds * k / len(fleet)  # 3 picks per device
    chi2 = sum((counts.get(d, 0) - expected) ** 2 / expected for d in fleet)
    # 9,999 degrees of freedom: mean 9,999, sd about 141; 6 sd either side is far outside chance.
    assert abs(chi2 - (len(fleet) - 1)) < 6 * math.sqrt(2 * (len(fleet) - 1)), chi2
    assert all(len(set(sample_devices(fleet, k, 0, n, 1))) == k for n in range(1, 50))
    shuffled = random.Random(1).sample(fleet, len(fleet))
    assert sample_devices(shuffled, k, 0, 7, 1) == sample_devices(fleet, k, 0, 7, 1)
    assert sample_devices(fleet, k, 0, 7, 1) != sample_devices(fleet, k, 0, 7, 2)  # a retried round draws again
    assert sample_devices(fleet, k, 1, 7, 1) != sample_devices(fleet, k, 0, 7, 1)
    assert sample_devices(fleet[:3], k, 0, 1, 1) == fleet[:3]


def test_devices_that_have_not_polled_yet_are_sampled_only_to_fill_the_round():
    polled = [f"p{i:03d}" for i in range(10)]
    joined = [f"j{i:03d}" for i in range(90)]  # joined, first poll not in yet (a fleet joining at once)
    for number in range(1, 51):
        assert set(sample_devices(polled, 5, 0, number, 1, not_polled=joined)) <= set(polled)
    # Fewer ready than the round needs: all of them, and the rest from those that joined.
    got = sample_devices(polled[:2], 5, 0, 1, 1, not_polled=joined)
    assert set(polled[:2]) <= set(got) and len(got) == 5 and len(set(got) - set(polled)) == 3
    # No device has polled: the same sample as over the joined ones alone.
    assert sample_devices([], 5, 0, 3, 1, not_polled=joined) == sample_devices(joined, 5, 0, 3, 1)


def _joined_coordinator(tmp_path, n: int):
    cfg = tiny_server_config(tmp_path / "srv", insecure=True, eval_size=0, devices_per_round=5, min_devices=n,
                             poll_seconds=300, liveness_s=600, round_deadline_s=600)
    clock = FakeClock(step=None)  # time moves only when the test says
    coord = build_coordinator(cfg, clock=clock)
    coord.beats = threading.Semaphore(0)
    coord.heartbeat = coord.beats.release  # one a turn of the round loop
    sessions = {f"dev-{i:02d}": coord.join(f"dev-{i:02d}", 8, {}).session_id for i in range(n)}
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    return coord, clock, sessions, thread


def test_a_round_waits_for_first_polls_and_then_samples_as_the_seed_says(tmp_path):
    """Every device joined; the round waits for the stragglers' first polls, then samples over all of them."""
    coord, clock, sessions, thread = _joined_coordinator(tmp_path, 40)
    try:
        for d in sorted(sessions)[:30]:
            assert coord.poll_task(d, sessions[d]) is None
        clock.advance(FIRST_POLL_WAIT_S / 2)
        for _ in range(3):  # whole turns of the round loop since
            assert coord.beats.acquire(timeout=60)
        assert coord.current is None, "opened before the joined devices' first polls had their time"
        for d in sorted(sessions)[30:]:
            coord.poll_task(d, sessions[d])
        _wait_for("round 1 to open", lambda: coord.current is not None, 60)
        assert sorted(coord.current.assignments) == sample_devices(sorted(sessions), 5, 0, 1, 1)
    finally:
        coord.stop()
        thread.join(30)


def test_devices_that_never_polled_are_sampled_only_to_fill_the_round(tmp_path):
    """40 joined, 5 polled: once the wait for first polls is over, a round of 5 samples exactly those 5."""
    coord, clock, sessions, thread = _joined_coordinator(tmp_path, 40)
    try:
        pollers = sorted(sessions)[::8]
        for d in pollers:
            assert coord.poll_task(d, sessions[d]) is None
        for _ in range(2):  # the round loop has seen enough devices, and started its wait for first polls
            assert coord.beats.acquire(timeout=60)
        clock.advance(FIRST_POLL_WAIT_S + 1)
        _wait_for("round 1 to open", lambda: coord.current is not None, 60)
        assert sorted(coord.current.assignments) == pollers
        coord.join(pollers[0], 8, {})  # a rejoin is a new session: not polled under it yet
        assert not coord.registry.devices[pollers[0]].polled
    finally:
        coord.stop()
        thread.join(30)


def test_a_long_coordinator_lock_holder_never_stalls_the_event_loop(tmp_path):
    """Polls wait for the lock in the pool; health checks and other calls go on meanwhile."""
    cfg = tiny_server_config(tmp_path / "srv", insecure=True, eval_size=0, devices_per_round=2, poll_seconds=300,
                             liveness_s=600, rate_limit_rps=0)
    srv = start_server(cfg, max_workers=2)
    channel = grpc.insecure_channel(srv.address)
    try:
        stub = pbg.FederationStub(channel)
        sid = stub.Join(pb.JoinRequest(device_id="dev-a", num_samples=8), timeout=30).session_id
        with srv.coord.lock:  # as a round opening or a model being committed holds it
            poll = stub.GetTask.future(pb.TaskRequest(device_id="dev-a", session_id=sid), timeout=600)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert not poll.done()
        _wait_for("the poll to wait at the server", lambda: len(srv.coord.wakeups) == 1, 60)
        poll.cancel()
    finally:
        srv.close()
        channel.close()


def test_wakeups_may_be_reentered_from_the_same_thread():
    """A signal handler's stop() wakes everyone, possibly while the round loop's thread is inside a wake."""
    w = Wakeups()
    seen = []
    w.watch("a", lambda: seen.append("a"))
    with w._lock:  # the interrupted wake() holds it
        assert w._lock.acquire(timeout=5), "stop() from a signal handler would deadlock here"
        w._lock.release()
        w.wake_all()
    assert seen == ["a"]


def test_a_call_cancelled_twice_still_waits_for_its_pool_work():
    """An upload's receiver is never touched by two threads: the handler's finally runs after the pool work."""
    pool = ThreadPoolExecutor(1)
    service = FederationService(None, pool)  # type: ignore[arg-type]
    release, order = threading.Event(), []

    def work() -> None:
        release.wait(30)
        order.append("pool work done")

    async def handler() -> None:
        try:
            await service._blocking(work)
        finally:
            order.append("handler finally")

    async def main() -> None:
        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()  # a second cancellation, e.g. gRPC core ending the dead connection's call
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    pool.shutdown()
    assert order == ["pool work done", "handler finally"]

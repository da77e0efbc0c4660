"""The round loop: sample, dispatch, collect until the deadline, aggregate, evaluate, checkpoint.

Knows nothing of gRPC (fedserver.service translates calls and errors) and
names no fine-tuning method (fedcore.methods). Its parts, each a module:
the global model and its versions (fedserver.model), download planning
(fedserver.downloads), upload intake (fedserver.intake), work planning
(round policies, deadlines, upload encodings: fedserver.planning) and the
round records (rounds.jsonl, summary.json: fedserver.roundlog, the schema in
fedcore.records). All shared state is guarded by one
lock; long work (folding an update, evaluating, checkpointing) never holds
it longer than the fold itself. Time comes from an injected clock
(fedcore.clock), so deadline tests do not wait real seconds.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import random
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedcore.clock import SYSTEM, Clock
from fedcore.flops import shape_of_state
from fedcore.methods.partial import DeviceBudget, PlanContext
from fedcore.records import DeviceRound
from fedcore.wire import FrozenStream, StateEncoder
from fedtune.v1 import fedtune_pb2 as pb

from .config import ServerConfig
from .downloads import DownloadPlanner
from .intake import UploadIntake, UploadSession
from .planning import LinkEstimate, choose_encodings, plan_round
from .model import GlobalModel, Resumed
from .registry import Device, Registry
from .roundstate import Assignment, RoundError, RoundState, UpdateRefused
from .roundlog import EvalRecord, RoundRecords, baseline_summary
from .storage import CheckpointDir, StateMismatch
from .strategy import ServerStrategy
from .transfers import TransferBoard
from .wakeups import Wakeups

log = logging.getLogger("fedserver.rounds")

MAX_LINK_BPS = 1e12  # a reported link rate above 8 Tbit/s is a bug or a lie
# A device holding more examples than this is a typo or a lie. With local_epochs (no local_steps) the
# samples a device registers at Join are its FedAvg weight, so this also bounds what a Join can claim.
MAX_NUM_SAMPLES = 1 << 24

__all__ = ["Coordinator", "RoundError", "UpdateRefused", "UploadSession"]


Evaluator = Callable[[Mapping[str, torch.Tensor]], EvalRecord]


# How long a round that has enough devices waits for the first polls of those that joined but have not polled.
# A fleet of 10,000 joining at once on 2 cores gets each device's first poll in within about 4 s of its Join.
FIRST_POLL_WAIT_S = 10.0


def sample_devices(ready: list[str], k: int, seed: int, number: int, attempt: int,
                   not_polled: Sequence[str] = ()) -> list[str]:
    """k of the ready devices, uniformly without replacement; if fewer are ready, all of them and the rest
    drawn from not_polled (joined, no poll yet). The same run, round and attempt give the same sample
    whatever order the devices come in (O(N log N) once a round, not per poll)."""
    rng = random.Random(f"{seed}:{number}:{attempt}")
    picked = rng.sample(sorted(ready), min(k, len(ready)))
    if len(picked) < k and not_polled:
        # Nothing drawn above when no device has polled: the same sample as over not_polled alone.
        picked += rng.sample(sorted(not_polled), min(k - len(picked), len(not_polled)))
    return sorted(picked)


class Coordinator:
    """Runs the rounds; fedserver.service calls the public methods from its event loop and its thread pool."""

    def __init__(self, cfg: ServerConfig, state: Mapping[str, torch.Tensor], strategy: ServerStrategy,
                 evaluator: Evaluator | None = None, model_preset: str = "", model_config_json: str = "",
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 heartbeat: Callable[[], None] | None = None, clock: Clock = SYSTEM) -> None:
        self.cfg, self.strategy, self.evaluator = cfg, strategy, evaluator
        self.model_preset, self.model_config_json = model_preset, model_config_json
        self.heartbeat = heartbeat  # called while the round loop makes progress (systemd watchdog)
        self.clock = clock
        self.lock = threading.Condition()
        self.round_no = 0  # last completed round
        self.current: RoundState | None = None
        self.finished = False  # all rounds done: polls answer SHUTDOWN
        self.told_shutdown: set[str] = set()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointDir(self.out / "checkpoints", keep=cfg.checkpoint_keep)
        self.records = RoundRecords(self.out, cfg, clock, on_round)  # rounds.jsonl and summary.json
        self.registry = Registry(cfg.liveness_s, self.out / "registry.json", clock)
        self.method = cfg.build_method()
        self.model = GlobalModel(state, self.method, cfg.download_delta_keep)
        self.downloads = DownloadPlanner(self.model, cfg.download_spec(), cfg.download_payload)
        self.intake = UploadIntake(cfg, self.model, self.out, self.lock, clock)
        self.links: dict[str, LinkEstimate] = {}
        self._stop = threading.Event()
        self.phase = "starting"
        self.transfers = TransferBoard(clock)
        self.wakeups = Wakeups()  # polls waiting for their answer to change
        self.rounds_completed_here = 0  # by this process, for the Prometheus counter
        self.last_records: list[dict[str, Any]] = []  # the last aggregated round's per-device records
        self._resume()

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The global model, tied tensors under all their names."""
        return self.model.state

    @property
    def version(self) -> str:
        return self.model.version

    def export_state(self) -> Mapping[str, torch.Tensor]:
        """The global model as a plain T5, ties kept."""
        return self.model.export()

    def _resume(self) -> None:
        def resumable(rnd: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Resumed:
            return self.model.resumable(rnd, tensors, meta, self.strategy.name, str(self.checkpoints.root))

        latest = self.checkpoints.load_latest(resumable)
        if latest is None:
            self.records.reconcile(0, None, None)
            return
        rnd, found, _ = latest
        self.model.resume(found)
        if found.opt:
            try:
                self.strategy.load_state_dict(found.opt)
            except ValueError as e:
                raise StateMismatch(f"checkpoint round {rnd} holds optimizer state {self.strategy.name} cannot "
                                    f"take ({e}); use the run's strategy or another --out") from None
        self.round_no = rnd
        self.records.reconcile(rnd, found.records, found.summary)
        log.info("resumed from checkpoint of round %d (model %s)", rnd, self.version[:19])

    # ------------------------------------------------------------- devices
    def join(self, device_id: str, num_samples: int, capabilities: dict[str, Any]) -> Device:
        if num_samples < 0 or num_samples > MAX_NUM_SAMPLES:
            raise RoundError("invalid", f"num_samples {num_samples} is out of range (0 to {MAX_NUM_SAMPLES})")
        with self.lock:
            self._check_serving()
            dev = self.registry.join(device_id, num_samples, capabilities)
            a = self._open_assignment(device_id)
            # After a crash the device has lost its task; the next GetTask gives it again.
            note = f"; task {a.task_id[:8]} of round {self.current.number} ({a.status}) is still its own" if a else ""
            self.lock.notify_all()
        self.wakeups.wake([device_id])  # a poll under its old session ends now
        log.info("device %s joined (%d samples, %s)%s", device_id, num_samples, capabilities.get("accelerator", "?"),
                 note)
        return dev

    def _check_serving(self) -> None:
        """A stopping server sends devices away to come back, never home: it resumes from its checkpoint."""
        if self._stop.is_set() and not self.finished:
            raise RoundError("unavailable", f"the server is stopping; it will resume after round {self.round_no} "
                                            f"from its checkpoint when restarted: reconnect with backoff")

    def _open_assignment(self, device_id: str) -> Assignment | None:
        """The device's assignment in the open round if its update is not settled yet (sampled or uploading)."""
        cur = self.current
        if cur is None or cur.closed:
            return None
        a = cur.assignments.get(device_id)
        return a if a is not None and not a.settled else None

    def _device(self, device_id: str, session_id: str) -> Device:
        dev = self.registry.touch(device_id, session_id)
        if dev is None:
            raise RoundError("precondition", f"device {device_id!r} has no session {session_id!r} here "
                                             f"(not joined, or the server restarted): call Join again")
        return dev

    def poll_task(self, device_id: str, session_id: str) -> pb.Task | None:
        """A poll's answer now: the device's task, SHUTDOWN, or None (nothing yet; `wakeups` says when to ask
        again). Raises RoundError for an unknown session or a stopping server."""
        with self.lock:
            return self._poll(device_id, session_id)

    def _poll(self, device_id: str, session_id: str) -> pb.Task | None:
        dev = self._device(device_id, session_id)
        if not dev.polled:
            dev.polled = True
            self.lock.notify_all()  # the round loop may be waiting for this first poll
        if self.finished:
            self.told_shutdown.add(device_id)
            return pb.Task(kind=pb.Task.SHUTDOWN, round=self.round_no)
        self._check_serving()
        # A device asking for work has no upload of its task under way (it rejoined after a crash, or
        # dropped an update it could not send): it gets the same task again, so the round need not wait
        # for its deadline. What is staged stays: a resume continues it, a fresh upload replaces it.
        a = self._open_assignment(device_id)
        if a is None:
            return None
        if a.status != "sampled":
            log.info("round %d: task %s given again to %s (its update was %s, not complete)",
                     self.current.number, a.task_id[:8], device_id, a.status)
        return self._task_for(self.current, a)

    def next_task(self, device_id: str, session_id: str, timeout: float) -> pb.Task:
        """poll_task, waiting up to `timeout` on this thread (in-process callers; the server's polls hold none)."""
        end = self.clock.monotonic() + timeout
        with self.lock:
            while True:
                task = self._poll(device_id, session_id)
                if task is not None:
                    return task
                left = end - self.clock.monotonic()
                if left <= 0:
                    return pb.Task(kind=pb.Task.WAIT, retry_after_ms=0)
                self.clock.wait(self.lock, left)

    def _task_for(self, cur: RoundState, a: Assignment) -> pb.Task:
        c = self.cfg
        up = c.upload_spec(a.upload_encoding or None)
        task = pb.Task(
            kind=pb.Task.TRAIN, round=cur.number, task_id=a.task_id, model_version=cur.version,
            training=pb.TrainingSettings(
                local_epochs=c.local_epochs, local_steps=a.local_steps, local_samples=a.local_samples,
                batch_size=c.batch_size,
                learning_rate=c.learning_rate, weight_decay=c.weight_decay, max_input_tokens=c.max_input_tokens,
                max_target_tokens=c.max_target_tokens, seed=c.seed * 1000003 + cur.number),
            upload=up.settings(error_feedback=c.error_feedback),
            deadline_unix=self.clock.unix_at(cur.deadline))
        method = self.model.round_method()
        (method.with_plan(a.plan) if a.plan is not None else method).to_task(task.training)
        return task

    # ------------------------------------------------------------ download
    def encoder_for(self, device_id: str, session_id: str, version: str, encoding: int, codec: int,
                    base_version: str = "") -> StateEncoder | FrozenStream | pb.SeedReplay:
        """What a download of `version` streams to a device holding base_version (fedserver.downloads)."""
        with self.lock:
            self._device(device_id, session_id)
            if version and version != self.version:
                raise RoundError("not_found", f"model version {version[:19]}... is not served; "
                                              f"the current version is {self.version[:19]}...")
            return self.downloads.encoder(device_id, encoding, codec, base_version)

    def note_sent(self, device_id: str, version: str, base_version: str, chunk: pb.Chunk) -> None:
        self.downloads.note_sent(device_id, version, base_version, chunk)

    # -------------------------------------------------------------- upload
    def open_upload(self, h: pb.UploadHeader) -> UploadSession:
        """Start or resume the upload `h` describes; checks it belongs to the open round."""
        with self.lock:
            self._device(h.device_id, h.session_id)
            self._check_serving()
            return self.intake.open(self.current, h, self.round_no)

    def take_seeds(self, h: pb.UploadHeader) -> str:
        """A zero-order update (the whole of it is in `h`): validated and counted in the round; its digest."""
        with self.lock:
            self._device(h.device_id, h.session_id)
            self._check_serving()
            return self.intake.take_seeds(self.current, h, self.round_no)

    def finish_upload(self, sess: UploadSession) -> str:
        """Verify the staged update, validate it against the model, and count it in the round."""
        return self.intake.finish(sess, lambda: self.current)

    def refuse_upload(self, sess: UploadSession, reason: str, code: str = "invalid") -> None:
        self.intake.refuse(sess, reason, code)

    def abandon_upload(self, sess: UploadSession) -> None:
        self.intake.abandon(sess)

    def upload_status(self, device_id: str, session_id: str, task_id: str) -> tuple[bool, pb.Position | None, bool]:
        with self.lock:
            self._device(device_id, session_id)
            self._check_serving()
            return self.intake.status(self.current, device_id, task_id)

    # ------------------------------------------------------------- metrics
    def report_metrics(self, device_id: str, session_id: str, m: dict[str, Any]) -> None:
        with self.lock:
            self._device(device_id, session_id)
            cur = self.current
            if cur is None or cur.number != m.get("round"):
                log.warning("metrics from %s for round %s ignored: round %s is current", device_id,
                            m.get("round"), cur.number if cur else None)
                return
            a = cur.assignments.get(device_id)
            if a is None or a.task_id != m.get("task_id"):
                raise RoundError("permission", f"device {device_id!r} has no task {m.get('task_id')!r} in "
                                               f"round {cur.number}")
            a.metrics = m
            self._note_link(device_id, m)
            self.lock.notify_all()

    def _note_link(self, device_id: str, m: dict[str, Any]) -> None:
        """Keep the link rates the device measured (bytes/s in extra); a missing direction keeps its last value."""
        extra = m.get("extra", {})
        old = self.links.get(device_id)
        rates = []
        for key, prev in (("link_down_bps", old.down_bps if old else 0.0), ("link_up_bps", old.up_bps if old else 0.0)):
            v = extra.get(key)
            if v is not None and not 0 < v < MAX_LINK_BPS:
                raise RoundError("invalid", f"extra[{key!r}] = {v} is not a link rate in bytes per second")
            rates.append(v if v is not None else prev)
        if rates[1] > 0:
            self.links[device_id] = LinkEstimate(rates[0], rates[1], float(m.get("t_comp_s", 0.0)))

    # --------------------------------------------------------------- rounds
    def snapshot(self) -> dict[str, Any]:
        """What `fedserver status` and `/metrics` show: a consistent copy, safe to read from any thread."""
        with self.lock:
            cur = self.current
            open_round = cur is not None and not cur.closed
            participants = [{"device_id": a.device_id, "status": a.status, "reported": a.metrics is not None}
                            for a in (cur.assignments.values() if cur is not None else [])]
            snap: dict[str, Any] = {
                "phase": self.phase,
                "round": cur.number if cur is not None else self.round_no,
                "round_open": open_round,
                "rounds_total": self.cfg.rounds,
                "rounds_completed": self.round_no,
                "rounds_completed_here": self.rounds_completed_here,
                "participants": participants,
                "devices_connected": len(self.registry.alive()),
                "devices_known": len(self.registry.devices),
                "deadline_unix": self.clock.unix_at(cur.deadline) if open_round else 0.0,
                "model_version": self.version,
                "last_round": next((dict(s) for s in reversed(self.records.summaries) if s.get("round", 0) > 0),
                                   None),
                "last_records": [dict(r) for r in self.last_records],
            }
        snap["polls_waiting"] = len(self.wakeups)
        snap["transfers"] = self.transfers.snapshot()
        snap["transfers_in_flight"] = self.transfers.in_flight()
        snap["bytes_total"] = dict(self.transfers.bytes_total)
        return snap

    def _beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat()

    def stop(self) -> None:
        """Stop after the current step, to be restarted: devices are told to come back later, not to leave."""
        with self.lock:
            self._stop.set()
            if not self.finished:
                self.phase = "stopping"
            self.lock.notify_all()
        self.wakeups.wake_all()

    def run(self) -> None:
        """Run rounds until cfg.rounds are complete (or stop() is called)."""
        try:
            if self.round_no == 0 and not self.records.summaries:
                self.phase = "evaluating the initial model"
                self._beat()
                ev = self.evaluator(self.export_state()) if self.evaluator else None
                self.records.record_round(baseline_summary(self.version, ev))
            attempts = 0
            while self.round_no < self.cfg.rounds and not self._stop.is_set():
                ok = self._run_round(self.round_no + 1, attempts + 1)
                attempts = 0 if ok else attempts + 1
                if attempts >= 3:
                    raise RuntimeError(f"round {self.round_no + 1} failed 3 times: fewer than "
                                       f"{self.cfg.min_updates} update(s) arrived before each deadline")
        finally:
            with self.lock:
                # Only a run whose rounds are all done sends devices home (SHUTDOWN). A stop or a failure is
                # followed by a restart from the checkpoint, so devices are told to reconnect instead.
                self.finished = self.round_no >= self.cfg.rounds
                if self.finished:
                    self.phase = "finished"
                else:
                    self.phase = "stopped" if self._stop.is_set() else "failed"
                    self._stop.set()
                self.lock.notify_all()
            self.wakeups.wake_all()

    def _wait_for_devices(self) -> list[str]:
        """The connected devices that can afford the method, once enough are connected and can."""
        need = self.cfg.devices_needed
        last_note = 0.0
        enough_since: float | None = None
        with self.lock:
            self.phase = "waiting for devices"
            while not self._stop.is_set():
                self._beat()
                alive = self.registry.alive()
                able, why = self._affordable(alive)
                if len(alive) >= need and len(able) >= self.cfg.min_updates:
                    now = self.clock.monotonic()
                    enough_since = now if enough_since is None else enough_since
                    # Devices that joined a moment ago have their first poll on the way: waiting for it keeps
                    # the sample the seed's over the whole fleet, and finds each sampled device in its poll.
                    if now - enough_since < FIRST_POLL_WAIT_S and any(
                            not self.registry.devices[d].polled for d in able):
                        self.clock.wait(self.lock, min(1.0, FIRST_POLL_WAIT_S - (now - enough_since)))
                        continue
                    if why:
                        log.info("sampling among %d of %d connected devices%s", len(able), len(alive), why)
                    return able
                if self.clock.monotonic() - last_note > 10:
                    short = (f"; a round needs min_updates = {self.cfg.min_updates} that can"
                             if why and len(alive) >= need else "")
                    log.info("waiting for devices: %d of %d connected%s%s", len(alive), need, why, short)
                    last_note = self.clock.monotonic()
                enough_since = None
                self.clock.wait(self.lock, 1.0)
        return []

    def _affordable(self, alive: list[str]) -> tuple[list[str], str]:
        """The devices whose stated memory budget holds a step of the method, and a note on the others.

        Only budgets set in a device's config count: one measured at Join (free
        RAM) is a hint for planners, not a limit. A planning method fits its
        plans to every budget itself.
        """
        if self.method.plans:
            return alive, ""
        budgets = {d: self.registry.devices[d].capabilities.get("budgets") or {} for d in alive}
        stated = {d: int(b.get("memory_bytes", 0)) for d, b in budgets.items()
                  if b.get("memory_source") == "config" and b.get("memory_bytes")}
        if not stated:
            return alive, ""
        out = {d: m for d, m in stated.items() if m < self.step_memory}
        if not out:
            return alive, ""
        why = (f"; {len(out)} cannot afford {self.method.describe()} (a step needs {self.step_memory / 2**20:.0f} "
               f"MiB): "
               + ", ".join(f"{d} ({m / 2**20:.0f} MiB)" for d, m in sorted(out.items())))
        return [d for d in alive if d not in out], why

    def _run_round(self, number: int, attempt: int) -> bool:
        alive = self._wait_for_devices()
        if not alive:
            return False
        # A device that joined has not necessarily polled yet: when a fleet joins at once its first poll
        # queues behind the others' Joins, and a task for it would wait there seconds. A device that has
        # polled is in its poll now, and the round's opening answers it.
        with self.lock:
            ready, not_polled = [], []
            for d in alive:
                (ready if self.registry.devices[d].polled else not_polled).append(d)
        sampled = sample_devices(ready, self.cfg.devices_per_round, self.cfg.seed, number, attempt, not_polled)
        now = self.clock.monotonic()
        with self.lock:
            # The registered samples as of sampling: a rejoin with a larger number cannot raise this round's weight.
            assignments = {d: Assignment(d, uuid.uuid4().hex, registered_samples=self.registry.devices[d].num_samples)
                           for d in sampled}
            deadline_s = plan_round(self.cfg, assignments, {d: self.registry.devices[d].estimates for d in sampled})
            c = self.cfg
            if self.method.plans:
                self._plan_parts(number, assignments)
            choose_encodings(c, number, assignments, self.links,
                             lambda d: self.downloads.expected_bytes(self._held(d)),
                             lambda enc: self.model.wire_bytes(c.upload_spec(enc), self.model.trainable()))
            self.current = RoundState(
                number=number, attempt=attempt, version=self.version, started=now,
                deadline=now + deadline_s, assignments=assignments, mean=self.model.new_mean())
            self.lock.notify_all()
        self.wakeups.wake(sampled)
        log.info("round %d: sampled %s; policy %s: %s; deadline %.0f s", number, ", ".join(sampled),
                 self.cfg.round_policy, ", ".join(
                     f"{d} {a.local_steps} steps" if not a.local_samples else f"{d} {a.local_samples} samples"
                     for d, a in assignments.items()), deadline_s)
        cur = self.current
        self.transfers.new_round(number)
        with self.lock:
            self.phase = "training"
            while not self._stop.is_set():
                self._beat()
                if all(a.settled for a in cur.assignments.values()):
                    break
                left = cur.deadline - self.clock.monotonic()
                if left <= 0:
                    break
                self.clock.wait(self.lock, min(left, 1.0))
            cur.closed = True
            cur.collected_at = self.clock.monotonic()
            self.intake.close(cur)
            got = cur.aggregated
            # Metrics follow the upload reply by a moment; give them a short grace.
            grace_end = self.clock.monotonic() + 5.0
            while any(a.metrics is None for a in got) and self.clock.monotonic() < grace_end:
                self._beat()
                self.clock.wait(self.lock, 0.2)
        if self._stop.is_set():
            return False
        if len(got) < self.cfg.min_updates:
            log.warning("round %d attempt %d: %d of %d updates before the deadline, need %d; retrying",
                        number, attempt, len(got), len(cur.assignments), self.cfg.min_updates)
            self.records.log_devices(self._device_records(cur))
            self.intake.discard(number)
            return False
        self._aggregate(cur)
        return True

    def _aggregate(self, cur: RoundState) -> None:
        self.phase = "aggregating"
        self._beat()
        t0 = self.clock.monotonic()
        self.intake.fold(cur)
        delta_spec = self.cfg.download_delta_spec() if self.cfg.download_payload == "delta" else None
        if self.method.update_form == "seeds":
            nxt = self.model.seed_step(cur.mean, cur.number)
        else:
            covered = cur.mean.covered() if self.method.plans else None
            nxt = self.model.step(self.strategy, cur.mean.mean(), delta_spec, covered)
        with self.lock:
            self.model.commit(nxt)
            self.round_no = cur.number
        t_agg = self.clock.monotonic() - t0
        self.phase = "evaluating"
        self._beat()
        ev = self.evaluator(self.export_state()) if self.evaluator else None
        self.phase = "checkpointing"
        self._beat()
        tensors, meta = self.model.checkpoint(self.strategy)
        records = self._device_records(cur)
        summary = self.records.summary(cur, records, ev, t_agg, self.version, self.strategy.name,
                                       self.method.summary_note, self.method.summary_fields())
        # The checkpoint is the round's commit point and carries its log records, so a crash
        # between the two writes neither loses the round's records nor repeats them.
        meta.update(round=str(cur.number), round_records=json.dumps([r.to_json() for r in records]),
                    round_summary=json.dumps(summary.to_json()))
        self.checkpoints.save(cur.number, tensors, meta)
        self.records.log_devices(records)
        self.records.record_round(summary)
        self._update_estimates(records)
        self.last_records = [r.to_json() for r in records]
        self.rounds_completed_here += 1

    @functools.cached_property
    def step_memory(self) -> int:
        """Peak bytes of one local step of the method at the run's batch and lengths (fedcore.memory)."""
        c, canonical = self.cfg, self.model.canonical()
        return self.method.memory_need(canonical, shape_of_state(canonical), c.batch_size, c.max_input_tokens,
                                       c.max_target_tokens)

    def _held(self, device_id: str) -> str:
        """The version a device holds as far as the server knows: its last trained one, else what it offered at
        Join (a model kept on disk, or the pretrained weights the run starts from)."""
        return self.intake.trained_on.get(device_id) or self.registry.devices[device_id].capabilities.get(
            "cached_version", "")

    def _plan_parts(self, number: int, assignments: Mapping[str, Assignment]) -> None:
        """Each sampled device's TrainPlan from the budgets it stated at Join (the caller holds the lock)."""
        c = self.cfg
        devices = []
        for d, a in assignments.items():
            b = self.registry.devices[d].capabilities.get("budgets") or {}
            steps = a.local_steps or -(-a.local_samples // c.batch_size) or -(
                -c.local_epochs * a.registered_samples // c.batch_size)
            devices.append(DeviceBudget(d, int(b.get("memory_bytes", 0)), float(b.get("compute_flops", 0.0)),
                                        int(b.get("upload_bytes", 0)), float(b.get("head_fraction", 0.0)),
                                        max(1, steps), c.batch_size, c.max_input_tokens, c.max_target_tokens))
        canonical = self.model.canonical()
        spec = c.upload_spec(None)
        ctx = PlanContext(canonical, shape_of_state(canonical), number, c.seed,
                          lambda st: self.model.wire_bytes(spec, st))
        plans = self.method.plan(devices, ctx)
        layout = self.model.layout
        for d, a in assignments.items():
            a.plan = plans[d]
            a.plan.check(layout)
            a.plan_params = sum(math.prod(shape) for _, shape in a.plan.layout(layout).values())
            log.info("round %d: %s trains %s, %d parameters: %s", number, d, a.plan.describe(), a.plan_params,
                     a.plan.note)

    def _device_records(self, cur: RoundState) -> list[DeviceRound]:
        return self.records.device_records(cur, {d: self.downloads.resent(d, cur.version) for d in cur.assignments})

    def _update_estimates(self, records: list[DeviceRound]) -> None:
        """Each device's link rates and step time from this round, for the next rounds' plans."""
        with self.lock:
            for r in records:
                dev = self.registry.devices.get(r.client)
                if dev is None or not r.measured:
                    continue
                e = dev.estimates
                if r.bytes_down and (r.t_down_s or 0) > 0:
                    e["down_Bps"], e["bytes_down"] = r.bytes_down / r.t_down_s, float(r.bytes_down)
                if r.bytes_up and (r.t_up_s or 0) + (r.t_wait_s or 0) > 0:
                    e["up_Bps"] = r.bytes_up / (r.t_up_s + r.t_wait_s)
                    e["bytes_up"] = float(r.bytes_up)
                st = r.step_times or {}
                steps = st.get("steps") or 0
                if steps:
                    # Per step: measured phases plus the emulated slowdown; the rest is per-round overhead.
                    per_step = (sum(v for k, v in st.items() if k != "steps")
                                + r.extra_value("emulated_sleep_s", 0.0)) / steps
                    e["step_s"] = per_step
                    e["overhead_s"] = max(0.0, r.t_comp_s - per_step * steps)
            self.registry.save([r.client for r in records])

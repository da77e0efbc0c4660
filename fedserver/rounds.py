"""The round loop: sample, dispatch, collect until the deadline, aggregate, evaluate, checkpoint.

Knows nothing of gRPC (fedserver.service translates calls and errors) and
names no fine-tuning method (fedcore.methods). Its parts, each a module:
the global model and its versions (fedserver.model), download planning
(fedserver.downloads), upload intake (fedserver.intake), work planning
(the round policies and deadlines below, fedserver.linkplan) and the round
records (rounds.jsonl, summary.json). All shared state is guarded by one
lock; long work (folding an update, evaluating, checkpointing) never holds
it longer than the fold itself. Time comes from an injected clock
(fedcore.clock), so deadline tests do not wait real seconds.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcore.clock import SYSTEM, Clock
from fedcore.config import to_dict
from fedcore.efficiency import NUMERIC_KEYS
from fedcore.wire import FrozenStream, StateEncoder
from fedtune.v1 import fedtune_pb2 as pb

from .config import ServerConfig
from .downloads import DownloadPlanner
from .intake import UploadIntake, UploadSession
from .linkplan import LinkEstimate, choose_upload_encoding
from .model import GlobalModel, Resumed
from .registry import Device, Registry
from .roundstate import Assignment, RoundError, RoundState, UpdateRefused
from .storage import CheckpointDir, RoundLog, StateMismatch, set_aside, write_json_atomic
from .strategy import RunningMean, ServerStrategy
from .transfers import TransferBoard

# tokens_per_s is computed here from tokens and t_comp_s; the rest only the device can know.
HARDWARE_KEYS = tuple(k for k in NUMERIC_KEYS if k != "tokens_per_s")

log = logging.getLogger("fedserver.rounds")

MAX_LINK_BPS = 1e12  # a reported link rate above 8 Tbit/s is a bug or a lie
# A device holding more examples than this is a typo or a lie. With local_epochs (no local_steps) the
# samples a device registers at Join are its FedAvg weight, so this also bounds what a Join can claim.
MAX_NUM_SAMPLES = 1 << 24

__all__ = ["Coordinator", "EvalRecord", "RoundError", "UpdateRefused", "UploadSession"]


@dataclass
class EvalRecord:
    loss: float
    rouge1: float
    rouge2: float
    rougeL: float
    n: int


Evaluator = Callable[[Mapping[str, torch.Tensor]], EvalRecord]


class Coordinator:
    """Runs the rounds; fedserver.service calls the public methods from gRPC threads."""

    def __init__(self, cfg: ServerConfig, state: Mapping[str, torch.Tensor], strategy: ServerStrategy,
                 evaluator: Evaluator | None = None, model_preset: str = "", model_config_json: str = "",
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 heartbeat: Callable[[], None] | None = None, clock: Clock = SYSTEM) -> None:
        self.cfg, self.strategy, self.evaluator = cfg, strategy, evaluator
        self.model_preset, self.model_config_json = model_preset, model_config_json
        self.on_round = on_round
        self.heartbeat = heartbeat  # called while the round loop makes progress (systemd watchdog)
        self.clock = clock
        self.lock = threading.Condition()
        self.round_no = 0  # last completed round
        self.current: RoundState | None = None
        self.finished = False  # all rounds done: polls answer SHUTDOWN
        self.summaries: list[dict[str, Any]] = []
        self.told_shutdown: set[str] = set()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointDir(self.out / "checkpoints", keep=cfg.checkpoint_keep)
        self.round_log = RoundLog(self.out / "rounds.jsonl")
        self.registry = Registry(cfg.liveness_s, self.out / "registry.json", clock)
        self.method = cfg.method()
        self.model = GlobalModel(state, self.method, cfg.download_delta_keep)
        self.downloads = DownloadPlanner(self.model, cfg.download_spec(), cfg.download_payload)
        self.intake = UploadIntake(cfg, self.model, self.out, self.lock, clock)
        self.links: dict[str, LinkEstimate] = {}
        self._stop = threading.Event()
        self.phase = "starting"
        self.transfers = TransferBoard(clock)
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
            self._reconcile_logs(0, None, None)
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
        self._reconcile_logs(rnd, found.records, found.summary)
        log.info("resumed from checkpoint of round %d (model %s)", rnd, self.version[:19])

    def _reconcile_logs(self, rnd: int, records: list[dict[str, Any]] | None,
                        summary: dict[str, Any] | None) -> None:
        """Make rounds.jsonl and summary.json agree with the checkpoint, the commit point of a round.

        A crash can leave records of a round that never committed (it will
        run again), lose some or all records of one that did (the checkpoint
        carries a copy), or repeat an append: the log ends with every
        committed round's records exactly as its checkpoint holds them, and
        each change is said in one warning.
        """
        path = self.round_log.path
        found, bad = self.round_log.salvage()
        kept, notes = reconcile_records(found, rnd, records)
        if bad:
            notes.insert(0, f"corrupt line(s) {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} "
                            f"skipped (the file as it was is kept as {set_aside(path, copy=True).name})")
        if notes:
            log.warning("round log %s: %s", path, "; ".join(notes))
            self.round_log.rewrite(kept)
        self.summaries = self._reconciled_summaries(rnd, summary)

    def _reconciled_summaries(self, rnd: int, committed: dict[str, Any] | None) -> list[dict[str, Any]]:
        """summary.json's rounds up to `rnd`, round `rnd` as its checkpoint holds it; rewritten if that changed.

        summary.json is derived data: one that cannot be read is set aside
        (never deleted) and rebuilt from what the checkpoint holds.
        """
        if not rnd:
            return []
        path = self.out / "summary.json"
        notes: list[str] = []
        try:
            found = _read_summaries(path)
        except ValueError as e:
            found = []
            notes.append(f"unreadable ({e}), set aside as {set_aside(path).name}; rebuilt from the checkpoint")
        kept, seen = [], set()
        for s in found:
            n = _round_of(s)
            if n is not None and n < rnd and n not in seen:
                seen.add(n)
                kept.append(s)
        ours = [s for s in found if s.get("round") == rnd]
        kept += [committed] if committed is not None else ours[:1]
        if kept != found:
            if not notes:
                dropped = len(found) - len(kept) + (1 if ours[:1] != kept[-1:] else 0)
                notes.append(f"{dropped} summaries of uncommitted, repeated or unnumbered rounds dropped"
                             + ("" if ours == kept[-1:] else f"; round {rnd}'s restored from its checkpoint"))
            log.warning("summary %s: %s", path, "; ".join(notes))
            write_json_atomic(path, {"config": _config_dict(self.cfg), "rounds": kept})
        return kept

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

    def next_task(self, device_id: str, session_id: str, timeout: float) -> pb.Task:
        end = self.clock.monotonic() + timeout
        with self.lock:
            while True:
                self._device(device_id, session_id)
                if self.finished:
                    self.told_shutdown.add(device_id)
                    return pb.Task(kind=pb.Task.SHUTDOWN, round=self.round_no)
                self._check_serving()
                # A device asking for work has no upload of its task under way (it rejoined after a crash, or
                # dropped an update it could not send): it gets the same task again, so the round need not wait
                # for its deadline. What is staged stays: a resume continues it, a fresh upload replaces it.
                a = self._open_assignment(device_id)
                if a is not None:
                    if a.status != "sampled":
                        log.info("round %d: task %s given again to %s (its update was %s, not complete)",
                                 self.current.number, a.task_id[:8], device_id, a.status)
                    return self._task_for(self.current, a)
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
        self.method.to_task(task.training)
        return task

    # ------------------------------------------------------------ download
    def encoder_for(self, device_id: str, session_id: str, version: str, encoding: int, codec: int,
                    base_version: str = "") -> StateEncoder | FrozenStream:
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

    def _choose_encodings(self, assignments: Mapping[str, Assignment]) -> None:
        c = self.cfg
        for a in assignments.values():
            if not c.link_aware:
                a.upload_encoding = c.upload_encoding
                continue
            down = self.downloads.expected_bytes(self.intake.trained_on.get(a.device_id, ""))
            choice = choose_upload_encoding(c.link_encoding_list, c.upload_encoding,
                                            lambda enc: self.model.wire_bytes(c.upload_spec(enc),
                                                                              self.model.trainable()),
                                            down,
                                            self.links.get(a.device_id), c.link_target_g, c.link_byte_budget,
                                            c.link_t_comp_s)
            a.upload_encoding, a.encoding_reason = choice.encoding, choice.reason
            log.info("round %d: %s uploads %s: %s", self.round_no + 1, a.device_id, choice.encoding, choice.reason)

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
                "last_round": next((dict(s) for s in reversed(self.summaries) if s.get("round", 0) > 0), None),
                "last_records": [dict(r) for r in self.last_records],
            }
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

    def run(self) -> None:
        """Run rounds until cfg.rounds are complete (or stop() is called)."""
        try:
            if self.round_no == 0 and not self.summaries:
                self.phase = "evaluating the initial model"
                self._beat()
                self._record_round(self._baseline_summary())
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

    def _wait_for_devices(self) -> list[str]:
        need = self.cfg.devices_needed
        last_note = 0.0
        with self.lock:
            self.phase = "waiting for devices"
            while not self._stop.is_set():
                self._beat()
                alive = self.registry.alive()
                if len(alive) >= need:
                    return alive
                if self.clock.monotonic() - last_note > 10:
                    log.info("waiting for devices: %d of %d connected", len(alive), need)
                    last_note = self.clock.monotonic()
                self.clock.wait(self.lock, 1.0)
        return []

    def _run_round(self, number: int, attempt: int) -> bool:
        alive = self._wait_for_devices()
        if not alive:
            return False
        rng = random.Random(f"{self.cfg.seed}:{number}:{attempt}")
        sampled = sorted(rng.sample(sorted(alive), min(self.cfg.devices_per_round, len(alive))))
        now = self.clock.monotonic()
        with self.lock:
            # The registered samples as of sampling: a rejoin with a larger number cannot raise this round's weight.
            assignments = {d: Assignment(d, uuid.uuid4().hex, registered_samples=self.registry.devices[d].num_samples)
                           for d in sampled}
            plan = plan_work(self.cfg, {d: self.registry.devices[d].estimates for d in sampled})
            for d, (steps, samples, expected) in plan.items():
                assignments[d].local_steps, assignments[d].local_samples, assignments[d].expected_s = \
                    steps, samples, expected
            deadline_s = round_deadline(self.cfg, [a.expected_s for a in assignments.values()])
            self._choose_encodings(assignments)
            self.current = RoundState(
                number=number, attempt=attempt, version=self.version, started=now,
                deadline=now + deadline_s, assignments=assignments, mean=RunningMean(self.model.trainable()))
            self.lock.notify_all()
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
            self._log_devices(cur)
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
        nxt = self.model.step(self.strategy, cur.mean.mean(), delta_spec)
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
        summary = self._summary(cur, records, ev, t_agg)
        # The checkpoint is the round's commit point and carries its log records, so a crash
        # between the two writes neither loses the round's records nor repeats them.
        meta.update(round=str(cur.number), round_records=json.dumps(records), round_summary=json.dumps(summary))
        self.checkpoints.save(cur.number, tensors, meta)
        for rec in records:
            self.round_log.append(rec)
        self._record_round(summary)
        self._update_estimates(records)
        self.last_records = records
        self.rounds_completed_here += 1

    def _update_estimates(self, records: list[dict[str, Any]]) -> None:
        """Each device's link rates and step time from this round, for the next rounds' plans."""
        with self.lock:
            for r in records:
                dev = self.registry.devices.get(r["client"])
                if dev is None or "t_comp_s" not in r:
                    continue
                e = dev.estimates
                if r.get("bytes_down") and r.get("t_down_s", 0) > 0:
                    e["down_Bps"], e["bytes_down"] = r["bytes_down"] / r["t_down_s"], float(r["bytes_down"])
                if r.get("bytes_up") and (r.get("t_up_s") or 0) + (r.get("t_wait_s") or 0) > 0:
                    e["up_Bps"] = r["bytes_up"] / (r["t_up_s"] + r["t_wait_s"])
                    e["bytes_up"] = float(r["bytes_up"])
                st = r.get("step_times") or {}
                steps = st.get("steps") or 0
                if steps:
                    # Per step: measured phases plus the emulated slowdown; the rest is per-round overhead.
                    per_step = (sum(v for k, v in st.items() if k != "steps")
                                + (r.get("extra") or {}).get("emulated_sleep_s", 0.0)) / steps
                    e["step_s"] = per_step
                    e["overhead_s"] = max(0.0, r["t_comp_s"] - per_step * steps)
            self.registry.save()

    def _log_devices(self, cur: RoundState) -> list[dict[str, Any]]:
        records = self._device_records(cur)
        for rec in records:
            self.round_log.append(rec)
        return records

    def _device_records(self, cur: RoundState) -> list[dict[str, Any]]:
        records = []
        end = cur.collected_at or self.clock.monotonic()
        wall = max(end - cur.started, 1e-9)
        for a in cur.assignments.values():
            m = dict(a.metrics or {})
            rec: dict[str, Any] = {"round": cur.number, "attempt": cur.attempt, "client": a.device_id,
                                   "status": a.status if a.status in ("aggregated", "refused") else "missing",
                                   "num_samples": a.num_samples, "num_samples_claimed": a.claimed_samples}
            if a.weight_cut:
                rec["weight_cut"] = a.weight_cut
            if a.reason:
                rec["reason"] = a.reason
            if a.upload_encoding:
                rec["upload_encoding"] = a.upload_encoding
            if a.encoding_reason:
                rec["encoding_reason"] = a.encoding_reason
            for k in ("t_comp_s", "t_down_s", "t_up_s", "t_wait_s", "bytes_down", "bytes_up", "tokens",
                      "train_loss", "download_cached", "step_times", "extra"):
                if k in m:
                    rec[k] = m[k]
            lost = _lost_upload_figures(a, m)
            if lost:
                # The server's count stands in for the bytes; the upload times are unknown (null), never 0.
                rec.update(note=lost, bytes_up=a.bytes_in, **({"t_up_s": None, "t_wait_s": None} if m else {}))
            if "t_comp_s" in m:
                rec["t_comm_s"] = None if lost else m["t_down_s"] + m["t_up_s"] + m["t_wait_s"]
                rec["tokens_per_s"] = m["tokens"] / m["t_comp_s"] if m["t_comp_s"] > 0 else 0.0
                rec["g"] = m["t_comp_s"] / rec["t_comm_s"] if rec["t_comm_s"] else None
                # Hardware figures (fedcore.efficiency): what the device did not know is null, never 0.
                extra = m.get("extra") or {}
                for k in HARDWARE_KEYS:
                    rec[k] = extra.get(k)
                rec["power_source"] = m.get("power_source") or None
                rec["hardware"] = m.get("hardware") or None
            extra = m.get("extra") or {}
            rec["policy"] = self.cfg.round_policy
            rec["local_steps_assigned"] = a.local_steps
            rec["local_samples_assigned"] = a.local_samples
            rec["expected_s"] = a.expected_s
            # Waiting for the slowest device, as a share of the round's wall time (server clock).
            rec["idle_ratio"] = (end - a.done_at) / wall if a.done_at is not None else None
            rec["done_s"] = a.done_at - cur.started if a.done_at is not None else None
            rec["bytes_resent_down"] = self.downloads.resent(a.device_id, cur.version)
            rec["bytes_resent_up"] = int(extra.get("bytes_resent_up", 0))
            rec["bytes_resent"] = rec["bytes_resent_down"] + rec["bytes_resent_up"]
            rec["compute_slowdown_emulated"] = extra.get("compute_slowdown", 1.0)
            records.append(rec)
        return records

    def _baseline_summary(self) -> dict[str, Any]:
        ev = self.evaluator(self.export_state()) if self.evaluator else None
        return {"round": 0, "participants": [], "version": self.version, **_eval_fields(ev)}

    def _summary(self, cur: RoundState, records: list[dict[str, Any]], ev: EvalRecord | None,
                 t_agg: float) -> dict[str, Any]:
        got = [r for r in records if r["status"] == "aggregated" and "t_comp_s" in r]
        # T_comm and G come from the devices whose communication figures are known: a lost one is not a zero.
        known = [r for r in got if r["t_comm_s"] is not None]
        t_comp = max((r["t_comp_s"] for r in got), default=0.0)
        t_comm = max((r["t_comm_s"] for r in known), default=None)
        g_comp = max((r["t_comp_s"] for r in known), default=0.0)
        weight = sum(r["num_samples"] for r in got) or 1
        return {
            "round": cur.number,
            "participants": [r["client"] for r in records if r["status"] == "aggregated"],
            "sampled": len(cur.assignments),
            "t_comp_s": t_comp,
            "t_comm_s": t_comm,
            "g": g_comp / t_comm if t_comm else None,
            "figures_unknown": [r["client"] for r in records if r.get("note")],
            "t_down_s": max((r["t_down_s"] for r in got), default=0.0),
            "t_up_s": max((r["t_up_s"] for r in known), default=None),
            "bytes_down": sum(r.get("bytes_down", 0) for r in got),
            "bytes_up": sum(r.get("bytes_up", 0) for r in records if r["status"] == "aggregated"),
            "tokens": sum(r.get("tokens", 0) for r in got),
            "train_loss": sum(r.get("train_loss", 0.0) * r["num_samples"] for r in got) / weight,
            # Dispatch to the last update (or the deadline); aggregation and evaluation not included.
            "wall_s": (cur.collected_at or self.clock.monotonic()) - cur.started,
            "policy": self.cfg.round_policy,
            "idle_ratio_mean": (sum(r["idle_ratio"] for r in got) / len(got)) if got else None,
            "bytes_resent": sum(r.get("bytes_resent", 0) for r in records),
            "aggregate_s": t_agg,
            "version": self.version,
            "strategy": self.strategy.name,
            "download": f"{self.cfg.download_encoding}/{self.cfg.download_codec}"
                        + (f" + {self.cfg.download_delta_encoding} deltas" if self.cfg.download_payload == "delta"
                           else ""),
            "upload": f"{self.cfg.upload_encoding}/{self.cfg.upload_codec}"
                      + (f" {self.cfg.upload_payload}" + (" +EF" if self.cfg.error_feedback else "")
                         if self.cfg.upload_payload == "delta" else "")
                      + self.method.summary_note,
            **self.method.summary_fields(),
            **_eval_fields(ev),
        }

    def _record_round(self, summary: dict[str, Any]) -> None:
        self.summaries.append(summary)
        write_json_atomic(self.out / "summary.json", {"config": _config_dict(self.cfg), "rounds": self.summaries})
        if self.on_round:
            self.on_round(summary)


def _lost_upload_figures(a: Assignment, m: Mapping[str, Any]) -> str:
    """Why an aggregated update's upload figures from the device are unusable ("": they are usable)."""
    if a.status != "aggregated":
        return ""
    if not m:
        return "no metrics arrived: the device went away after the server acknowledged its upload"
    if not m.get("bytes_up") and a.bytes_in:
        return (f"the device reported 0 bytes up for an upload the server received ({a.bytes_in} bytes): its "
                f"upload figures were lost (a restart after the acknowledgement?); upload times unknown")
    return ""


def _eval_fields(ev: EvalRecord | None) -> dict[str, Any]:
    if ev is None:
        return {}
    return {"eval_loss": ev.loss, "rouge1": ev.rouge1, "rouge2": ev.rouge2, "rougeL": ev.rougeL, "eval_n": ev.n}


def _config_dict(cfg: ServerConfig) -> dict[str, Any]:
    return to_dict(cfg)


def _read_summaries(path: Path) -> list[dict[str, Any]]:
    """The rounds of summary.json ([] if there is none); ValueError says why it cannot be read."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    rounds = data.get("rounds") if isinstance(data, dict) else None
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise ValueError("no list of round summaries under 'rounds'")
    return rounds


def _round_of(rec: Mapping[str, Any]) -> int | None:
    n = rec.get("round")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def reconcile_records(records: list[dict[str, Any]], rnd: int, committed: list[dict[str, Any]] | None
                      ) -> tuple[list[dict[str, Any]], list[str]]:
    """The round log as the checkpoint of round `rnd` says it must be, and what had to change ([]: nothing).

    Rounds after `rnd` never committed and records without a round number
    are dropped, repeated records kept once, and the committed attempt of
    round `rnd` made exactly the checkpoint's copy `committed`. Records of its
    failed attempts and of earlier rounds stay as they are.
    """
    notes: list[str] = []
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    beyond = malformed = repeated = 0
    for r in records:
        n = _round_of(r)
        if n is None:
            malformed += 1
            continue
        if n > rnd:
            beyond += 1
            continue
        key = json.dumps(r, sort_keys=True)
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        kept.append(r)
    for count, what in ((beyond, "of uncommitted rounds"), (malformed, "without a round number"),
                        (repeated, "repeated")):
        if count:
            notes.append(f"{count} record(s) {what} dropped")
    if rnd and committed is not None:
        attempt = committed[0].get("attempt") if committed else None
        ours = [r for r in kept if r["round"] == rnd and r.get("attempt") == attempt]
        if ours != committed:
            kept = [r for r in kept if not (r["round"] == rnd and r.get("attempt") == attempt)] + committed
            notes.append(f"round {rnd}: {len(ours)} record(s) in the log, {len(committed)} in its checkpoint; "
                         f"restored the checkpoint's copy")
    return kept, notes


def _expected(e: Mapping[str, float], steps: int, batch_ratio: float = 1.0) -> float | None:
    """Download + compute + upload seconds for `steps` steps, from a device's estimates."""
    need = ("down_Bps", "up_Bps", "step_s", "bytes_down", "bytes_up")
    if not all(e.get(k) for k in need[:3]) or not all(k in e for k in need):
        return None
    return (e["bytes_down"] / e["down_Bps"] + e["bytes_up"] / e["up_Bps"] + e.get("overhead_s", 0.0)
            + steps * e["step_s"] * batch_ratio)


def plan_work(cfg: ServerConfig, estimates: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[int, int, float | None]]:
    """Per device: (local_steps, local_samples, expected seconds) under cfg.round_policy.

    steps: every device runs local_steps (0: local_epochs). samples: every
    device processes the same number of samples; a device with a smaller
    batch takes more steps. time: steps chosen per device so that download +
    compute + upload take the same time on all (Szablewski, Sani, Lane's
    minimal-idle policy); until every sampled device has been measured once
    it falls back to local_steps.
    """
    steps = cfg.local_steps
    if cfg.round_policy == "samples":
        samples = cfg.local_samples or cfg.local_steps * cfg.batch_size
        return {d: (0, samples, None) for d in estimates}
    base = {d: _expected(e, steps) for d, e in estimates.items()}
    if cfg.round_policy == "steps" or any(v is None for v in base.values()) or steps <= 0:
        return {d: (steps, 0, base[d]) for d in estimates}
    budget = cfg.time_budget_s or sum(base.values()) / len(base)  # type: ignore[arg-type]
    plan: dict[str, tuple[int, int, float | None]] = {}
    for d, e in estimates.items():
        fixed = _expected(e, 0) or 0.0
        n = max(1, int((budget - fixed) / e["step_s"]))
        plan[d] = (n, 0, _expected(e, n))
    return plan


def round_deadline(cfg: ServerConfig, expected: list[float | None]) -> float:
    """cfg.round_deadline_s, or with deadline_from_estimates a multiple of the slowest expected time."""
    if not cfg.deadline_from_estimates or not expected or any(x is None for x in expected):
        return cfg.round_deadline_s
    return min(cfg.round_deadline_s, max(cfg.deadline_floor_s, cfg.deadline_safety * max(expected)))  # type: ignore

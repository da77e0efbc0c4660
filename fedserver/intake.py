"""Upload intake: open or resume a device's upload, stage it on disk, verify and validate it, or refuse it.

An update is staged chunk by chunk in a mapped file under the run's
staging dir (concurrent uploads cost disk, not RAM), verified against its
manifest and digest, checked by the method (tensors, shapes, NaN/Inf) and
against the norm bounds, and weighted by at most what its task allowed.
At the round's end `fold` adds the staged updates, in device order, into
the round's running mean. The coordinator's lock guards the sessions: `open`
and `status` run under it, the others take it.
"""
from __future__ import annotations

import logging
import math
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedcore.channel import UPLOAD_RESTART_HINT
from fedcore.clock import Clock
from fedcore.methods import UpdateInvalid
from fedcore.methods.base import update_norm
from fedcore.methods.partial import Plan
from fedcore.methods.zeroorder import SeedPairs
from fedcore.tensorfile import DiskFullError, map_tensors
from fedcore.wire import StateReceiver, WireError, check_manifest, unique_tensors
from fedtune.v1 import fedtune_pb2 as pb

from .config import ServerConfig
from .model import GlobalModel
from .roundstate import Assignment, RoundError, RoundState, UpdateRefused

log = logging.getLogger("fedserver.intake")


class UploadSession:
    """One device's update, staged until every chunk is verified, then folded."""

    def __init__(self, assignment: Assignment, header: pb.UploadHeader, receiver: StateReceiver,
                 max_bytes: int, max_chunks: int) -> None:
        self.assignment = assignment
        self.header = header
        self.receiver = receiver
        self.stream_lock = threading.Lock()
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self.context: Any = None  # the gRPC context of the stream holding stream_lock

    def charge(self, chunk: pb.Chunk) -> None:
        """Count a chunk against the task's budget before it is checked, so no stream is endless."""
        a = self.assignment
        a.bytes_in += len(chunk.payload) + len(chunk.scales)
        a.chunks_in += 1
        if a.bytes_in > self.max_bytes or a.chunks_in > self.max_chunks:
            raise UpdateRefused("exhausted", f"upload for task {self.header.task_id} exceeded its budget of "
                                             f"{self.max_bytes} bytes and {self.max_chunks} chunks "
                                             f"(retries included)")


class UploadIntake:
    """The open round's uploads by task id, and the version each device's last counted update came from."""

    def __init__(self, cfg: ServerConfig, model: GlobalModel, out: Path, lock: threading.Condition,
                 clock: Clock) -> None:
        self.cfg, self.model, self.out, self.lock, self.clock = cfg, model, out, lock, clock
        self.staging = out / "staging"
        # Uploads staged by a process that died belong to a round that will run again.
        shutil.rmtree(self.staging, ignore_errors=True)
        self.sessions: dict[str, UploadSession] = {}
        self.trained_on: dict[str, str] = {}  # device -> the version its last aggregated update was trained from

    def open(self, cur: RoundState | None, h: pb.UploadHeader, last_round: int) -> UploadSession:
        """Start or resume the upload `h` describes, checking it belongs to round `cur`; the caller holds the lock."""
        a = self.check_task(cur, h, last_round)
        if self.model.method.update_form != "tensors":
            raise RoundError("invalid", f"this run's method ({self.model.method.describe()}) takes (seed, value) "
                                        f"pairs in UploadHeader.seeds, not a manifest and chunks")
        return self._open(cur, a, h)

    def check_task(self, cur: RoundState | None, h: pb.UploadHeader, last_round: int) -> Assignment:
        """The assignment `h` is an update for, in the open round; RoundError otherwise (the caller holds the lock)."""
        if cur is None or cur.closed or cur.number != h.round:
            raise RoundError("precondition", f"round {h.round} is not open for uploads "
                                             f"(current round {cur.number if cur else last_round}, "
                                             f"{'closed' if cur is None or cur.closed else 'open'})")
        a = cur.assignments.get(h.device_id)
        if a is None:
            raise RoundError("permission", f"device {h.device_id!r} was not sampled in round {cur.number}")
        if a.task_id != h.task_id:
            raise RoundError("permission", f"task {h.task_id!r} is not device {h.device_id!r}'s task "
                                           f"in round {cur.number}")
        if a.settled:
            raise RoundError("precondition", f"the update for task {h.task_id} was already {a.status}"
                                             + (f" ({a.reason})" if a.reason else ""))
        if h.base_version != cur.version:
            raise RoundError("precondition", f"update trained from {h.base_version[:19]}..., round "
                                             f"{cur.number} is on {cur.version[:19]}...")
        if h.num_samples <= 0:
            raise RoundError("invalid", f"num_samples must be positive, got {h.num_samples}")
        return a

    def _open(self, cur: RoundState, a: Assignment, h: pb.UploadHeader) -> UploadSession:
        sess = self.sessions.get(h.task_id)
        start = (h.start.tensor_index, h.start.offset) if h.HasField("start") else (0, 0)
        if sess is not None:
            nxt = sess.receiver.next_position()
            have = (nxt.tensor_index, nxt.offset) if nxt is not None else None
            if start != (0, 0) or have is None:
                if h.manifest != sess.header.manifest:
                    raise RoundError("aborted", f"task {h.task_id}: the resumed upload's manifest differs from "
                                                f"the staged one; {UPLOAD_RESTART_HINT}")
                if have != start:
                    raise RoundError("aborted", f"resume at tensor {start[0]} offset {start[1]}, but the "
                                                f"server holds up to {have}; ask UploadStatus")
                if h.num_samples != sess.header.num_samples:
                    raise RoundError("invalid", f"task {h.task_id}: the resumed upload claims {h.num_samples} "
                                                f"samples, the one it resumes claimed "
                                                f"{sess.header.num_samples}; resume with the same header")
                log.info("round %d: upload from %s resumes at tensor %d offset %d (%d chunks held)", cur.number,
                         h.device_id, start[0], start[1], sess.receiver.chunks_received)
                return sess
            # A fresh start replaces what was staged; from the device's side an older stream is dead.
            if sess.context is not None:
                sess.context.cancel()
        elif start != (0, 0):
            raise RoundError("aborted", f"nothing staged for task {h.task_id}; {UPLOAD_RESTART_HINT}")
        if len(self.sessions) >= self.cfg.max_concurrent_uploads and h.task_id not in self.sessions:
            raise RoundError("exhausted", f"{len(self.sessions)} uploads already staged; retry later")
        if h.manifest.chunk_elems > self.cfg.max_chunk_elems:
            raise RoundError("exhausted", f"upload chunks of {h.manifest.chunk_elems} elements exceed this "
                                          f"server's max_chunk_elems {self.cfg.max_chunk_elems}")
        if h.manifest.payload not in (pb.WEIGHTS, pb.DELTA):
            raise RoundError("invalid", "upload manifest must say WEIGHTS or DELTA")
        weight, cut = self.bounded_weight(cur, a, h.num_samples)
        try:
            expect = self.model.upload_layout_for(a.plan)
            if a.plan is not None:
                outside = [t.name for t in h.manifest.tensors if t.name not in expect]
                if outside:
                    raise RoundError("invalid", f"upload manifest rejected: tensor {outside[0]!r} is outside this "
                                                f"device's plan for round {cur.number} ({a.plan.describe()})")
            layouts = check_manifest(h.manifest, expect=expect)
            # Staged in a mapped file, not RAM: concurrent uploads cost disk, and a partial one
            # waits there for its device until the round ends.
            path = self.staging / f"round-{cur.number:06d}" / f"{h.device_id}-{h.task_id}.bin"
            # A new file, not the old one truncated: a replaced stream still writing writes elsewhere.
            path.unlink(missing_ok=True)
            dest = map_tensors(path, [(lay.name, lay.dtype, lay.shape) for lay in layouts], create=True)
            receiver = StateReceiver(h.manifest, dest=dest, expect=expect)
        except WireError as exc:
            raise RoundError("invalid", f"upload manifest rejected: {exc}{self.model.method.upload_hint}") from None
        except DiskFullError as exc:
            raise self.staging_full(cur, a, exc) from None
        a.staged, a.manifest = path, h.manifest
        a.status = "uploading"
        a.claimed_samples, a.num_samples, a.weight_cut = h.num_samples, weight, cut
        chunks = sum(len(f) for f in receiver.received)
        sess = UploadSession(a, h, receiver, self.max_update_bytes, self.cfg.max_update_chunks or 2 * chunks + 16)
        self.sessions[h.task_id] = sess
        return sess

    def bounded_weight(self, cur: RoundState, a: Assignment, claim: int) -> tuple[int, str]:
        """(FedAvg weight, why it is below the claim or ""): the claim, at most what the task allowed.

        An update's weight is a number the device sends; alone it would let
        one device own the next model. fedclient.trainer counts each example
        of each step, so an honest claim never exceeds weight_bound() and is
        never cut: honest runs keep their digests.
        """
        bound, how = weight_bound(a, self.cfg.batch_size, self.cfg.local_epochs)
        if bound <= 0:
            # No data registered: nothing an update says can be weighed. Refused for good, the round goes on.
            a.status, a.reason = "refused", (f"device registered {a.registered_samples} samples at Join: no data "
                                             f"to weigh an update by")
            self.sessions.pop(a.task_id, None)
            self.lock.notify_all()
            log.warning("round %d: update from %s refused: %s", cur.number, a.device_id, a.reason)
            raise UpdateRefused("invalid", f"update refused: {a.reason}")
        if claim <= bound:
            return claim, ""
        return bound, f"claimed {claim} samples; its task was {how}: at most {bound}"

    def staging_full(self, cur: RoundState, a: Assignment, exc: DiskFullError) -> RoundError:
        """A full staging disk refuses this upload only: the device keeps its update and retries."""
        # A fresh start had already replaced the staged file: whatever was staged for the task is gone.
        self.sessions.pop(a.task_id, None)
        if a.status == "uploading":
            a.status = "sampled"
        log.error("round %d: upload from %s not taken: server staging dir %s is full (%s); free space there "
                  "or move --out to a larger disk", cur.number, a.device_id, self.staging, exc)
        return RoundError("exhausted", f"server staging dir {self.staging} is full: {exc}; keep the update "
                                       f"and retry later")

    def take_seeds(self, cur: RoundState | None, h: pb.UploadHeader, last_round: int) -> str:
        """Validate a zero-order update and count it in the round; its digest. The caller holds the lock: the
        update is a few KB, checked and kept in memory at once (a crash reruns the round, as for staged files)."""
        a = self.check_task(cur, h, last_round)
        assert cur is not None
        method = self.model.method
        if method.update_form != "seeds":
            raise RoundError("invalid", f"this run's method ({method.describe()}) takes tensor uploads (a manifest "
                                        f"and chunks), not (seed, value) pairs")
        self.sessions.pop(a.task_id, None)  # a seed run stages no chunked uploads; none may linger for the task
        weight, cut = self.bounded_weight(cur, a, h.num_samples)
        pairs = SeedPairs.from_proto(h.seeds)
        bound, _ = weight_bound(a, self.cfg.batch_size, self.cfg.local_epochs)
        max_steps = a.local_steps if a.local_steps > 0 and not a.local_samples else bound  # a step takes >= 1 sample
        try:
            method.check_pairs(pairs, max_steps)
        except UpdateInvalid as exc:
            self._refuse(a, cur.number, str(exc))
        norm = method.update_norm(pairs, self.model.state)
        bound_norm, clip = self.cfg.max_update_norm, self.cfg.clip_update_norm
        if not math.isfinite(norm) or (bound_norm > 0 and norm > bound_norm):
            self._refuse(a, cur.number, f"update norm {norm:.4g} (learning_rate x the directions' length) exceeds "
                                        f"max_update_norm {bound_norm:g}")
        a.clip_scale = clip / norm if clip > 0 and norm > clip else 1.0
        a.seeds = pairs
        a.status = "aggregated"
        a.claimed_samples, a.num_samples, a.weight_cut = h.num_samples, weight, cut
        a.bytes_in += h.seeds.ByteSize()
        a.done_at = self.clock.monotonic()
        self.trained_on[a.device_id] = cur.version
        self.lock.notify_all()
        log.info("round %d: update from %s: %d (seed, value) pairs over %d steps, %d bytes (%d samples)", cur.number,
                 a.device_id, len(pairs.seeds), pairs.steps, h.seeds.ByteSize(), a.num_samples)
        return pairs.digest()

    @property
    def max_update_bytes(self) -> int:
        return self.cfg.max_update_bytes if self.cfg.max_update_bytes > 0 else self.model.max_update_bytes()

    def finish(self, sess: UploadSession, current: Callable[[], RoundState | None]) -> str:
        """Verify the staged update and validate it against the model; it counts in the round (folded at its end)."""
        update = sess.receiver.finish(verify_digest=True)
        canonical = {e.name: e.tensor for e in unique_tensors(update)}
        is_delta = sess.header.manifest.payload == pb.DELTA
        # The round's base model does not change until the round closes, so this needs no lock.
        glob = self.model.trainable()
        clip_scale = self.validated_delta(sess, canonical, glob, is_delta)
        del canonical
        digest_value = sess.header.manifest.digest
        with self.lock:
            cur = current()
            a = sess.assignment
            mine = self.sessions.get(sess.header.task_id) is sess
            if mine:
                del self.sessions[sess.header.task_id]
            if cur is None or cur.closed or cur.assignments.get(a.device_id) is not a:
                if not a.settled:  # a replaced stream ending late must not undo the update that counted
                    a.status = "late"
                raise RoundError("precondition", f"round {sess.header.round} closed before the update arrived")
            if not mine:  # the device started this task's upload again; the newer stream is the one that counts
                raise RoundError("aborted", f"task {sess.header.task_id}: this upload was replaced by a newer one "
                                            f"from the device")
            a.status = "aggregated"
            a.clip_scale = clip_scale
            a.done_at = self.clock.monotonic()
            self.trained_on[a.device_id] = cur.version
            self.lock.notify_all()
        log.info("round %d: update from %s verified and staged (%d samples, %s)", cur.number, a.device_id,
                 a.num_samples, "delta" if is_delta else "weights")
        if a.weight_cut:
            log.warning("round %d: update from %s weighted %d samples, not the %d it claims: %s", cur.number,
                        a.device_id, a.num_samples, a.claimed_samples, a.weight_cut)
        return digest_value

    def validated_delta(self, sess: UploadSession, update: Mapping[str, torch.Tensor],
                        glob: Mapping[str, torch.Tensor], is_delta: bool) -> float:
        """Refuse NaN/Inf and norms of update - global above the bound; the clip scale for the fold (1: none)."""
        try:
            self.model.method.check_update(update, glob, *self._plan(sess.assignment))
        except UpdateInvalid as exc:
            self.refuse(sess, str(exc))
        norm = update_norm(self.model.method.update_delta(update, glob, is_delta, *self._plan(sess.assignment)))
        bound, clip = self.cfg.max_update_norm, self.cfg.clip_update_norm
        if not math.isfinite(norm) or (bound > 0 and norm > bound):
            self.refuse(sess, f"update norm {norm:.4g} exceeds max_update_norm {bound:g}")
        if clip > 0 and norm > clip:
            log.info("round %d: update from %s clipped from norm %.4g to %.4g", sess.header.round,
                     sess.assignment.device_id, norm, clip)
            return clip / norm
        return 1.0

    @staticmethod
    def _plan(a: Assignment) -> tuple[()] | tuple[Plan]:
        """The plan argument of the method's update checks (none for methods without plans)."""
        return () if a.plan is None else (a.plan,)

    def refuse(self, sess: UploadSession, reason: str, code: str = "invalid") -> None:
        """Refuse the task's update for good: logged with the reason, the round goes on without it."""
        with self.lock:
            if self.sessions.get(sess.header.task_id) is sess:
                del self.sessions[sess.header.task_id]
            self._refuse(sess.assignment, sess.header.round, reason, code)

    def _refuse(self, a: Assignment, rnd: int, reason: str, code: str = "invalid") -> None:
        """`refuse` once the caller holds the lock."""
        if not a.settled:
            a.status, a.reason = "refused", reason[:500]
        self.lock.notify_all()
        log.warning("round %d: update from %s refused: %s", rnd, a.device_id, reason)
        raise UpdateRefused(code, f"update refused: {reason}")

    def fold(self, cur: RoundState) -> None:
        """Fold the round's updates in device-id order, one mapped file at a time.

        Floating-point sums depend on their order; folding at the round's end
        in a fixed order makes the new model independent of when each upload
        arrived (a disturbed run equals an undisturbed one bit for bit), while
        memory stays at one accumulator plus the pages of one update.
        """
        glob = self.model.trainable()
        for a in sorted(cur.aggregated, key=lambda a: a.device_id):
            if a.seeds is not None:
                p = a.seeds
                cur.mean.add({(b, k): v * a.clip_scale for k, v, b in zip(p.seeds, p.values, p.blocks)},
                             float(a.num_samples), self.model.method.decay(p.steps))
                if self.cfg.save_updates:
                    self._save_update(cur.number, a.device_id, p.to_tensors(), a.num_samples, False)
                continue
            assert a.staged is not None and a.manifest is not None
            layouts = check_manifest(a.manifest)
            update = map_tensors(a.staged, [(lay.name, lay.dtype, lay.shape) for lay in layouts])
            is_delta = a.manifest.payload == pb.DELTA
            delta = {k: d * a.clip_scale
                     for k, d in self.model.method.update_delta(update, glob, is_delta, *self._plan(a)).items()}
            cur.mean.add(delta, float(a.num_samples), *self._plan(a))
            if self.cfg.save_updates:
                self._save_update(cur.number, a.device_id, update, a.num_samples, is_delta)
            del update, delta
        shutil.rmtree(self.staging / f"round-{cur.number:06d}", ignore_errors=True)

    def _save_update(self, rnd: int, device_id: str, state: Mapping[str, torch.Tensor], n: int, delta: bool) -> None:
        from .storage import save_checkpoint
        path = self.out / "updates" / f"round-{rnd:06d}" / f"{device_id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {k: v.contiguous() for k, v in state.items()},
                        {"num_samples": str(n), "payload": "delta" if delta else "weights"})

    def abandon(self, sess: UploadSession) -> None:
        """Drop a staged upload that failed a check; the device may start again."""
        with self.lock:
            if self.sessions.get(sess.header.task_id) is sess:
                del self.sessions[sess.header.task_id]
                if sess.assignment.status == "uploading":
                    sess.assignment.status = "sampled"

    def status(self, cur: RoundState | None, device_id: str, task_id: str) -> tuple[bool, pb.Position | None, bool]:
        """(staged here, where to resume, already aggregated); the caller holds the lock."""
        sess = self.sessions.get(task_id)
        if sess is None or sess.assignment.device_id != device_id:
            done = (cur is not None and device_id in cur.assignments
                    and cur.assignments[device_id].task_id == task_id
                    and cur.assignments[device_id].status == "aggregated")
            return False, None, done
        return True, sess.receiver.next_position(), False

    def close(self, cur: RoundState) -> None:
        """The round closed: its streams are no longer taken (the caller holds the lock)."""
        for tid in [t for t, s in self.sessions.items() if s.assignment in cur.assignments.values()]:
            del self.sessions[tid]

    def discard(self, number: int) -> None:
        """Remove what round `number` staged (it failed and runs again)."""
        shutil.rmtree(self.staging / f"round-{number:06d}", ignore_errors=True)


def weight_bound(a: Assignment, batch_size: int, local_epochs: int) -> tuple[int, str]:
    """The most samples fedclient.trainer can count for `a`'s task, and the task in words.

    The trainer counts every example of every step; a step takes at most
    batch_size examples and never more than the device holds. A `samples`
    task runs ceil(local_samples / b) steps of a batch b <= batch_size (a
    device may cap its batch), which count at most
    local_samples + min(b, registered) - 1.
    """
    reg = a.registered_samples
    per_step = min(batch_size, reg)
    if a.local_samples > 0:
        return (a.local_samples + per_step - 1 if reg > 0 else 0,
                f"{a.local_samples} samples in batches of up to {per_step} of {reg} registered")
    if a.local_steps > 0:
        return (a.local_steps * per_step,
                f"{_plural(a.local_steps, 'step')} x batch {per_step} of {reg} registered samples")
    return local_epochs * reg, f"{_plural(local_epochs, 'epoch')} of {reg} registered samples"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")

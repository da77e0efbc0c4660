"""The round state machine: sample, dispatch, collect, deadline, aggregate, evaluate, checkpoint.

Knows nothing of gRPC: fedserver.service translates calls and errors. All
shared state is guarded by one lock; long work (folding an update, evaluating,
checkpointing) never holds it longer than the fold itself.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedcore import lora
from fedcore.channel import UPLOAD_RESTART_HINT
from fedcore.config import to_dict
from fedcore.efficiency import NUMERIC_KEYS
from fedcore.tensorfile import DiskFullError, map_tensors
from fedcore.wire import (ErrorFeedback, FrozenStream, StateEncoder, StateReceiver, TransferSpec, WireError,
                          apply_delta, check_manifest, codec_name, encoding_name, layout_of, state_digest, subtract,
                          tensor_wire_bytes, unique_tensors)
from fedtune.v1 import fedtune_pb2 as pb

from .config import ServerConfig
from .linkplan import LinkEstimate, choose_upload_encoding
from .registry import Device, Registry
from .storage import CheckpointDir, CheckpointError, RoundLog, StateMismatch, set_aside, write_json_atomic
from .strategy import RunningMean, ServerStrategy
from .transfers import TransferBoard
from .versions import DeltaHistory, DeltaStep

# tokens_per_s is computed here from tokens and t_comp_s; the rest only the device can know.
HARDWARE_KEYS = tuple(k for k in NUMERIC_KEYS if k != "tokens_per_s")

log = logging.getLogger("fedserver.rounds")

OPT_PREFIX = "server_opt/"
EF_PREFIX = "server_ef/"  # the broadcast-delta quantization residual, checkpointed with the model
# LoRA checkpoints hold the merged model under the model's own names (it loads into a T5 as is) and the
# unmerged weights of the adapted layers under this prefix, so a restarted server continues exactly.
LORA_BASE_PREFIX = "lora_base/"
MAX_LINK_BPS = 1e12  # a reported link rate above 8 Tbit/s is a bug or a lie
# A device holding more examples than this is a typo or a lie. With local_epochs (no local_steps) the
# samples a device registers at Join are its FedAvg weight, so this also bounds what a Join can claim.
MAX_NUM_SAMPLES = 1 << 24


class RoundError(Exception):
    """A request the round cannot take; `code` names the kind for the service."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "not_found", "precondition", "permission", "exhausted", "invalid", "aborted", "unavailable"


class UpdateRefused(RoundError):
    """The update failed validation; it is recorded in the round log and never aggregated."""


@dataclass
class Assignment:
    device_id: str
    task_id: str
    num_samples: int = 0  # the update's FedAvg weight: its claim, bounded by the work its task allowed
    registered_samples: int = 0  # what the device registered at Join when it was sampled
    claimed_samples: int = 0  # what its upload header said
    weight_cut: str = ""  # why num_samples is below the claim ("" when it is not)
    status: str = "sampled"  # sampled -> uploading -> aggregated (verified, staged on disk) | late | refused
    metrics: dict[str, Any] | None = None
    reason: str = ""  # why the update was refused
    bytes_in: int = 0  # wire bytes and chunks received for this task, every attempt counted
    chunks_in: int = 0
    clip_scale: float = 1.0  # applied to the update's delta when it is folded (clip_update_norm)
    local_steps: int = 0  # what the round policy asked of this device
    local_samples: int = 0
    expected_s: float | None = None  # the policy's estimate of download + compute + upload
    staged: Path | None = None  # the verified update, on disk until the round folds it
    manifest: pb.Manifest | None = None
    done_at: float | None = None  # monotonic time the update was complete

    @property
    def settled(self) -> bool:
        return self.status in ("aggregated", "late", "refused")
    upload_encoding: str = ""
    encoding_reason: str = ""


@dataclass
class RoundState:
    number: int
    attempt: int
    version: str
    started: float
    deadline: float
    assignments: dict[str, Assignment]
    mean: RunningMean
    closed: bool = False
    collected_at: float | None = None  # when the last update arrived or the deadline passed

    @property
    def aggregated(self) -> list[Assignment]:
        return [a for a in self.assignments.values() if a.status == "aggregated"]


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


@dataclass
class EvalRecord:
    loss: float
    rouge1: float
    rouge2: float
    rougeL: float
    n: int


Evaluator = Callable[[Mapping[str, torch.Tensor]], EvalRecord]


@dataclass
class Coordinator:
    """Runs the rounds; fedserver.service calls the public methods from gRPC threads."""

    cfg: ServerConfig
    state: dict[str, torch.Tensor]  # the global model, tied tensors under all their names
    strategy: ServerStrategy
    evaluator: Evaluator | None = None
    model_preset: str = ""
    model_config_json: str = ""
    on_round: Callable[[dict[str, Any]], None] | None = None
    heartbeat: Callable[[], None] | None = None  # called while the round loop makes progress (systemd watchdog)

    registry: Registry = field(init=False)
    version: str = field(init=False)
    round_no: int = field(init=False, default=0)  # last completed round
    current: RoundState | None = field(init=False, default=None)
    finished: bool = field(init=False, default=False)  # all rounds done: polls answer SHUTDOWN
    summaries: list[dict[str, Any]] = field(init=False, default_factory=list)
    told_shutdown: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.lock = threading.Condition()
        self.out = Path(self.cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointDir(self.out / "checkpoints", keep=self.cfg.checkpoint_keep)
        self.round_log = RoundLog(self.out / "rounds.jsonl")
        self.registry = Registry(self.cfg.liveness_s, self.out / "registry.json")
        self.staging = self.out / "staging"
        # Uploads staged by a process that died belong to a round that will run again.
        shutil.rmtree(self.staging, ignore_errors=True)
        self._sent_lock = threading.Lock()
        self._sent: dict[tuple[str, str], tuple[set[tuple[str, int]], list[int]]] = {}
        self.state = clone_state(self.state)
        self.lora = self.cfg.lora_spec()
        # What devices train and upload, and the strategy updates: every tensor, or with LoRA the B matrices.
        self.trainable: list[str] | None = lora.trainable_names(self.state) if self.lora else None
        if self.lora and not self.trainable:
            raise ValueError("lora_rank > 0 but the global state holds no LoRA adapters")
        self.layout = layout_of(self.state)
        self.upload_layout = self.layout if self.trainable is None else {k: self.layout[k] for k in self.trainable}
        self.version = state_digest(unique_tensors(self.state))
        # LoRA: the versions of this run, which all share every frozen tensor (base weights and A), so a device
        # holding any of them needs only the B matrices of the current one.
        self.versions: list[str] = [self.version]
        self._encoders: dict[tuple, StateEncoder] = {}  # (version, encoding, codec[, base version])
        self._uploads: dict[str, UploadSession] = {}
        self.history = DeltaHistory(self.cfg.download_delta_keep)
        self.broadcast_ef = ErrorFeedback()
        self.links: dict[str, LinkEstimate] = {}
        self.trained_on: dict[str, str] = {}  # device -> the version its last aggregated update was trained from
        self._stop = threading.Event()
        self.phase = "starting"
        self.transfers = TransferBoard()
        self.rounds_completed_here = 0  # by this process, for the Prometheus counter
        self.last_records: list[dict[str, Any]] = []  # the last aggregated round's per-device records
        self._resume()

    # ------------------------------------------------------------ model state
    def _canonical(self) -> dict[str, torch.Tensor]:
        return {e.name: e.tensor for e in unique_tensors(self.state)}

    def _trainable(self) -> dict[str, torch.Tensor]:
        canonical = self._canonical()
        return canonical if self.trainable is None else {k: canonical[k] for k in self.trainable}

    def export_state(self) -> dict[str, torch.Tensor]:
        """The global model as a plain T5 (LoRA adapters merged into their layers), ties kept."""
        return lora.merged(self.state, self.lora.scaling) if self.lora else self.state

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        # Aliases included: storage keeps ties, and the model part of the file loads into a T5 as is.
        tensors = dict(self.export_state())
        if self.lora:
            for m in lora.adapter_modules(self.state):
                tensors[LORA_BASE_PREFIX + m + ".weight"] = self.state[m + ".weight"]
            tensors.update({k: v for k, v in self.state.items() if lora.is_adapter(k)})
        for k, v in self.strategy.state_dict().items():
            tensors[OPT_PREFIX + k] = v
        for k, v in self.broadcast_ef.residual.items():
            tensors[EF_PREFIX + k] = v
        return tensors

    def _aliases(self) -> dict[str, list[str]]:
        return {e.name: e.aliases for e in unique_tensors(self.state)}

    def _set_global(self, canonical: Mapping[str, torch.Tensor], aliases: Mapping[str, list[str]]) -> None:
        new: dict[str, torch.Tensor] = {}
        for name, t in canonical.items():
            new[name] = t
            for a in aliases.get(name, []):
                new[a] = t
        # Keep the state dict's order so manifests and digests are stable.
        self.state = {k: new[k] for k in self.state}
        self.version = state_digest(unique_tensors(self.state))
        self._encoders.clear()

    def _resume(self) -> None:
        latest = self.checkpoints.load_latest(self._resumable)
        if latest is None:
            self._reconcile_logs(0, None, None)
            return
        rnd, found, _ = latest
        self.state, self.version = found.model, found.version
        self.versions = found.versions or [self.version]
        self.broadcast_ef.commit(found.residual)
        if found.opt:
            try:
                self.strategy.load_state_dict(found.opt)
            except ValueError as e:
                raise StateMismatch(f"checkpoint round {rnd} holds optimizer state {self.strategy.name} cannot "
                                    f"take ({e}); use the run's strategy or another --out") from None
        self.round_no = rnd
        self._reconcile_logs(rnd, found.records, found.summary)
        log.info("resumed from checkpoint of round %d (model %s)", rnd, self.version[:19])

    def _resumable(self, rnd: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> _Resumed:
        """Split a verified checkpoint into what a resumed server uses.

        Raises StateMismatch for a run this server's settings cannot continue
        (another preset, LoRA setting or strategy: nothing to fall back on) and
        CheckpointError for content that is not what the file says it is.
        """
        def mismatch(why: str) -> StateMismatch:
            return StateMismatch(f"checkpoint round {rnd} in {self.checkpoints.root} {why}; use the run's "
                                 f"settings or another --out")

        written = meta.get("lora", "")
        if written != (self.lora.describe() if self.lora else ""):
            raise mismatch(f"was written {'with ' + written if written else 'without LoRA'}, this server is set "
                           f"for {self.lora.describe() if self.lora else 'full fine-tuning'}")
        if meta.get("strategy", self.strategy.name) != self.strategy.name:
            raise mismatch(f"was written by strategy {meta['strategy']}, this server runs {self.strategy.name}")
        model = {k: v for k, v in tensors.items() if not k.startswith((OPT_PREFIX, EF_PREFIX, LORA_BASE_PREFIX))}
        # LoRA: the adapted layers' unmerged weights replace the merged ones.
        model.update({k[len(LORA_BASE_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_BASE_PREFIX)})
        missing = set(self.state) - set(model)
        if missing:
            raise mismatch(f"lacks {len(missing)} model tensors, e.g. {sorted(missing)[0]} (a run of another "
                           f"preset?)")
        for k, t in self.state.items():
            if (model[k].dtype, model[k].shape) != (t.dtype, t.shape):
                raise mismatch(f"holds {k} as {model[k].dtype} {tuple(model[k].shape)}, this model has "
                               f"{t.dtype} {tuple(t.shape)} (a run of another preset?)")
        model = {k: model[k] for k in self.state}
        version = state_digest(unique_tensors(model))
        if meta.get("version") and meta["version"] != version:
            raise CheckpointError(f"checkpoint round {rnd}: its model has digest {version[:19]}..., the "
                                  f"checkpoint says {meta['version'][:19]}...; the file is damaged")
        return _Resumed(model, version,
                        {k[len(OPT_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPT_PREFIX)},
                        {k[len(EF_PREFIX):]: v for k, v in tensors.items() if k.startswith(EF_PREFIX)},
                        _meta_json(meta, "versions", str, rnd), _meta_json(meta, "round_records", dict, rnd),
                        _meta_json(meta, "round_summary", None, rnd))

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
        end = time.monotonic() + timeout
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
                left = end - time.monotonic()
                if left <= 0:
                    return pb.Task(kind=pb.Task.WAIT, retry_after_ms=0)
                self.lock.wait(left)

    def _task_for(self, cur: RoundState, a: Assignment) -> pb.Task:
        c = self.cfg
        up = c.upload_spec(a.upload_encoding or None)
        return pb.Task(
            kind=pb.Task.TRAIN, round=cur.number, task_id=a.task_id, model_version=cur.version,
            training=pb.TrainingSettings(
                local_epochs=c.local_epochs, local_steps=a.local_steps, local_samples=a.local_samples,
                batch_size=c.batch_size,
                learning_rate=c.learning_rate, weight_decay=c.weight_decay, max_input_tokens=c.max_input_tokens,
                max_target_tokens=c.max_target_tokens, seed=c.seed * 1000003 + cur.number,
                lora=pb.LoraSettings(rank=self.lora.rank, alpha=self.lora.alpha, target_modules=self.lora.targets,
                                     dropout=self.lora.dropout) if self.lora else None),
            upload=up.settings(error_feedback=c.error_feedback),
            deadline_unix=time.time() + (cur.deadline - time.monotonic()))

    # ------------------------------------------------------------ download
    def encoder_for(self, device_id: str, session_id: str, version: str, encoding: int, codec: int,
                    base_version: str = "") -> StateEncoder | FrozenStream:
        """What a download of `version` streams: the next broadcast delta from base_version, or the full model."""
        with self.lock:
            self._device(device_id, session_id)
            if version and version != self.version:
                raise RoundError("not_found", f"model version {version[:19]}... is not served; "
                                              f"the current version is {self.version[:19]}...")
            spec = self.cfg.download_spec()
            if base_version and self.lora and base_version != self.version and base_version in self.versions:
                return self._adapter_patch(device_id, base_version, spec,
                                           spec.codec if codec == pb.CODEC_UNSPECIFIED else codec_name(codec))
            if base_version and self.cfg.download_payload == "delta" and base_version != self.version:
                step = self._delta_step(device_id, base_version, spec)
                if step is not None:
                    return step
            enc_name = spec.encoding if encoding == pb.ENCODING_UNSPECIFIED else encoding_name(encoding)
            codec_name_ = spec.codec if codec == pb.CODEC_UNSPECIFIED else codec_name(codec)
            spec = TransferSpec(enc_name, codec_name_, spec.zstd_level, 0, spec.block_size, spec.chunk_elems)
            key = (self.version, spec.encoding_id, spec.codec_id)
            enc = self._encoders.get(key)
            if enc is None:
                enc = StateEncoder(self.state, spec, digest=self.version)
                self._encoders[key] = enc
            return enc

    def note_sent(self, device_id: str, version: str, base_version: str, chunk: pb.Chunk) -> None:
        """Count a chunk sent towards `version` (from `base_version` for a broadcast delta, else "");
        one sent before to the same device counts as re-sent."""
        n = len(chunk.payload) + len(chunk.scales)
        with self._sent_lock:
            sent, resent = self._sent.setdefault((device_id, version), (set(), [0]))
            key = (base_version, chunk.tensor, chunk.offset)
            if key in sent:
                resent[0] += n
            sent.add(key)

    def _resent_down(self, device_id: str, version: str) -> int:
        with self._sent_lock:
            entry = self._sent.get((device_id, version))
            return entry[1][0] if entry else 0

    def _adapter_patch(self, device_id: str, base: str, spec: TransferSpec, codec: str) -> StateEncoder:
        """LoRA: only the B matrices of the current version, to be put into the version the device holds."""
        spec = TransferSpec(spec.encoding, codec, spec.zstd_level, 0, spec.block_size, spec.chunk_elems)
        key = (self.version, spec.encoding_id, spec.codec_id, base)
        enc = self._encoders.get(key)
        if enc is None:
            enc = StateEncoder(self._trainable(), spec, digest=self.version, base_version=base)
            self._encoders[key] = enc
            log.info("download for %s: adapters only, %.3f MB of B on top of its %s... (the full model is %.1f MB)",
                     device_id, self._full_bytes(spec, self._trainable()) / 1e6, base[7:19],
                     self._full_bytes(spec) / 1e6)
        return enc

    def _full_bytes(self, spec: TransferSpec, state: Mapping[str, torch.Tensor] | None = None) -> int:
        """Wire bytes of the full model (or of `state`) at spec, before compression."""
        return sum(tensor_wire_bytes(e.tensor.dtype, e.tensor.numel(), spec.encoding_id, spec.block_size,
                                     spec.chunk_elems) for e in unique_tensors(self.state if state is None else state))

    def _delta_step(self, device_id: str, base: str, spec: TransferSpec) -> FrozenStream | None:
        chain = self.history.chain(base, self.version)
        full = self._full_bytes(spec)
        if chain is None:
            log.info("download for %s: full model; its version %s... is not among the last %d", device_id,
                     base[7:19], self.history.keep)
            return None
        cost = sum(s.stream.wire_bytes for s in chain)
        if cost >= full:
            log.info("download for %s: full model; %d delta(s) from %s... take %.1f MB, the model %.1f MB",
                     device_id, len(chain), base[7:19], cost / 1e6, full / 1e6)
            return None
        log.info("download for %s: delta %s... -> %s... (%.1f MB; %d step(s) to the current version, %.1f MB, "
                 "instead of %.1f MB)", device_id, base[7:19], chain[0].target[7:19], chain[0].stream.wire_bytes / 1e6,
                 len(chain), cost / 1e6, full / 1e6)
        return chain[0].stream

    # -------------------------------------------------------------- upload
    def open_upload(self, h: pb.UploadHeader) -> UploadSession:
        """Start or resume the upload `h` describes; checks it belongs to the open round."""
        with self.lock:
            self._device(h.device_id, h.session_id)
            self._check_serving()
            cur = self.current
            if cur is None or cur.closed or cur.number != h.round:
                raise RoundError("precondition", f"round {h.round} is not open for uploads "
                                                 f"(current round {cur.number if cur else self.round_no}, "
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
            sess = self._uploads.get(h.task_id)
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
            if len(self._uploads) >= self.cfg.max_concurrent_uploads and h.task_id not in self._uploads:
                raise RoundError("exhausted", f"{len(self._uploads)} uploads already staged; retry later")
            if h.manifest.chunk_elems > self.cfg.max_chunk_elems:
                raise RoundError("exhausted", f"upload chunks of {h.manifest.chunk_elems} elements exceed this "
                                              f"server's max_chunk_elems {self.cfg.max_chunk_elems}")
            if h.manifest.payload not in (pb.WEIGHTS, pb.DELTA):
                raise RoundError("invalid", "upload manifest must say WEIGHTS or DELTA")
            weight, cut = self._bounded_weight(cur, a, h.num_samples)
            try:
                layouts = check_manifest(h.manifest, expect=self.upload_layout)
                # Staged in a mapped file, not RAM: concurrent uploads cost disk, and a partial one
                # waits there for its device until the round ends.
                path = self.staging / f"round-{cur.number:06d}" / f"{h.device_id}-{h.task_id}.bin"
                # A new file, not the old one truncated: a replaced stream still writing writes elsewhere.
                path.unlink(missing_ok=True)
                dest = map_tensors(path, [(lay.name, lay.dtype, lay.shape) for lay in layouts], create=True)
                receiver = StateReceiver(h.manifest, dest=dest, expect=self.upload_layout)
            except WireError as exc:
                hint = " (LoRA: an update carries only the B matrices, <module>.lora_B.weight)" if self.lora else ""
                raise RoundError("invalid", f"upload manifest rejected: {exc}{hint}") from None
            except DiskFullError as exc:
                raise self._staging_full(cur, a, exc) from None
            a.staged, a.manifest = path, h.manifest
            a.status = "uploading"
            a.claimed_samples, a.num_samples, a.weight_cut = h.num_samples, weight, cut
            chunks = sum(len(f) for f in receiver.received)
            sess = UploadSession(a, h, receiver, self.max_update_bytes, self.cfg.max_update_chunks or 2 * chunks + 16)
            self._uploads[h.task_id] = sess
            return sess

    def _bounded_weight(self, cur: RoundState, a: Assignment, claim: int) -> tuple[int, str]:
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
            self._uploads.pop(a.task_id, None)
            self.lock.notify_all()
            log.warning("round %d: update from %s refused: %s", cur.number, a.device_id, a.reason)
            raise UpdateRefused("invalid", f"update refused: {a.reason}")
        if claim <= bound:
            return claim, ""
        return bound, f"claimed {claim} samples; its task was {how}: at most {bound}"

    def _staging_full(self, cur: RoundState, a: Assignment, exc: DiskFullError) -> RoundError:
        """A full staging disk refuses this upload only: the device keeps its update and retries."""
        # A fresh start had already replaced the staged file: whatever was staged for the task is gone.
        self._uploads.pop(a.task_id, None)
        if a.status == "uploading":
            a.status = "sampled"
        log.error("round %d: upload from %s not taken: server staging dir %s is full (%s); free space there "
                  "or move --out to a larger disk", cur.number, a.device_id, self.staging, exc)
        return RoundError("exhausted", f"server staging dir {self.staging} is full: {exc}; keep the update "
                                       f"and retry later")

    def upload_status(self, device_id: str, session_id: str, task_id: str) -> tuple[bool, pb.Position | None, bool]:
        with self.lock:
            self._device(device_id, session_id)
            self._check_serving()
            sess = self._uploads.get(task_id)
            if sess is None or sess.assignment.device_id != device_id:
                cur = self.current
                done = (cur is not None and device_id in cur.assignments
                        and cur.assignments[device_id].task_id == task_id
                        and cur.assignments[device_id].status == "aggregated")
                return False, None, done
            return True, sess.receiver.next_position(), False

    @property
    def max_update_bytes(self) -> int:
        if self.cfg.max_update_bytes > 0:
            return self.cfg.max_update_bytes
        fp32 = sum(t.numel() * 4 for t in self._trainable().values())
        return 2 * fp32 + (1 << 20)

    def finish_upload(self, sess: UploadSession) -> str:
        """Verify the staged update, validate it against the model, and fold it into the round's aggregate."""
        update = sess.receiver.finish(verify_digest=True)
        canonical = {e.name: e.tensor for e in unique_tensors(update)}
        is_delta = sess.header.manifest.payload == pb.DELTA
        # The round's base model does not change until the round closes, so this needs no lock.
        glob = self._trainable()
        clip_scale = self.validated_delta(sess, canonical, glob, is_delta)
        del canonical
        digest_value = sess.header.manifest.digest
        with self.lock:
            cur = self.current
            a = sess.assignment
            mine = self._uploads.get(sess.header.task_id) is sess
            if mine:
                del self._uploads[sess.header.task_id]
            if cur is None or cur.closed or cur.assignments.get(a.device_id) is not a:
                if not a.settled:  # a replaced stream ending late must not undo the update that counted
                    a.status = "late"
                raise RoundError("precondition", f"round {sess.header.round} closed before the update arrived")
            if not mine:  # the device started this task's upload again; the newer stream is the one that counts
                raise RoundError("aborted", f"task {sess.header.task_id}: this upload was replaced by a newer one "
                                            f"from the device")
            a.status = "aggregated"
            a.clip_scale = clip_scale
            a.done_at = time.monotonic()
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
        if set(update) != set(glob):
            self.refuse_upload(sess, f"tensors {sorted(set(update) ^ set(glob))[:3]} differ from the model's")
        for name, t in update.items():
            g = glob[name]
            if t.dtype != g.dtype or t.shape != g.shape:
                self.refuse_upload(sess, f"{name}: {t.dtype} {tuple(t.shape)} does not match the model's "
                                         f"{g.dtype} {tuple(g.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                self.refuse_upload(sess, f"tensor {name} holds NaN or Inf")
        delta = {k: (v.float() if is_delta else v.float() - glob[k].float())
                 for k, v in update.items() if v.is_floating_point()}
        norm = float(torch.sqrt(sum((d.double().pow(2).sum() for d in delta.values()),
                                    torch.zeros((), dtype=torch.float64))))
        bound, clip = self.cfg.max_update_norm, self.cfg.clip_update_norm
        if not math.isfinite(norm) or (bound > 0 and norm > bound):
            self.refuse_upload(sess, f"update norm {norm:.4g} exceeds max_update_norm {bound:g}")
        if clip > 0 and norm > clip:
            log.info("round %d: update from %s clipped from norm %.4g to %.4g", sess.header.round,
                     sess.assignment.device_id, norm, clip)
            return clip / norm
        return 1.0

    def refuse_upload(self, sess: UploadSession, reason: str, code: str = "invalid") -> None:
        """Refuse the task's update for good: logged with the reason, the round goes on without it."""
        a = sess.assignment
        with self.lock:
            if self._uploads.get(sess.header.task_id) is sess:
                del self._uploads[sess.header.task_id]
            if not a.settled:
                a.status, a.reason = "refused", reason[:500]
            self.lock.notify_all()
        log.warning("round %d: update from %s refused: %s", sess.header.round, a.device_id, reason)
        raise UpdateRefused(code, f"update refused: {reason}")

    def _fold(self, cur: RoundState) -> None:
        """Fold the round's updates in device-id order, one mapped file at a time.

        Floating-point sums depend on their order; folding at the round's end
        in a fixed order makes the new model independent of when each upload
        arrived (a disturbed run equals an undisturbed one bit for bit), while
        memory stays at one accumulator plus the pages of one update.
        """
        glob = self._trainable()
        for a in sorted(cur.aggregated, key=lambda a: a.device_id):
            assert a.staged is not None and a.manifest is not None
            layouts = check_manifest(a.manifest)
            update = map_tensors(a.staged, [(lay.name, lay.dtype, lay.shape) for lay in layouts])
            is_delta = a.manifest.payload == pb.DELTA
            delta = {k: (v.float() if is_delta else v.float() - glob[k].float()) * a.clip_scale
                     for k, v in update.items() if v.is_floating_point()}
            cur.mean.add(delta, float(a.num_samples))
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

    def abandon_upload(self, sess: UploadSession) -> None:
        """Drop a staged upload that failed a check; the device may start again."""
        with self.lock:
            if self._uploads.get(sess.header.task_id) is sess:
                del self._uploads[sess.header.task_id]
                if sess.assignment.status == "uploading":
                    sess.assignment.status = "sampled"

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
            base = self.trained_on.get(a.device_id, "")
            chain = self.history.chain(base, self.version) if base and c.download_payload == "delta" else None
            full = self._full_bytes(c.download_spec())
            down = sum(s.stream.wire_bytes for s in chain) if chain is not None else full
            if self.lora and base in self.versions:
                down = self._full_bytes(c.download_spec(), self._trainable())
            choice = choose_upload_encoding(c.link_encoding_list, c.upload_encoding,
                                            lambda enc: self._full_bytes(c.upload_spec(enc), self._trainable()),
                                            min(down, full),
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
                "deadline_unix": time.time() + (cur.deadline - time.monotonic()) if open_round else 0.0,
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
                if time.monotonic() - last_note > 10:
                    log.info("waiting for devices: %d of %d connected", len(alive), need)
                    last_note = time.monotonic()
                self.lock.wait(1.0)
        return []

    def _run_round(self, number: int, attempt: int) -> bool:
        alive = self._wait_for_devices()
        if not alive:
            return False
        rng = random.Random(f"{self.cfg.seed}:{number}:{attempt}")
        sampled = sorted(rng.sample(sorted(alive), min(self.cfg.devices_per_round, len(alive))))
        now = time.monotonic()
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
                deadline=now + deadline_s, assignments=assignments, mean=RunningMean(self._trainable()))
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
                left = cur.deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(min(left, 1.0))
            cur.closed = True
            cur.collected_at = time.monotonic()
            for tid in [t for t, s in self._uploads.items() if s.assignment in cur.assignments.values()]:
                del self._uploads[tid]
            got = cur.aggregated
            # Metrics follow the upload reply by a moment; give them a short grace.
            grace_end = time.monotonic() + 5.0
            while any(a.metrics is None for a in got) and time.monotonic() < grace_end:
                self._beat()
                self.lock.wait(0.2)
        if self._stop.is_set():
            return False
        if len(got) < self.cfg.min_updates:
            log.warning("round %d attempt %d: %d of %d updates before the deadline, need %d; retrying",
                        number, attempt, len(got), len(cur.assignments), self.cfg.min_updates)
            self._log_devices(cur)
            shutil.rmtree(self.staging / f"round-{number:06d}", ignore_errors=True)
            return False
        self._aggregate(cur)
        return True

    def _aggregate(self, cur: RoundState) -> None:
        self.phase = "aggregating"
        self._beat()
        t0 = time.monotonic()
        self._fold(cur)
        aliases = self._aliases()
        mean_delta = cur.mean.mean()
        old = self._canonical()
        new = {**old, **self.strategy.apply(self._trainable(), mean_delta)}
        step = self._broadcast_delta(old, new, aliases) if self.cfg.download_payload == "delta" else None
        with self.lock:
            self._set_global(step[0] if step else new, aliases)
            self.versions.append(self.version)
            if step:
                self.history.add(DeltaStep(cur.version, self.version, FrozenStream(StateEncoder(
                    step[1], self.cfg.download_delta_spec(), digest=self.version, base_version=cur.version))))
            self.round_no = cur.number
        t_agg = time.monotonic() - t0
        self.phase = "evaluating"
        self._beat()
        ev = self.evaluator(self.export_state()) if self.evaluator else None
        self.phase = "checkpointing"
        self._beat()
        tensors = self._checkpoint_tensors()
        records = self._device_records(cur)
        summary = self._summary(cur, records, ev, t_agg)
        # The checkpoint is the round's commit point and carries its log records, so a crash
        # between the two writes neither loses the round's records nor repeats them.
        meta = {"round": str(cur.number), "version": self.version, "strategy": self.strategy.name,
                "round_records": json.dumps(records), "round_summary": json.dumps(summary)}
        if self.lora:
            meta.update(lora=self.lora.describe(), versions=json.dumps(self.versions))
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

    def _broadcast_delta(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor],
                         aliases: Mapping[str, list[str]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(next global, delta to send): the quantized step the devices will receive, applied here too.

        The server moves its own model by exactly the decoded delta, so a
        device that adds the same decoded delta to the same version holds the
        same bits (digest-checked on arrival). What quantization left out is
        kept as a residual and added to the next round's step.
        """
        spec = self.cfg.download_delta_spec()
        send, received, residual = self.broadcast_ef.compensate(subtract(new, old), spec.encoding_id,
                                                                spec.block_size, spec.chunk_elems)
        self.broadcast_ef.commit(residual)
        tied = dict(send)
        for name, names in aliases.items():
            for a in names:
                tied[a] = send[name]
        return apply_delta(old, received), {k: tied[k] for k in self.state}

    def _log_devices(self, cur: RoundState) -> list[dict[str, Any]]:
        records = self._device_records(cur)
        for rec in records:
            self.round_log.append(rec)
        return records

    def _device_records(self, cur: RoundState) -> list[dict[str, Any]]:
        records = []
        end = cur.collected_at or time.monotonic()
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
            rec["bytes_resent_down"] = self._resent_down(a.device_id, cur.version)
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
            "wall_s": (cur.collected_at or time.monotonic()) - cur.started,
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
                      + (" B only" if self.lora else ""),
            **({"lora": self.lora.describe()} if self.lora else {}),
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


def clone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached CPU copy that keeps tied tensors tied (one clone per storage)."""
    out: dict[str, torch.Tensor] = {}
    for e in unique_tensors(state):
        t = e.tensor.detach().to("cpu", copy=True).contiguous()
        out[e.name] = t
        for a in e.aliases:
            out[a] = t
    return {k: out[k] for k in state}


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


@dataclass
class _Resumed:
    """A checkpoint taken apart for a resumed server."""

    model: dict[str, torch.Tensor]
    version: str
    opt: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]
    versions: list[str] | None
    records: list[dict[str, Any]] | None
    summary: dict[str, Any] | None


def _meta_json(meta: Mapping[str, str], key: str, item: type | None, rnd: int) -> Any:
    """A JSON list of `item`s (item None: an object) from a checkpoint's metadata, None if absent."""
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint round {rnd}: metadata {key} is not JSON ({e})") from None
    ok = isinstance(value, dict) if item is None else (
        isinstance(value, list) and all(isinstance(v, item) for v in value))
    if not ok:
        raise CheckpointError(f"checkpoint round {rnd}: metadata {key} is not "
                              f"{'a JSON object' if item is None else 'a list of ' + item.__name__}")
    return value


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

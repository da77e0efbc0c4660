"""The device daemon: dial out, join, take work, download, fine-tune, upload, report, repeat."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psutil
import torch

import fedcore
from fedcore import hardware, power
from fedcore.batching import encode_examples
from fedcore.data import Example, dirichlet_partition, load_corpus
from fedcore.metrics import MetricsServer, serve_metrics
from fedcore.efficiency import NUMERIC_KEYS, figures
from fedcore import methods
from fedcore.methods import Method, Trainee
from fedcore.models import load_pretrained, load_tokenizer, model_from_config_json, pick_device
from fedcore.wire import (CODECS, ENCODINGS, ErrorFeedback, TransferSpec, WireError, codec_name, digest, encoding_name,
                          subtract)
from fedcore.wire.manifest import check_framing
from fedcore.channel import JOIN_TIMEOUT_S, open_channel
from fedcore.sdnotify import Notifier, Watchdog
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from .capping import CLOCK_JOURNAL, PowerCapper, Round
from .clocks import ClockError, recover
from .config import ClientConfig
from .metrics import DeviceStats, client_registry
from .feedback import load_residual, save_residual
from .statedir import LinkRates, PendingUpload, StateDir
from .trainer import TrainResult, TrainSettings, train_local
from .transfer import Limits, TransferStats, fetch, upload, upload_seeds

# The server turned down a task-level request (round closed, task not ours): drop that work, keep serving.
TASK_GONE = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
# An upload answered INVALID_ARGUMENT was refused for good (its manifest or content): sending it again cannot help.
UPDATE_GONE = (*TASK_GONE, grpc.StatusCode.INVALID_ARGUMENT)

log = logging.getLogger("fedclient")


def local_examples(cfg: ClientConfig) -> list[Example]:
    """This device's training data: its file, or its Dirichlet share of the built-in corpus."""
    examples = load_corpus(cfg.data, cfg.data_size, cfg.data_seed)
    if cfg.partitions:
        parts = dirichlet_partition(len(examples), cfg.partitions, cfg.alpha, cfg.data_seed,
                                    labels=[e.topic for e in examples])
        examples = [examples[i] for i in parts[cfg.partition]]
    if not examples:
        raise ValueError(f"device {cfg.device_id} has no training examples")
    return examples


@dataclass
class Daemon:
    cfg: ClientConfig
    examples: list[Example] = field(default_factory=list)
    rounds_done: int = 0

    def __post_init__(self) -> None:
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        if not self.examples:
            self.examples = local_examples(self.cfg)
        self.device = pick_device(self.cfg.device)
        self.tokenizer = load_tokenizer(self.cfg.weights_dir)
        self.model: torch.nn.Module | None = None
        self.trainee: Trainee | None = None  # the model as the last task's method prepared it
        self.model_config = ""
        self.base: dict[str, torch.Tensor] | None = None  # the global model as downloaded
        self.base_version = ""
        self.base_exact = False  # base is bit-exactly base_version, so the server may send deltas from it
        self.feedback = ErrorFeedback(load_residual(self.cfg.state_dir) if self.cfg.state_dir else None)
        self.session_id = ""
        self._stop = False
        self.disk = open_state_dir(self.cfg.state_dir)
        self.rates = LinkRates(self.disk.root / "link.json" if self.disk else None)
        self._last_down_bytes = 0
        # The finished update not yet delivered (also without a state dir, or one too full to hold it): a
        # reconnect delivers it instead of dropping it.
        self._unsent: tuple[PendingUpload, dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None
        self._session_lost_for = ""  # task whose upload met FAILED_PRECONDITION once: rejoin before dropping it
        self._refused_task = ""  # the last task turned down as unusable, not logged again when handed again
        self._failed_downloads = 0  # in a row, models that failed their check: backoff before asking again
        if self.disk is not None:
            cached = self.disk.downloads.cached()  # digest-checked; a damaged one is discarded (logged)
            if cached is not None:
                self.base_version, self.base, self.base_exact = cached
                log.info("model %s kept on disk from before a restart, digest checked%s", self.base_version[7:19],
                         " (bit-exact: a base for broadcast deltas)" if self.base_exact else "")
        self._dir_version = ""  # digest of weights_dir's weights when the device holds them (hold_base)
        if self.base is None and self.cfg.weights_dir is not None and self.cfg.hold_base:
            self._hold_base(self.cfg.weights_dir)
        if self.cfg.compute_slowdown > 1:
            log.info("compute_slowdown %.2f: EMULATING a slower device (sleeping %.2f x each measured step)",
                     self.cfg.compute_slowdown, self.cfg.compute_slowdown - 1)
        self.phase = "starting"
        self.stats = DeviceStats()
        self.notifier = Notifier()
        self.watchdog = Watchdog(self.notifier, status=self._status_line)
        self._ready = False
        self._metrics: MetricsServer | None = None
        log.info("device %s: %d local examples, torch device %s", self.cfg.device_id, len(self.examples), self.device)
        self.hardware, self.power_source = probe_hardware(self.cfg, self.device)
        if self.disk is not None:
            # Whether or not this run caps power: a daemon killed under a cap left clocks locked.
            recover(self.disk.root / CLOCK_JOURNAL)
        self.capper = (PowerCapper(self.cfg, self.disk.root if self.disk else None, self.power_source,
                                   self.hardware.name, len(self.examples)) if self.cfg.power_cap_w else None)

    # ------------------------------------------------------------ helpers
    def _backoff(self, attempt: int) -> None:
        # Exponential with full jitter, so a fleet that lost the server together
        # does not come back in lockstep.
        cap = min(self.cfg.retry_max_s, self.cfg.retry_initial_s * (2 ** min(attempt, 16)))
        self.watchdog.beat()
        time.sleep(random.uniform(self.cfg.retry_initial_s / 2, cap))
        self.watchdog.beat()

    def _status_line(self) -> str:
        s = self.stats
        return (f"{self.phase}; {s.rounds_completed} rounds done, {s.bytes_down / 1e6:.1f} MB down, "
                f"{s.bytes_up / 1e6:.1f} MB up")

    def _beat(self, _done: int = 0) -> None:
        self.watchdog.beat()

    def _limits(self, direction: str, deadline_unix: float = 0.0) -> Limits:
        """Transfer limits; an upload with its task's deadline waits out a busy server until then."""
        c = self.cfg
        until = None
        if direction == "up" and math.isfinite(deadline_unix) and deadline_unix > 0:
            until = time.monotonic() + (deadline_unix - time.time())  # wall clock once, then monotonic
        return Limits(retries=c.transfer_retries, stall_s=c.stall_timeout_s, floor_s=c.transfer_timeout_floor_s,
                      safety=c.transfer_timeout_safety, rate_bps=self.rates.get(direction),
                      pace_bps=c.max_upload_mbit * 1e6 / 8 if direction == "up" else 0.0, until=until)

    def _sleep(self, seconds: float) -> None:
        """Sleep with the systemd watchdog fed."""
        end = time.monotonic() + seconds
        while not self._stop and time.monotonic() < end:
            self.watchdog.beat()
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        self.watchdog.beat()

    def stop(self) -> None:
        self._stop = True

    def _capabilities(self) -> pb.Capabilities:
        accel = f"cuda:{torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else "cpu"
        return pb.Capabilities(accelerator=accel, memory_bytes=psutil.virtual_memory().total,
                               software_version=fedcore.__version__, encodings=list(ENCODINGS.values()),
                               codecs=list(CODECS.values()), cpu_count=os.cpu_count() or 1, budgets=self._budgets())

    def _budgets(self) -> pb.Budgets:
        """What this device may spend on a round: its config, else memory measured now."""
        c = self.cfg
        if c.memory_budget_mb > 0:
            memory, source = int(c.memory_budget_mb * 2**20), "config"
        elif self.device.type == "cuda":
            memory, source = torch.cuda.get_device_properties(self.device).total_memory, "cuda"
        else:
            memory, source = psutil.virtual_memory().available, "ram"
        return pb.Budgets(memory_bytes=memory, compute_flops=c.compute_budget_tflop * 1e12,
                          upload_bytes=int(c.upload_budget_mb * 1e6), memory_source=source,
                          head_fraction=c.head_fraction)

    # --------------------------------------------------------------- loop
    def run(self) -> int:
        """Serve rounds until the server says the run is over; returns an exit code."""
        self._metrics = serve_metrics(client_registry(self.stats, self.cfg.device_id), self.cfg.metrics_listen)
        self.watchdog.beat()
        self.watchdog.start()
        try:
            code = self._loop()
            self.phase = f"exiting ({code})"
            return code
        finally:
            self.stats.connected = False
            if self.capper is not None:
                try:
                    self.capper.close()
                except (ClockError, OSError) as exc:  # the journal keeps the originals for the next start
                    log.error("could not restore the clocks: %s", exc)
            self.notifier.stopping(f"{self.phase}; {self.stats.rounds_completed} rounds done")
            self.watchdog.stop()
            if self._metrics is not None:
                self._metrics.close()
            self.notifier.close()

    def _loop(self) -> int:
        attempt = 0
        while not self._stop:
            try:
                with open_channel(self.cfg.server, self.cfg.security()) as channel:
                    stub = pbg.FederationStub(channel)
                    try:
                        self._join(stub)
                    except grpc.RpcError as exc:
                        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,  # type: ignore[attr-defined]
                                          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                            log.error("server refused this device: %s: %s", exc.code().name,  # type: ignore
                                      exc.details())  # type: ignore[attr-defined]
                            return 2
                        raise
                    attempt = 0
                    self._deliver_pending(stub)
                    if self._serve(stub):
                        if not self.cfg.stay_after_shutdown:
                            return 0
                        # The old run is still answering SHUTDOWN; wait before asking again.
                        time.sleep(self.cfg.retry_max_s)
            except grpc.RpcError as exc:
                self.stats.connected = False
                self.phase = f"reconnecting to {self.cfg.server}"
                code = exc.code()  # type: ignore[attr-defined]
                attempt += 1
                # A refused TLS handshake also looks like UNAVAILABLE from here.
                hint = "" if self.cfg.insecure or attempt < 3 else (
                    " (if the server is up: check tls_ca, tls_cert and tls_key, and that the server certificate "
                    "names the host dialed)")
                log.warning("server %s unreachable or lost (%s: %s); retry %d%s", self.cfg.server, code.name,
                            exc.details(), attempt, hint)  # type: ignore[attr-defined]
                self._backoff(attempt)
        return 0

    def _hold_base(self, weights_dir: Path) -> None:
        """weights_dir's weights as the model this device holds: Join offers their digest, in the form the server
        computes its versions in, so a run starting from them skips its first download."""
        state = load_pretrained(weights_dir).state_dict()
        self.base, self.base_version, self.base_exact = state, digest(state), True
        self._dir_version = self.base_version
        log.info("holding the weights of %s (%s): a run that starts from them needs no first download",
                 weights_dir, self.base_version[:19])

    def _join(self, stub: pbg.FederationStub) -> None:
        self.phase = f"joining {self.cfg.server}"
        reply = stub.Join(pb.JoinRequest(device_id=self.cfg.device_id, capabilities=self._capabilities(),
                                         num_samples=len(self.examples), cached_version=self.base_version),
                          timeout=JOIN_TIMEOUT_S, wait_for_ready=True)
        self.session_id = reply.session_id
        if self.base_version == self._dir_version != "" and reply.base_version not in ("", self._dir_version):
            log.warning("the weights in %s (%s) are not this run's initial model (%s): other weights, another dtype "
                        "or a method that adds tensors (LoRA); downloading the model", self.cfg.weights_dir,
                        self.base_version[:19], reply.base_version[:19])
            self.base, self.base_version, self.base_exact = None, "", False
        if reply.model_config_json != self.model_config:
            if self.model_config:  # the server's model changed; a model kept on disk would not match either
                self.base, self.base_version, self.base_exact = None, "", False
            self.model_config = reply.model_config_json
            self._build_model()
        log.info("joined %s as %s (model %s, server %s)", self.cfg.server, self.cfg.device_id,
                 reply.model_preset, reply.server_version)
        self.stats.connected = True
        self.phase = f"joined {self.cfg.server}, waiting for work"
        self.watchdog.beat()
        if not self._ready:
            # systemd: the unit is up once the daemon is part of the fleet.
            self.notifier.ready(f"joined {self.cfg.server} as {self.cfg.device_id}")
            self._ready = True

    def _build_model(self) -> None:
        """A fresh model of the server's architecture (weights arrive with the download)."""
        # Drop the old model first: on a GPU two models at once may not fit (an Orin shares its memory).
        self.model = self.trainee = None
        self.model = model_from_config_json(self.model_config)
        self.model.to(self.device)
        # A training step of a big model can outlast the watchdog's poll; each forward pass is progress.
        self.model.register_forward_pre_hook(lambda *_: self.watchdog.beat())

    def _load_global(self, method: Method) -> Trainee:
        """The downloaded global model into the model to train, prepared as the task's method asks."""
        assert self.base is not None and self.model is not None
        if self.trainee is None or self.trainee.method != method:
            if self.trainee is not None and self.trainee.alters_model:  # e.g. peft's layers: start from a plain model
                self._build_model()
            self.trainee = method.bind(self.model)
            self.model.to(self.device)  # layers a method adds are created on the CPU
            log.info("%s", self.trainee.describe())
        self.trainee.load(self.base)
        return self.trainee

    def _train(self, work: Work) -> tuple[TrainResult, power.PowerReading | None, int, Trainee, Round | None]:
        """The round's local training (under the power cap when one is set), metered."""
        settings, capped, capper = work.settings, None, self.capper
        capping = capper is not None and work.method.backpropagates
        if capping:
            # Profiling trains the model on synthetic items: before the round's weights are loaded.
            model_name = "t5-" + hashlib.sha256(self.model_config.encode()).hexdigest()[:12]
            capper.ensure_profile(self.model, model_name, settings, self.device)
        trainee = self._load_global(work.method)
        if capping:
            items = lambda: encode_examples(self.tokenizer, self.examples, settings.max_input_tokens,  # noqa: E731
                                            settings.max_target_tokens)
            eff = capper.ensure_noise(work.method.describe(), self.model, items, settings.seed)
            settings, capped = capper.choose(settings, eff)
        elif capper is not None:
            log.warning("power cap: %s trains by forward passes only; not capped", work.method.describe())
        # A method whose update is (seed, scalar) pairs trains by its own forward-only steps.
        estimator = trainee.start(settings.seed) if trainee.update_form == "seeds" else None
        with capper.training(capped, self.power_source) if capped else nullcontext(self.power_source) as source:
            meter = power.PowerMeter(source, hz=self.cfg.power_hz).start()
            try:
                result = train_local(self.model, self.tokenizer, self.examples, settings, self.device,
                                     weight_grads=trainee.weight_grads, zero_order=estimator)
            finally:
                reading = meter.stop()
        if capped is not None and capped.emulated is not None:
            e = capped.emulated
            log.info("power cap, EMULATED %s: %d steps in %.1f s at %.1f W, %.0f J; %d watchdog step(s) down",
                     self.cfg.emulate, e.steps, e.seconds, e.mean_w or 0.0, e.energy_j or 0.0, len(e.steps_down))
        return result, reading, settings.batch_size, trainee, capped

    def _serve(self, stub: pbg.FederationStub) -> bool:
        """Poll for work; True when the server ends the run."""
        while not self._stop:
            self.watchdog.beat()
            task = stub.GetTask(pb.TaskRequest(device_id=self.cfg.device_id, session_id=self.session_id),
                                timeout=120)
            self.watchdog.beat()
            if task.kind == pb.Task.SHUTDOWN:
                log.info("server ended the run after round %d", task.round)
                self.phase = f"server ended the run after round {task.round}"
                return True
            if task.kind == pb.Task.TRAIN:
                work = self._accept(task)
                if work is not None:
                    self._round(stub, task, work)
            elif task.retry_after_ms:
                time.sleep(task.retry_after_ms / 1000)
        return False

    def _accept(self, task: pb.Task) -> Work | None:
        """The task's work, or None (one log line) for a task no training could run: the daemon goes on polling."""
        try:
            return plan_work(task, self.cfg)
        except ValueError as exc:
            if task.task_id != self._refused_task:
                log.error("round %d: refusing task %s: %s; not training it, waiting for other work", task.round,
                          task.task_id[:8], exc)
                self._refused_task = task.task_id
            # The server hands a sampled device its task again at once: ask again later, not in a loop.
            self._sleep(self.cfg.retry_max_s)
            return None

    def _round(self, stub: pbg.FederationStub, task: pb.Task, work: Work) -> None:
        assert self.model is not None
        log.info("round %d: task %s, model %s", task.round, task.task_id[:8], task.model_version[7:19])
        self.stats.round = task.round
        self.phase = f"round {task.round}: downloading"
        cached = self.base is not None and self.base_version == task.model_version
        t_down, bytes_down, link_down_bps, deltas, replayed, replay_s = 0.0, 0, 0.0, 0, 0, 0.0
        if not cached:
            if not self.base_exact:
                self.base, self.base_version = None, ""  # nothing a delta could start from: free it first
            try:
                state, dstats = fetch(stub, self.cfg.device_id, self.session_id, task.model_version,
                                      self.base, self.base_version, self._limits("down"), self._backoff,
                                      store=self.disk.downloads if self.disk else None,
                                      expect_bytes=self._last_down_bytes, on_progress=self._beat)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    raise
                log.warning("round %d: %s; dropping the task", task.round, exc.details())  # type: ignore
                return
            except WireError as exc:
                # A model that fails its check from a fresh download (a partial kept on disk was already
                # retried from scratch): the server's or the link's fault, not a reason to exit and restart-loop.
                # What is held is no longer trusted as a base either.
                self.base, self.base_version, self.base_exact = None, "", False
                self._failed_downloads += 1
                log.error("round %d: the model %s... from the server failed its check (%s); dropping the task",
                          task.round, task.model_version[:19], exc)
                self._backoff(self._failed_downloads)
                return
            self._failed_downloads = 0
            self.base, self.base_version, self.base_exact = state, task.model_version, dstats.exact
            t_down, bytes_down, link_down_bps, deltas = dstats.seconds, dstats.bytes, dstats.bytes_per_s, dstats.deltas
            self.rates.update("down", bytes_down, t_down)
            # The largest download seen sizes the next first attempt's deadline (a delta is smaller than the
            # full model that may come next; too long a deadline is harmless, the stall watchdog still acts).
            self._last_down_bytes = max(self._last_down_bytes, bytes_down)
            replayed, replay_s = dstats.replayed, dstats.replay_s
            how = f" as {deltas} broadcast delta(s), digest checked" if deltas else (
                " as the tensors changed since the version it held, digest checked" if dstats.patched else (
                    f" as {replayed} round(s) of seeds, replayed in {replay_s:.2f} s, digest checked" if replayed
                    else ""))
            log.info("round %d: downloaded %.2f MB in %.2f s (%d attempts)%s", task.round, bytes_down / 1e6, t_down,
                     dstats.attempts, how)
        self.phase = f"round {task.round}: training"
        result, reading, batch, trainee, capped = self._train(work)
        hw = figures(result.tokens, result.t_comp_s, result.model_flops, self.hardware.peak_flops, reading)
        log.info("round %d: %d steps x batch %d, %d tokens in %.2f s (%.0f tokens/s%s), loss %.4f; %s", task.round,
                 result.steps, batch, result.tokens, result.t_comp_s, result.tokens_per_s,
                 f", {result.emulated_sleep_s:.2f} s EMULATED slowdown" if result.emulated_sleep_s else "",
                 result.mean_loss, describe(hw))

        up, spec = task.upload, work.spec
        state, aliases = trainee.update_state()
        residual = None
        if spec.payload == "delta" and trainee.update_form == "tensors":
            state = subtract(state, trainee.update_base(self.base))
            if up.error_feedback:
                # Residuals are keyed by what of a tensor they belong to: another head set starts from zero.
                keys = {trainee.residual_key(k): k for k in state}
                sent, _, residual = self.feedback.compensate({key: state[k] for key, k in keys.items()},
                                                             spec.encoding_id, spec.block_size, spec.chunk_elems)
                state = {k: sent[key] for key, k in keys.items()}
        st = result.step_times
        extra = {"tokens_per_s": result.tokens_per_s, "steps": float(result.steps), "batch_size": float(batch),
                 "compute_slowdown": self.cfg.compute_slowdown, "emulated_sleep_s": result.emulated_sleep_s,
                 "download_deltas": float(deltas)}
        if replayed:
            extra.update(download_replayed_rounds=float(replayed), replay_s=replay_s)
        if capped is not None:
            extra.update(capped.record())
        if link_down_bps > 0:
            # Link rates as this device measured them, for the server's link-aware encoding choice.
            extra["link_down_bps"] = link_down_bps
        extra.update({k: hw[k] for k in NUMERIC_KEYS if hw[k] is not None})
        metrics = {"t_down_s": t_down, "t_comp_s": result.t_comp_s, "bytes_down": bytes_down,
                   "tokens": result.tokens, "train_loss": result.mean_loss, "download_cached": cached,
                   "step_times": {"batch_loading_s": st.batch_loading_s, "forward_s": st.forward_s,
                                  "loss_s": st.loss_s, "backward_s": st.backward_s,
                                  "optimizer_step_s": st.optimizer_step_s, "steps": st.steps},
                   "extra": extra, "power_source": hw["power_source"] or "", "hardware": self.hardware.name}
        pending = PendingUpload(task_id=task.task_id, round=task.round, base_version=task.model_version,
                                num_samples=result.samples, spec=asdict(spec), metrics=metrics,
                                deadline_unix=task.deadline_unix if math.isfinite(task.deadline_unix) else 0.0,
                                form=trainee.update_form)
        if self.disk is not None:
            # On disk before the first byte leaves: a restart delivers this update instead of training again,
            # and commits the error-feedback residual that goes with it once the server holds it. A state dir
            # that cannot hold it (logged) leaves the update in memory only.
            self.disk.uploads.save(pending, [(k, state[k], aliases[k]) for k in aliases], residual)
        tied = {a: state[k] for k in aliases for a in (k, *aliases[k])}
        self._unsent = (pending, tied, residual)
        self._send(stub, pending, tied, residual, resume=False)

    def _deliver_pending(self, stub: pbg.FederationStub) -> None:
        """After a (re)join: send the update not yet delivered, kept in memory or left on disk by a previous
        process (digest-checked; a damaged one is dropped and the device asks for work again)."""
        if self._unsent is not None:
            pending, state, residual = self._unsent
            log.info("round %d: delivering the update of task %s again after a reconnect", pending.round,
                     pending.task_id[:8])
            self._send(stub, pending, state, residual, resume=True)
            return
        if self.disk is None:
            return
        found = self.disk.uploads.load()
        if found is None:
            return
        pending, state = found
        residual = self.disk.uploads.residual()
        self._unsent = (pending, state, residual)
        log.info("round %d: resuming the upload of task %s left by a previous process", pending.round,
                 pending.task_id[:8])
        self._send(stub, pending, state, residual, resume=True)

    def _drop_unsent(self) -> None:
        self._unsent = None
        self._session_lost_for = ""
        if self.disk is not None:
            self.disk.uploads.clear()

    def _send(self, stub: pbg.FederationStub, pending: PendingUpload, state: dict[str, torch.Tensor],
              residual: dict[str, torch.Tensor] | None, resume: bool) -> None:
        """Deliver the update (unless the server already acknowledged it), then report the round's metrics."""
        if pending.sent is None:
            ustats = self._upload(stub, pending, state, resume)
            if ustats is None:
                return
            pending.sent = upload_figures(ustats, resume)
            if self.disk is not None:
                self.disk.uploads.mark_sent(pending)  # a restart before the report reports these, not zeros
            if ustats.attempts:
                self.rates.update("up", ustats.bytes, ustats.seconds)
        self._report(stub, pending, residual, resume)

    def _upload(self, stub: pbg.FederationStub, pending: PendingUpload, state: dict[str, torch.Tensor],
                resume: bool) -> TransferStats | None:
        """Upload until the server acknowledges it; None: the server no longer takes it (dropped, logged)."""
        spec = TransferSpec(**pending.spec)
        header = pb.UploadHeader(device_id=self.cfg.device_id, session_id=self.session_id, task_id=pending.task_id,
                                 round=pending.round, base_version=pending.base_version,
                                 num_samples=pending.num_samples)
        self.phase = f"round {pending.round}: uploading"
        try:
            limits = self._limits("up", pending.deadline_unix)
            if pending.form == "seeds":
                reply, ustats = upload_seeds(stub, header, state, limits, self._backoff, resume=resume)
            else:
                reply, ustats = upload(stub, header, state, spec, limits, self._backoff, resume=resume,
                                       on_progress=self._beat)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code not in UPDATE_GONE:
                raise  # link or server trouble: the update is kept (memory, disk) for the next attempt
            if code == grpc.StatusCode.FAILED_PRECONDITION and self._session_lost_for != pending.task_id:
                # Maybe only our session is gone (server restarted, liveness expired): join again and ask
                # once more; the round itself may still want this update.
                self._session_lost_for = pending.task_id
                raise
            log.warning("round %d: server no longer takes task %s (%s: %s); dropping the update", pending.round,
                        pending.task_id[:8], code.name, exc.details())  # type: ignore[attr-defined]
            self._drop_unsent()
            return None
        if ustats.attempts:
            # A seed update is a few hundred bytes: in MB it would read 0.00.
            size, what = ((f"{ustats.bytes} bytes", "(seed, value) pairs") if pending.form == "seeds"
                          else (f"{ustats.bytes / 1e6:.2f} MB", f"{spec.payload} {spec.encoding}/{spec.codec}"))
            log.info("round %d: uploaded %s (%s) in %.2f s (+%.3f s server ack), %d attempts, %d bytes re-sent",
                     pending.round, size, what, ustats.seconds, ustats.wait_s, ustats.attempts, ustats.bytes_resent)
        else:
            log.info("round %d: the server already held the whole update of task %s", pending.round,
                     pending.task_id[:8])
        return ustats

    def _report(self, stub: pbg.FederationStub, pending: PendingUpload, residual: dict[str, torch.Tensor] | None,
                resume: bool) -> None:
        """After the server acknowledged the update: commit its residual, report the round, forget the update."""
        m, sent = pending.metrics, pending.sent or {}
        extra = dict(m["extra"], resumed_after_restart=float(resume))
        lost = not sent.get("measured")
        if lost:
            # The process that sent the last bytes died before it wrote what it measured: unknown, not zero.
            extra["upload_figures_lost"] = 1.0
        else:
            extra.update(bytes_resent_up=sent["bytes_resent"], upload_attempts=sent["attempts"])
            if sent["bytes"] and sent["seconds"] + sent["wait_s"] > 0:
                extra["link_up_bps"] = sent["bytes"] / (sent["seconds"] + sent["wait_s"])
        if residual is not None:
            # Only a residual whose delta the server acknowledged is carried on.
            self.feedback.commit(residual)
            where = "kept in memory"
            if self.cfg.state_dir:
                try:
                    where = save_residual(self.cfg.state_dir, residual)
                except OSError as exc:
                    where = f"kept in memory: cannot save it in {self.cfg.state_dir} ({exc})"
            extra["ef_residual_norm"] = self.feedback.norm()
            log.info("round %d: error-feedback residual norm %.4g (%s)", pending.round, extra["ef_residual_norm"],
                     where)
        t_up, t_wait, bytes_up = (0.0, 0.0, 0) if lost else (sent["seconds"], sent["wait_s"], int(sent["bytes"]))
        try:
            stub.ReportMetrics(pb.RoundMetrics(
                device_id=self.cfg.device_id, session_id=self.session_id, task_id=pending.task_id,
                round=pending.round, t_down_s=m["t_down_s"], t_up_s=t_up, t_wait_s=t_wait,
                t_comp_s=m["t_comp_s"], bytes_down=m["bytes_down"], bytes_up=bytes_up, tokens=m["tokens"],
                train_loss=m["train_loss"], num_samples=pending.num_samples, download_cached=m["download_cached"],
                step_times=pb.StepTimes(**m["step_times"]), extra=extra,
                power_source=m.get("power_source", ""), hardware=m.get("hardware", "")), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() not in TASK_GONE:  # type: ignore[attr-defined]
                raise  # the acknowledged update and its figures stay for the report after a reconnect
            log.warning("round %d: metrics not taken (%s)", pending.round, exc.details())  # type: ignore
        self._drop_unsent()
        self.rounds_done += 1
        self.stats.finish_round({"round": pending.round, "t_down_s": m["t_down_s"], "t_up_s": t_up,
                                 "t_wait_s": t_wait, "t_comp_s": m["t_comp_s"], "bytes_down": m["bytes_down"],
                                 "bytes_up": bytes_up, "extra": dict(extra)})
        self.phase = f"round {pending.round} done, waiting for work"


@dataclass
class Work:
    """What a task asks of this device, checked: local training, the update's encoding, the method."""
    settings: TrainSettings
    spec: TransferSpec
    method: Method


def plan_work(task: pb.Task, cfg: ClientConfig) -> Work:
    """The task's work on this device; ValueError, naming the setting, for one no training could run."""
    if not task.task_id or not task.model_version:
        raise ValueError("the task names no task id or model version")
    tr = task.training
    batch = min(tr.batch_size, cfg.max_batch_size) if cfg.max_batch_size and tr.batch_size > 0 else tr.batch_size
    if tr.local_samples < 0:
        raise ValueError(f"local_samples {tr.local_samples} is negative")
    steps = -(-tr.local_samples // batch) if tr.local_samples > 0 and batch > 0 else tr.local_steps
    # Seeded per (run seed, round, device): a retrained round yields the same update bit for bit.
    settings = TrainSettings(local_epochs=tr.local_epochs, local_steps=steps, batch_size=batch,
                             learning_rate=tr.learning_rate, weight_decay=tr.weight_decay,
                             max_input_tokens=tr.max_input_tokens, max_target_tokens=tr.max_target_tokens,
                             seed=(tr.seed + _stable_hash(cfg.device_id)) % (1 << 64),  # torch's seed range
                             compute_slowdown=cfg.compute_slowdown)
    settings.validate()
    return Work(settings, upload_spec(task.upload), methods.from_task(tr))


def upload_spec(up: pb.TransferSettings) -> TransferSpec:
    """How the task wants the update sent; ValueError for an encoding, codec or framing this device lacks."""
    if up.payload not in (pb.PAYLOAD_UNSPECIFIED, pb.WEIGHTS, pb.DELTA):
        raise ValueError(f"upload payload {up.payload} is unknown")
    if not -(1 << 17) <= up.zstd_level <= 22:
        raise ValueError(f"zstd_level {up.zstd_level} is outside zstd's levels")
    try:
        check_framing(up.encoding, up.codec, up.block_size, up.chunk_elems)
        spec = TransferSpec(encoding=encoding_name(up.encoding), codec=codec_name(up.codec),
                            zstd_level=up.zstd_level or 3, block_size=up.block_size, chunk_elems=up.chunk_elems,
                            payload="delta" if up.payload == pb.DELTA else "weights")
    except (WireError, KeyError) as exc:
        raise ValueError(f"upload settings unusable: {exc}") from None
    return spec


def upload_figures(ustats: TransferStats, resume: bool) -> dict[str, float]:
    """What an acknowledged upload measured, as kept with the pending update; `measured` 0: not known (the
    previous process sent the last bytes and died before it wrote its figures)."""
    measured = ustats.attempts > 0 or not resume
    return {"measured": float(measured), "bytes": float(ustats.bytes), "seconds": ustats.seconds,
            "wait_s": ustats.wait_s, "attempts": float(ustats.attempts), "bytes_resent": float(ustats.bytes_resent)}


def open_state_dir(path: Path | None) -> StateDir | None:
    """The state dir, or None (one warning line) when it cannot be created: the daemon then keeps its
    transfers in memory, as without one."""
    if path is None:
        return None
    try:
        return StateDir(path)
    except OSError as exc:
        log.warning("state dir %s unusable (%s); transfers are kept in memory only, a restart starts them again",
                    path, exc)
        return None


def probe_hardware(cfg: ClientConfig, device: torch.device) -> tuple[hardware.Hardware, power.PowerSource | None]:
    """This device's peak FLOP/s (config, else detected) and its power source (None: unknown); logged."""
    cuda_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    threads = cfg.threads or torch.get_num_threads()
    hw = hardware.resolve(cfg.hardware, cfg.peak_tflops,
                          detected=hardware.detect(device.type, cuda_name, cpu_threads=threads))
    source = power.find_source(cfg.power_source, gpu_index=device.index or 0)
    peak = f"{hw.peak_flops / 1e12:.3g} TFLOP/s" if hw.peak_flops else "unknown"
    where = f"{source.name} ({source.detail})" if source else "unknown (no INA3221, NVML or RAPL readable)"
    log.info("hardware %s: peak %s [%s]; power source %s", hw.name, peak, hw.source, where)
    return hw, source


def describe(hw: dict) -> str:
    """One log-line summary of :func:`fedcore.efficiency.figures`."""
    def pct(v: float | None) -> str:
        return "unknown" if v is None else f"{100 * v:.2f}%"
    power_txt = "power unknown" if hw["power_w"] is None else (
        f"{hw['power_w']:.1f} W ({hw['power_source']}), {hw['energy_j']:.0f} J, eta_e {hw['eta_e']:.1f} tokens/s/W")
    return f"MFU {pct(hw['mfu'])}, {power_txt}"



def _stable_hash(text: str) -> int:
    h = 0
    for ch in text.encode():
        h = (h * 131 + ch) % 1_000_003
    return h

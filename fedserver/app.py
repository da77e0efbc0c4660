"""Assembles a server from its config: model, held-out data, strategy, coordinator, gRPC."""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedcore.clock import SYSTEM, Clock
from fedcore.data import load_corpus, train_eval_split
from fedcore.metrics import serve_metrics
from fedcore.models import build_model, config_json, count_parameters, get_preset, load_tokenizer, pick_device
from fedcore.records import RoundSummary, known
from fedcore.sdnotify import Notifier, Watchdog

from .config import ServerConfig
from .errors import StateMismatch
from .evaluate import evaluate
from .metrics import server_registry
from .roundlog import EvalRecord
from .rounds import Coordinator
from .service import make_server
from .storage import CheckpointError
from .strategy import make_strategy

log = logging.getLogger("fedserver")

# The built-in corpus is generated, so the server draws its held-out set from
# a seed no device uses for training data.
EVAL_CORPUS_SEED = 7919


def strategy_from(cfg: ServerConfig):
    params: dict[str, float] = {}
    name = cfg.strategy.lower()
    if cfg.server_lr is not None:
        params["server_lr"] = cfg.server_lr
    if name != "fedavg":
        params.update(beta1=cfg.beta1, beta2=cfg.beta2, tau=cfg.tau)
    if name == "fedadamw":
        params["weight_decay"] = cfg.server_weight_decay
    return make_strategy(name, **params)


def make_evaluator(cfg: ServerConfig, model: torch.nn.Module) -> Callable[[Mapping[str, torch.Tensor]], EvalRecord]:
    tokenizer = load_tokenizer(cfg.weights_dir)
    if cfg.eval_data == "builtin":
        examples = load_corpus("builtin", cfg.eval_size, EVAL_CORPUS_SEED)
    else:
        _, examples = train_eval_split(load_corpus(cfg.eval_data, 0, cfg.seed), cfg.eval_size, cfg.seed)
    device = pick_device()
    lock = threading.Lock()

    def run(state: Mapping[str, torch.Tensor]) -> EvalRecord:
        with lock:
            model.load_state_dict(dict(state), strict=True)
            t0 = time.monotonic()
            r = evaluate(model, tokenizer, examples, device, batch_size=cfg.eval_batch_size,
                         max_input_tokens=cfg.max_input_tokens, max_target_tokens=cfg.max_target_tokens)
            log.info("evaluated %d held-out examples in %.1f s: loss %.4f, ROUGE-L %.2f", r.n,
                     time.monotonic() - t0, r.loss, r.rougeL)
            return EvalRecord(r.loss, r.rouge1, r.rouge2, r.rougeL, r.n)

    return run


def build_coordinator(cfg: ServerConfig, on_round: Callable[[dict[str, Any]], None] | None = None,
                      heartbeat: Callable[[], None] | None = None, clock: Clock = SYSTEM) -> Coordinator:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    preset = get_preset(cfg.preset)
    model = build_model(preset, cfg.weights_dir, seed=cfg.seed)
    if heartbeat is not None:
        # Evaluation of a big model can outlast the watchdog; each forward pass shows it is progressing.
        model.register_forward_pre_hook(lambda *_: heartbeat())
    evaluator = make_evaluator(cfg, model) if cfg.eval_size > 0 else None
    method = cfg.build_method()
    state = method.init_global(model.state_dict(), cfg.seed)
    trainable = method.trainable(state)
    if trainable is not None:
        log.info("%s: devices train and upload %d tensors, %d of %d parameters", method.describe(), len(trainable),
                 sum(state[k].numel() for k in trainable), count_parameters(model))
    return Coordinator(cfg, state, strategy_from(cfg), evaluator, preset.name, config_json(model), on_round, heartbeat,
                       clock)


def _status_line(coord: Coordinator) -> str:
    s = coord.snapshot()
    last = RoundSummary.from_json(s["last_round"] or {})
    g = f", last G {last.g:.3f}" if known(last.g) is not None else ""
    return (f"{s['phase']}: round {s['round']} of {s['rounds_total']}, {s['devices_connected']} devices "
            f"connected{g}")


def serve(cfg: ServerConfig, on_round: Callable[[dict[str, Any]], None] | None = None,
          on_ready: Callable[[int], None] | None = None) -> int:
    """Run the configured rounds behind a gRPC server; returns a process exit code."""
    notifier = Notifier()
    watchdog = Watchdog(notifier)
    coord = build_coordinator(cfg, on_round, watchdog.beat)
    watchdog.status = lambda: _status_line(coord)
    server = make_server(coord, cfg.listen, cfg.max_workers)
    port = server.port
    server.start()
    metrics = serve_metrics(server_registry(coord), cfg.metrics_listen)
    log.info("serving fedtune.v1 on %s (port %d); %d rounds, %d devices a round, model %s", cfg.listen, port,
             cfg.rounds, cfg.devices_per_round, coord.version[:19])
    watchdog.beat()
    watchdog.start()
    notifier.ready(f"serving on port {port}: {_status_line(coord)}")
    if on_ready:
        on_ready(port)

    def _signal(signum: int, _frame: Any) -> None:
        # A stop is not the end of the run: devices keep reconnecting until a restarted server resumes it.
        log.warning("signal %d: stopping after the current step; a restart resumes from the last checkpoint",
                    signum)
        server.not_serving(wait=False)
        notifier.stopping(f"signal {signum}: stopping after the current step")
        coord.stop()

    old = {s: signal.signal(s, _signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        coord.run()
    except (OSError, CheckpointError, StateMismatch) as exc:
        # A full disk or damaged state: the message names the file; a traceback would bury it.
        log.error("the round loop stopped: %s", exc)
        code = 1
    except Exception:
        log.exception("the round loop failed")
        code = 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        # The run is over, stopped or failed: health checks say so while the devices are told.
        server.not_serving()
        if coord.finished:
            notifier.stopping(f"finished after round {coord.round_no}; telling devices")
            # Waiting polls learn of the end at once; a device between polls at its next one: one poll period.
            _drain(coord, cfg.poll_seconds + 2.0, watchdog.beat)
        else:
            # Polls are answered UNAVAILABLE: the devices back off and come back to the restarted server.
            log.info("%s after round %d of %d; devices will reconnect and a restart resumes from the checkpoint",
                     coord.phase, coord.round_no, cfg.rounds)
            notifier.stopping(f"{coord.phase} after round {coord.round_no}; devices will reconnect")
        server.stop(grace=2.0)
        watchdog.stop()
        if metrics is not None:
            metrics.close()
        notifier.close()
    return code


def _drain(coord: Coordinator, seconds: float, beat: Callable[[], None]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        beat()
        with coord.lock:  # devices heard from lately; those gone for long are not waited for
            told = set(coord.registry.alive()) <= coord.told_shutdown
        if told:
            return
        time.sleep(0.2)

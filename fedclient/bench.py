"""`fedclient bench`: the study's step micro-benchmark (its Table 4 layout) on this device.

For each preset and minibatch size: seconds per step in batch loading,
forward, loss, backward and optimizer step, then TPS, power, ηe and MFU,
next to the study's published A100 and Orin rows. Items are exactly
``input_tokens`` + ``target_tokens`` long (the study: 512 and 95), random
token ids on a randomly initialised model: the times and FLOPs of a step do
not depend on the values.

Out of memory: on CUDA the allocator raises and the row says "out of
memory". On CPU, Linux's OOM killer would kill the process instead, so each
configuration's memory is estimated first (:func:`training_bytes`) and one
that does not fit the available memory is not run: "out of memory (needs ~X
GB, Y GB available)".
"""
from __future__ import annotations

import logging
import random
import resource
from dataclasses import dataclass
from typing import Callable, Iterator

import psutil
import torch

from fedcore import study
from fedcore.batching import Batch, EncodedExample, collate
from fedcore.flops import T5Shape, mfu, parameter_count, study_flops_per_token, training_flops
from fedcore.hardware import Hardware
from fedcore.models import build_model, get_preset, pick_device
from fedcore.power import PowerMeter, PowerSource, efficiency

from .config import BenchConfig
from .trainer import StepTimes, TrainSettings, make_optimizer, timed_step

log = logging.getLogger("fedclient.bench")


@dataclass
class BenchRow:
    preset: str
    batch: int
    times: StepTimes | None = None  # means per step; None when the configuration did not run
    oom: str = ""
    power_w: float | None = None
    flops_per_step: float = 0.0
    study_flops_per_step: float = 0.0
    est_bytes: int = 0
    max_rss: int = 0
    input_tokens: int = study.SEQ_LEN

    @property
    def tps(self) -> float | None:
        """Input tokens per second, as the study counts TPS."""
        if self.times is None or self.times.total_s <= 0:
            return None
        return self.batch * self.input_tokens / self.times.total_s


def training_bytes(shape: T5Shape, batch: int, input_len: int, target_len: int) -> int:
    """A rough upper estimate of fp32 training memory: weights, grads, AdamW moments and saved activations.

    Activations kept for backward, in floats per item: per encoder layer
    S·(10·d + 4·a + 3·f) + 2·h·S² (scores and probabilities), per decoder
    layer T·(14·d + 8·a + 3·f) + 2·h·(T² + T·S), and 3·T·V for the logits;
    plus 25% and 0.5 GB for the allocator and the runtime.
    """
    d, a, f, h, V = shape.d_model, shape.attn_width, shape.d_ff, shape.num_heads, shape.vocab_size
    S, T = input_len, target_len
    enc = shape.num_layers * (S * (10 * d + 4 * a + 3 * f) + 2 * h * S * S)
    dec = shape.num_decoder_layers * (T * (14 * d + 8 * a + 3 * f) + 2 * h * (T * T + T * S))
    activations = batch * (enc + dec + 3 * T * V)
    states = 4 * parameter_count(shape)  # weights, grads, two Adam moments
    return int(4 * (states + activations) * 1.25 + 0.5e9)


def _synthetic_batches(batch: int, input_len: int, target_len: int, vocab: int, seed: int) -> Iterator[Batch]:
    rng = random.Random(seed)
    pool = [EncodedExample([rng.randrange(2, vocab) for _ in range(input_len - 1)] + [1],
                           [rng.randrange(2, vocab) for _ in range(target_len - 1)] + [1])
            for _ in range(2 * batch)]
    step = 0
    while True:  # batch loading = collating and moving, as a data loader's batch would be
        start = (step * batch) % len(pool)
        yield collate((pool + pool)[start:start + batch])
        step += 1


def _oom_message(needed: int, available: int) -> str:
    return f"out of memory (needs ~{needed / 2**30:.1f} GB, {available / 2**30:.1f} GB available)"


def bench_one(model: torch.nn.Module, shape: T5Shape, preset: str, batch: int, cfg: BenchConfig,
              device: torch.device, source: PowerSource | None) -> BenchRow:
    row = BenchRow(preset, batch, flops_per_step=batch * training_flops(shape, cfg.input_tokens, cfg.target_tokens),
                   study_flops_per_step=batch * cfg.input_tokens * study_flops_per_token(shape, cfg.input_tokens),
                   est_bytes=training_bytes(shape, batch, cfg.input_tokens, cfg.target_tokens),
                   input_tokens=cfg.input_tokens)
    if device.type == "cpu":
        # The OOM killer does not raise: check before running. This process's own
        # memory (the model) is part of what the configuration may use.
        available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
        if row.est_bytes > available:
            row.oom = _oom_message(row.est_bytes, available)
            return row
    batches = _synthetic_batches(batch, cfg.input_tokens, cfg.target_tokens, shape.vocab_size, cfg.seed)
    model.train()
    optimizer = make_optimizer(model, TrainSettings())
    try:
        warm = StepTimes()
        for _ in range(cfg.warmup):
            timed_step(model, optimizer, batches, device, warm)
        times = StepTimes()
        meter = PowerMeter(source, hz=cfg.power_hz).start()
        try:
            for _ in range(cfg.steps):
                timed_step(model, optimizer, batches, device, times)
        finally:
            reading = meter.stop()
    except torch.cuda.OutOfMemoryError:
        row.oom = "out of memory"
        return row
    except RuntimeError as exc:  # CPU allocator refusals (e.g. under a memory limit) do raise
        if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc).lower():
            raise
        row.oom = "out of memory"
        return row
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n = times.steps
    row.times = StepTimes(times.batch_loading_s / n, times.forward_s / n, times.loss_s / n, times.backward_s / n,
                          times.optimizer_step_s / n, n)
    row.power_w = reading.mean_w if reading else None
    row.max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def run_bench(cfg: BenchConfig, hw: Hardware, source: PowerSource | None,
              echo: Callable[[str], None] = print) -> list[BenchRow]:
    device = pick_device(cfg.device)
    rows = []
    for preset in cfg.preset:
        model = build_model(preset, seed=cfg.seed).to(device)
        shape = T5Shape.from_config(model.config)
        for batch in sorted(cfg.batch_sizes):
            row = bench_one(model, shape, get_preset(preset).name, batch, cfg, device, source)
            echo("  " + _progress(row))
            rows.append(row)
        del model
    return rows


def _progress(row: BenchRow) -> str:
    if row.times is None:
        return f"{row.preset} batch {row.batch}: {row.oom}"
    return (f"{row.preset} batch {row.batch}: {row.times.total_s:.3f} s/step, memory estimated "
            f"{row.est_bytes / 2**30:.1f} GB, process max RSS so far {row.max_rss / 2**30:.1f} GB")


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


HEAD = (f"{'model':<6} {'batch':>5}  {'device':<13} {'batch loading':>13} {'forward':>8} {'loss':>6} "
        f"{'backward':>8} {'opt. step':>9} {'total':>7} {'TPS':>9} {'W':>7} {'ηe':>7} {'MFU %':>6} {'MFU* %':>6}")


def _line(model: str, batch: int, device: str, phases: list[float] | None, tps: float | None, watts: float | None,
          eta: float | None, mfu_ours: float | None, mfu_study: float | None, oom: str = "") -> str:
    lead = f"{model:<6} {batch:>5}  {device:<13} "
    if phases is None:
        return lead + oom
    cells = "".join(f"{p:>{w}.3f} " for p, w in zip(phases, (13, 8, 6, 8, 9, 7)))
    return (lead + cells + f"{_f(tps, '.2f'):>9} {_f(watts, '.2f'):>7} {_f(eta, '.2f'):>7} "
            f"{_f(None if mfu_ours is None else 100 * mfu_ours, '.2f'):>6} "
            f"{_f(None if mfu_study is None else 100 * mfu_study, '.2f'):>6}")


def render(rows: list[BenchRow], hw: Hardware, cfg: BenchConfig) -> list[str]:
    lines = [HEAD, "-" * len(HEAD)]
    for r in rows:
        if r.times is None:
            lines.append(_line(r.preset, r.batch, "this device", None, None, None, None, None, None, r.oom))
        else:
            t = r.times
            lines.append(_line(r.preset, r.batch, "this device",
                               [t.batch_loading_s, t.forward_s, t.loss_s, t.backward_s, t.optimizer_step_s, t.total_s],
                               r.tps, r.power_w, efficiency(r.tps or 0.0, r.power_w),
                               mfu(r.flops_per_step / t.total_s, hw.peak_flops),
                               mfu(r.study_flops_per_step / t.total_s, hw.peak_flops)))
        same_lengths = (cfg.input_tokens, cfg.target_tokens) == (study.SEQ_LEN, study.TARGET_LEN)
        for dev in ("Orin", "A100"):
            s = study.row(r.preset, r.batch, dev)
            if s == "oom":
                lines.append(_line(r.preset, r.batch, f"{dev} (study)", None, None, None, None, None, None,
                                   "out of memory"))
            elif s is not None and same_lengths:
                assert not isinstance(s, str)
                # Our FLOPs count applied to the study's throughput, so the MFU columns compare like with like.
                ours = r.flops_per_step / r.batch * (s.tps / study.SEQ_LEN) / study.PEAK_FLOPS[dev]
                lines.append(_line(r.preset, r.batch, f"{dev} (study)",
                                   [s.batch_loading_s, s.forward_s, s.loss_s, s.backward_s, s.optimizer_step_s,
                                    s.total_s], s.tps, s.watts, s.eta_e, ours, s.mfu))
    return lines

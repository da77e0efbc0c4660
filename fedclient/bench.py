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
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import psutil
import torch

from fedcore import study
from fedcore.batching import Batch, EncodedExample, collate, encode_examples
from fedcore.clock import SYSTEM, Clock
from fedcore.data import synthetic_corpus
from fedcore.flops import T5Shape, mfu, parameter_count, study_flops_per_token, training_flops
from fedcore.hardware import Hardware
from fedcore.models import build_model, get_preset, load_tokenizer, pick_device
from fedcore.power import PowerMeter, PowerSource, efficiency

from . import powercap as pc
from .clocks import ClockJournal, FrequencyKnob, find_knob, recover
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


def _cpu_shortfall(needed: int) -> str:
    """On CPU the OOM killer does not raise: check first. "" when it fits, else the out-of-memory message."""
    # This process's own memory (the model) is part of what the configuration may use.
    available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    return _oom_message(needed, available) if needed > available else ""


def _is_oom(exc: RuntimeError) -> bool:
    """CPU allocator refusals (e.g. under a memory limit) do raise, as RuntimeErrors."""
    return "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()


def bench_one(model: torch.nn.Module, shape: T5Shape, preset: str, batch: int, cfg: BenchConfig,
              device: torch.device, source: PowerSource | None) -> BenchRow:
    row = BenchRow(preset, batch, flops_per_step=batch * training_flops(shape, cfg.input_tokens, cfg.target_tokens),
                   study_flops_per_step=batch * cfg.input_tokens * study_flops_per_token(shape, cfg.input_tokens),
                   est_bytes=training_bytes(shape, batch, cfg.input_tokens, cfg.target_tokens),
                   input_tokens=cfg.input_tokens)
    if device.type == "cpu":
        row.oom = _cpu_shortfall(row.est_bytes)
        if row.oom:
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
    except RuntimeError as exc:
        if not _is_oom(exc):
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


# ------------------------------------------------------------------ --power-cap
class TorchStepRunner:
    """Real training steps for the power-cap profiler: the bench's synthetic items, AdamW, fp32."""

    def __init__(self, model: torch.nn.Module, shape: T5Shape, cfg: BenchConfig, device: torch.device) -> None:
        self.model, self.shape, self.cfg, self.device = model, shape, cfg, device
        self.batch = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.batches: Iterator[Batch] = iter(())

    def __call__(self, batch: int) -> None:
        if batch != self.batch:
            self.optimizer, self.batch = None, 0  # free the last batch size's optimizer state first
            if self.device.type == "cpu":
                short = _cpu_shortfall(training_bytes(self.shape, batch, self.cfg.input_tokens, self.cfg.target_tokens))
                if short:
                    raise pc.StepOOM(short)
            self.model.train()
            self.optimizer = make_optimizer(self.model, TrainSettings())
            self.batches = _synthetic_batches(batch, self.cfg.input_tokens, self.cfg.target_tokens,
                                              self.shape.vocab_size, self.cfg.seed)
            self.batch = batch
        assert self.optimizer is not None
        try:
            timed_step(self.model, self.optimizer, self.batches, self.device, StepTimes())
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and not _is_oom(exc):
                raise
            self.optimizer, self.batch = None, 0
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise pc.StepOOM("out of memory") from exc


def measure_noise_scale(preset: str, cfg: BenchConfig, device: torch.device, b_big: int = 8,
                        repeats: int = 2) -> pc.NoiseEstimate:
    """B_simple of the preset (random weights) on the built-in corpus, per-example gradients (see powercap)."""
    model = build_model(preset, seed=cfg.seed).to(device)
    items = encode_examples(load_tokenizer(None), synthetic_corpus(64, cfg.seed), cfg.input_tokens, cfg.target_tokens)
    return pc.gradient_noise_scale(model, pc.t5_chunk_loss, items, 1, b_big, repeats, cfg.seed)


def render_grid(profile: pc.Profile, cap_w: float) -> list[str]:
    """Batch x frequency: seconds per step / average W, '*' over the cap."""
    freqs = sorted({r.hz for r in profile.rows})
    cells = {(r.batch, r.hz): r for r in profile.rows}
    lines = [f"{'batch':>5} " + "".join(f"{hz / 1e6:>13.2f}" for hz in freqs) + "  MHz",
             f"{'':>5} " + "".join(f"{'s/step  W':>13}" for _ in freqs)]
    for batch in sorted({r.batch for r in profile.rows}):
        line = f"{batch:>5} "
        for hz in freqs:
            r = cells.get((batch, hz))
            line += f"{'-':>13}" if r is None else f"{r.step_s:>7.3f} {r.watts:>4.1f}{'*' if r.watts > cap_w else ' '}"
        lines.append(line)
    return lines


@dataclass
class _Device:
    label: str  # "EMULATED ..." or this device's name
    hardware: str
    knob: FrequencyKnob
    source: PowerSource
    clock: Clock
    runner: pc.StepRunner


def _emulated_device(cfg: BenchConfig, preset: str, echo: Callable[[str], None]) -> _Device:
    from .emulated import EmulatedOrin, fit_orin

    if (cfg.input_tokens, cfg.target_tokens) != (study.SEQ_LEN, study.TARGET_LEN):
        raise ValueError(f"the emulation is fitted to the study's {study.SEQ_LEN} input and {study.TARGET_LEN} "
                         f"target tokens; leave the lengths at those")
    model = fit_orin(preset)
    dev = EmulatedOrin(model)
    tps = max(abs(e[1]) for e in model.fit_errors())
    watts = max(abs(e[2]) for e in model.fit_errors())
    echo(f"EMULATED Jetson AGX Orin 64GB running {preset}: step time and power fitted to the study's Table 2 Orin "
         f"rows (TPS within {100 * tps:.1f}%, W within {100 * watts:.1f}% at the top clock); nothing on this "
         f"machine is measured or changed, times are EMULATED seconds")
    echo(f"EMULATED model: {model.describe()}")
    return _Device("EMULATED", dev.hardware, dev.gpu, dev.power, dev.clock, dev.step)


def _real_device(cfg: BenchConfig, preset: str, hw: Hardware, source: PowerSource | None,
                 device: torch.device) -> _Device | str:
    """This device, or why it cannot run the power-cap bench."""
    journal = None
    if cfg.profile_dir is not None:  # a bench killed mid-profile leaves its clock locked: undo it next time
        path = cfg.profile_dir / "clock-journal.json"
        recover(path)
        journal = ClockJournal(path)
    try:
        knob = find_knob(journal=journal)
    except (OSError, ValueError, RuntimeError) as exc:  # ClockError: what is missing, in one line
        return str(exc)
    if knob is None:
        return "no controllable clock on this device (Jetson GPU devfreq, NVML clocks or writable cpufreq)"
    if source is None:
        return "no power reading on this device (INA3221, NVML or RAPL)"
    model = build_model(preset, seed=cfg.seed).to(device)
    runner = TorchStepRunner(model, T5Shape.from_config(model.config), cfg, device)
    return _Device(hw.name, hw.name, knob, source, SYSTEM, runner)


def _noise(cfg: BenchConfig, preset: str, device: torch.device) -> tuple[float, str]:
    if cfg.noise_scale > 0:
        return cfg.noise_scale, "given"
    t0 = time.perf_counter()
    est = measure_noise_scale(preset, cfg, device)
    return est.b_simple, (f"B_simple measured on {preset} with RANDOM weights, built-in corpus, per-example "
                          f"gradients of 2 x {est.b_big} items, {time.perf_counter() - t0:.0f} s; a pretrained "
                          f"model's is larger: set --noise-scale to use another")


def _row(name: str, c: pc.Choice | None, run: pc.RunResult | None, why: str = "") -> str:
    if c is None or run is None:
        return f"{name:<15} {why}"
    energy = "-" if run.energy_j is None else f"{run.energy_j / 1e3:.1f}"
    dog = f"{len(run.steps_down)} down, ends {run.watchdog.final_hz / 1e6:g} MHz" if run.steps_down else "quiet"
    return (f"{name:<15} {c.batch:>5} {c.hz / 1e6:>8.2f} {c.step_s:>7.3f} {c.watts:>5.1f} {c.steps:>6} "
            f"{c.samples:>7} {c.predicted_s:>11.1f} {run.seconds:>10.1f} {run.mean_w or 0:>10.1f} {energy:>9}  {dog}")


def run_power_cap(cfg: BenchConfig, probe: Callable[[], tuple[Hardware, PowerSource | None]],
                  echo: Callable[[str], None] = print) -> int:
    """`fedclient bench --power-cap W`: profile, choose, run the choice and the frequency-only baseline."""
    preset = get_preset(cfg.preset[0]).name
    device = pick_device(cfg.device)
    cap = cfg.power_cap
    if cfg.emulate:
        dev = _emulated_device(cfg, preset, echo)
    else:
        hw, source = probe()
        found = _real_device(cfg, preset, hw, source, device)
        if isinstance(found, str):
            echo(f"fedclient bench --power-cap: cannot run on this device: {found}. "
                 f"Try --emulate agx-orin-64gb.")
            return 2
        dev = found
    noise, how = _noise(cfg, preset, device)
    eff = pc.BatchEfficiency(noise)
    freqs = pc.spread(sorted(dev.knob.frequencies()), cfg.frequencies)
    batches = tuple(2 ** i for i in range(cfg.max_batch.bit_length()) if 2 ** i <= cfg.max_batch)
    echo(f"clock: {dev.knob.name} ({dev.knob.detail}); {len(freqs)} of its {len(dev.knob.frequencies())} "
         f"frequencies; power: {dev.source.name} ({dev.source.detail})")
    echo(f"batch-size efficiency: B_noise = {noise:.2f} ({how}); target: the progress of {cfg.samples} samples at "
         f"batch {cfg.reference_batch}, S(B) = S_min (1 + B_noise/B)")
    key = pc.ProfileKey(dev.hardware, preset, cfg.input_tokens, cfg.target_tokens, dev.knob.name, freqs, batches)
    profile, hit = pc.cached_profile(cfg.profile_dir, key, lambda: pc.profile_grid(
        dev.runner, dev.knob, dev.source, dev.clock, key, cfg.warmup, cfg.steps, cfg.power_hz, echo))
    where = "off" if cfg.profile_dir is None else ("hit" if hit else "stored") + f" in {cfg.profile_dir}"
    echo(f"\nprofile ({dev.label}; {cfg.warmup} warm-up + {cfg.steps} timed steps per point; cache {where}): "
         f"seconds per step and average W, * = over the {cap:g} W cap")
    for line in render_grid(profile, cap):
        echo(line)
    chosen = pc.choose(profile, cap, eff, cfg.samples, cfg.reference_batch)
    base = pc.frequency_only(profile, cap, eff, cfg.samples, cfg.reference_batch)
    runs = [None if c is None else pc.run_setting(dev.runner, dev.knob, dev.source, dev.clock, c,
                                                  cfg.watchdog_window_s, cfg.power_hz) for c in (chosen, base)]
    lowest = min(r.watts for r in profile.rows)
    echo(f"\n{'':<15} {'batch':>5} {'MHz':>8} {'s/step':>7} {'W':>5} {'steps':>6} {'samples':>7} "
         f"{'predicted s':>11} {'measured s':>10} {'measured W':>10} {'energy kJ':>9}  watchdog ({dev.label})")
    echo(_row("chosen (B, f)", chosen, runs[0], f"none: no profiled point is under {cap:g} W (lowest {lowest:.1f} W)"))
    echo(_row("frequency-only", base, runs[1],
              f"none: batch {profile.max_batch} is over {cap:g} W at every frequency"))
    if chosen and base and runs[0] and runs[1]:
        echo(f"\nspeed-up of choosing (B, f) over frequency capping alone: {runs[1].seconds / runs[0].seconds:.2f}x "
             f"measured ({base.predicted_s / chosen.predicted_s:.2f}x predicted), energy frequency-only / chosen "
             f"{_ratio(runs[1].energy_j, runs[0].energy_j)} ({dev.label}). Ahmed et al. (arXiv 2502.18323) report "
             f"2.4x on their device; this figure follows from the study's Orin figures and B_noise, not tuned to it.")
    return 0 if chosen else 1


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"

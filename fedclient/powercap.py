"""Training under a power cap: choose the batch size and the GPU frequency together (Ahmed et al., arXiv 2502.18323).

The parts, in the order the daemon uses them:

- :func:`profile_grid`: step time and average power for each batch size (up
  to the largest that fits) and each frequency of a grid, after warm-up
  steps, measured with the power meter; :func:`cached_profile` keeps it as
  JSON per (hardware, model, sequence lengths, knob, frequencies, batches).
- :class:`BatchEfficiency`: how many steps batch B needs for the progress a
  round planned (McCandlish et al. 2018, "An Empirical Model of Large-Batch
  Training"): S(B) = S_min·(1 + B_noise/B). B_noise is the gradient noise
  scale B_simple = tr(Σ)/|G|², measured on the device's own training data by
  :func:`gradient_noise_scale` from gradient norms at two batch sizes (their
  appendix A's unbiased estimators). Why this and not the server's proxy
  data: the proxy-data way means training to a target loss at several batch
  sizes (many rounds of compute for one number) on data that may not look
  like the devices'; B_simple costs a few backward passes on the data the
  device trains on, and can be re-measured as it grows during training.
  B_simple equals their Hessian-weighted B_noise only when the Hessian is a
  multiple of the identity (their §2.2); they found it tracks the critical
  batch size B_crit approximately, which is what the controller needs.
- :func:`choose`: for a cap, the profiled (B, f) with the least predicted
  time to the planned progress, steps(B) x t(B, f), among those whose
  measured power is under the cap; :func:`frequency_only` is the baseline
  (the largest batch that fits, at the highest frequency under the cap).
- :class:`Watchdog`: during training, a running mean of the power over a
  short window above the cap lowers the frequency one step.

The round policy decides the samples N a device spends at the round's
minibatch B_ref (N/B_ref steps); the controller spends them: the same progress
takes S_min·(1 + B_noise/B) steps at batch B, with S_min = N/(B_ref + B_noise).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from fedcore.clock import Clock
from fedcore.power import PowerMeter, PowerSource

from .clocks import ClockError, FrequencyKnob

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedclient.powercap")


class StepOOM(Exception):
    """A training step that did not fit in memory (step runners raise it for the profiler)."""


StepRunner = Callable[[int], None]  # runs one training step at the given batch size


# ------------------------------------------------------------------ profile
@dataclass(frozen=True)
class ProfileKey:
    """What a profile depends on: a change in any of these re-profiles."""

    hardware: str
    model: str
    input_tokens: int
    target_tokens: int
    knob: str
    frequencies: tuple[int, ...]
    batches: tuple[int, ...]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProfileRow:
    batch: int
    hz: int
    step_s: float
    watts: float


@dataclass
class Profile:
    key: ProfileKey
    rows: list[ProfileRow]

    @property
    def max_batch(self) -> int:
        return max(r.batch for r in self.rows)

    def to_json(self) -> str:
        return json.dumps({"key": asdict(self.key), "rows": [asdict(r) for r in self.rows]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        data = json.loads(text)
        key = data["key"]
        key = ProfileKey(**{**key, "frequencies": tuple(key["frequencies"]), "batches": tuple(key["batches"])})
        return cls(key, [ProfileRow(**r) for r in data["rows"]])


def measure(runner: StepRunner, batch: int, steps: int, source: PowerSource | None, clock: Clock,
            meter_hz: float = 5.0) -> tuple[float, float | None, float | None]:
    """Run ``steps`` steps: (seconds, average W, joules); power None when unknown.

    The meter also samples after every step, so steps longer than its period
    (and emulated steps, whose time is not real) are covered.
    """
    meter = PowerMeter(source, hz=meter_hz, clock=clock.monotonic).start()
    t0 = clock.monotonic()
    try:
        for _ in range(steps):
            runner(batch)
            meter.sample()
    finally:
        reading = meter.stop()
    seconds = clock.monotonic() - t0
    return seconds, reading.mean_w if reading else None, reading.energy_j if reading else None


def profile_grid(runner: StepRunner, knob: FrequencyKnob, source: PowerSource | None, clock: Clock, key: ProfileKey,
                 warmup: int = 1, steps: int = 5, meter_hz: float = 5.0,
                 echo: Callable[[str], None] = print) -> Profile:
    """Measure every (batch, frequency) of the key's grid; batches ascending, stopping at the first that does not fit."""
    if source is None:
        raise ValueError("profiling under a power cap needs a power reading; none is available")
    rows: list[ProfileRow] = []
    total = len(key.batches) * len(key.frequencies)
    try:
        for batch in key.batches:
            try:
                for hz in key.frequencies:
                    knob.lock(hz)
                    for _ in range(warmup):
                        runner(batch)
                    seconds, watts, _ = measure(runner, batch, steps, source, clock, meter_hz)
                    if watts is None:
                        raise ValueError(f"power source {source.name} gave no reading while profiling")
                    rows.append(ProfileRow(batch, hz, seconds / steps, watts))
                    echo(f"  profiling {len(rows)}/{total}: batch {batch} at {hz / 1e6:g} MHz: "
                         f"{seconds / steps:.3f} s/step, {watts:.1f} W")
            except StepOOM as exc:
                rows = [r for r in rows if r.batch != batch]
                echo(f"  batch {batch} does not fit ({exc}): the largest is {rows[-1].batch if rows else 'none'}")
                break
    finally:
        knob.restore()
    if not rows:
        raise StepOOM("not even the smallest batch fits")
    return Profile(key, rows)


def cached_profile(directory: Path | None, key: ProfileKey, make: Callable[[], Profile]) -> tuple[Profile, bool]:
    """The profile of ``key`` from ``directory`` (True: a hit), else made and stored there (False)."""
    if directory is None:
        return make(), False
    path = directory / f"power-profile-{key.digest()}.json"
    if path.is_file():
        try:
            cached = Profile.from_json(path.read_text())
            if cached.key == key:
                return cached, True
        except (ValueError, KeyError, TypeError) as exc:  # a damaged file is re-profiled, not trusted
            log.warning("ignoring unreadable profile %s: %s", path, exc)
    profile = make()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return profile, False


def spread(values: list[int], n: int) -> tuple[int, ...]:
    """``n`` of the ascending ``values``, evenly spread, both ends included (n = 0: all)."""
    if n == 0 or n >= len(values):
        return tuple(values)
    if n == 1:
        return (values[-1],)
    return tuple(sorted({values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)}))


# -------------------------------------------------------- batch efficiency
@dataclass(frozen=True)
class NoiseEstimate:
    """McCandlish et al.'s appendix A estimates from mean squared gradient norms at two batch sizes."""

    b_small: int
    b_big: int
    g2: float  # |G|², the true gradient's squared norm
    trace: float  # tr(Σ), the per-example gradient covariance's trace

    @property
    def b_simple(self) -> float:
        if not (math.isfinite(self.g2) and math.isfinite(self.trace)):
            raise ValueError(f"gradient norms are not finite (|G|^2 {self.g2}, tr(S) {self.trace})")
        if self.g2 <= 0:
            return math.inf  # no signal above the noise: any batch helps
        return max(0.0, self.trace / self.g2)  # a negative trace is the estimator's noise: no gradient noise

    @classmethod
    def from_norms(cls, b_small: int, sq_small: float, b_big: int, sq_big: float) -> "NoiseEstimate":
        """E|G_B|² = |G|² + tr(Σ)/B at two sizes, solved for |G|² and tr(Σ)."""
        if not b_big > b_small >= 1:
            raise ValueError(f"need b_big > b_small >= 1, got {b_big} and {b_small}")
        g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
        trace = (sq_small - sq_big) / (1 / b_small - 1 / b_big)
        return cls(b_small, b_big, g2, trace)


def gradient_noise_scale(model: "torch.nn.Module", loss: Callable[["torch.nn.Module", Sequence[Any]], "torch.Tensor"],
                         items: Sequence[Any], b_small: int = 1, b_big: int = 16, repeats: int = 2,
                         seed: int = 0) -> NoiseEstimate:
    """B_simple of ``model`` on ``items``; ``loss(model, chunk)`` is the mean loss over a chunk.

    Each repeat draws b_big items, takes the gradient of each chunk of
    b_small (b_big / b_small backward passes): |G_small|² is their mean
    squared norm, |G_big|² the squared norm of their mean. The squared norms
    are averaged over repeats before the estimators are applied (the ratio of
    means, as McCandlish et al. advise, not a mean of noisy ratios). Run in
    eval mode: dropout noise is not the data's gradient noise.
    """
    import random

    import torch

    if b_big % b_small or b_big > len(items):
        raise ValueError(f"b_big ({b_big}) must be a multiple of b_small ({b_small}) and at most {len(items)} items")
    params = [p for p in model.parameters() if p.requires_grad]
    rng = random.Random(seed)
    sq_small = sq_big = 0.0
    was_training = model.training
    model.eval()
    try:
        for _ in range(repeats):
            draw = rng.sample(range(len(items)), b_big)
            total = None
            for start in range(0, b_big, b_small):
                model.zero_grad(set_to_none=True)
                loss(model, [items[i] for i in draw[start:start + b_small]]).backward()
                g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                               for p in params])
                sq_small += float(g @ g) / (b_big // b_small)
                total = g if total is None else total + g
            assert total is not None
            mean = total / (b_big // b_small)
            sq_big += float(mean @ mean)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return NoiseEstimate.from_norms(b_small, sq_small / repeats, b_big, sq_big / repeats)


def t5_chunk_loss(model: "torch.nn.Module", chunk: Sequence[Any]) -> "torch.Tensor":
    """A T5's mean token cross-entropy over a chunk of EncodedExamples."""
    from fedcore.batching import collate

    batch = collate(chunk).to(next(model.parameters()).device)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                 use_cache=False).loss


@dataclass(frozen=True)
class BatchEfficiency:
    """Steps to a fixed progress as a function of batch size: S(B) = S_min·(1 + B_noise/B)."""

    noise_scale: float

    def steps(self, batch: int, samples: int, reference_batch: int) -> int:
        """Steps at ``batch`` for the progress of ``samples`` samples at ``reference_batch``."""
        if math.isinf(self.noise_scale):
            return math.ceil(samples / batch)  # noise-dominated: every sample counts, whatever the batch
        s_min = samples / (reference_batch + self.noise_scale)
        return max(1, math.ceil(s_min * (1 + self.noise_scale / batch)))


# -------------------------------------------------------------- controller
@dataclass(frozen=True)
class Choice:
    """A (batch, frequency) setting and what the profile predicts for the round's progress."""

    batch: int
    hz: int
    step_s: float
    watts: float
    steps: int
    cap_w: float

    @property
    def predicted_s(self) -> float:
        return self.steps * self.step_s

    @property
    def samples(self) -> int:
        return self.steps * self.batch

    def record(self) -> dict[str, Any]:
        """Fields for a round record."""
        return {"power_cap_w": self.cap_w, "batch_size": self.batch, "gpu_hz": self.hz, "steps": self.steps,
                "samples": self.samples, "predicted_step_s": self.step_s, "predicted_w": self.watts,
                "predicted_s": self.predicted_s}


def _choice(row: ProfileRow, eff: BatchEfficiency, samples: int, reference_batch: int, cap_w: float) -> Choice:
    return Choice(row.batch, row.hz, row.step_s, row.watts, eff.steps(row.batch, samples, reference_batch), cap_w)


def choose(profile: Profile, cap_w: float, eff: BatchEfficiency, samples: int, reference_batch: int) -> Choice | None:
    """The least predicted time among profiled points under the cap (ties: less power); None if none is."""
    under = [_choice(r, eff, samples, reference_batch, cap_w) for r in profile.rows if r.watts <= cap_w]
    return min(under, key=lambda c: (c.predicted_s, c.watts), default=None)


def frequency_only(profile: Profile, cap_w: float, eff: BatchEfficiency, samples: int,
                   reference_batch: int) -> Choice | None:
    """The baseline: the largest batch that fits, at its highest frequency under the cap; None if none is."""
    top = [r for r in profile.rows if r.batch == profile.max_batch and r.watts <= cap_w]
    best = max(top, key=lambda r: r.hz, default=None)
    return None if best is None else _choice(best, eff, samples, reference_batch, cap_w)


# ---------------------------------------------------------------- watchdog
@dataclass(frozen=True)
class StepDown:
    at_s: float
    from_hz: int
    to_hz: int
    mean_w: float


@dataclass
class Watchdog:
    """Lowers the knob one frequency step when the power's running mean over ``window_s`` exceeds the cap.

    Fed (time, watts) readings: by hand (:meth:`feed`), or by a power meter
    reading through :meth:`tap`. It acts only on a full window (readings over
    ``window_s`` since the first one, or since the last step down): one reading
    over the cap is a spike, not a mean. After a step down the window starts
    afresh: readings taken at the old frequency say nothing about the new one.
    """

    knob: FrequencyKnob
    cap_w: float
    window_s: float = 1.0
    steps_down: list[StepDown] = field(default_factory=list)
    over_at_floor: int = 0  # means over the cap with no lower frequency left
    failed_locks: int = 0  # step-downs the clock refused
    peak_mean_w: float = 0.0
    final_hz: int = 0  # the frequency training ended at (set by :func:`capped`)
    _window: list[tuple[float, float]] = field(default_factory=list)
    _since: float | None = None  # when the current window began filling
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, t: float, watts: float) -> StepDown | None:
        with self._lock:
            if self._since is None:
                self._since = t
            self._window.append((t, watts))
            self._window = [(ts, w) for ts, w in self._window if ts >= t - self.window_s]
            mean = sum(w for _, w in self._window) / len(self._window)
            if t - self._since < self.window_s:
                return None
            self.peak_mean_w = max(self.peak_mean_w, mean)
            if mean <= self.cap_w:
                return None
            now = self.knob.current()
            lower = [hz for hz in self.knob.frequencies() if hz < now]
            if not lower:
                self.over_at_floor += 1
                if self.over_at_floor == 1:
                    log.warning("power %.1f W over the %.1f W cap at the lowest frequency %g MHz", mean, self.cap_w,
                                now / 1e6)
                return None
            try:
                self.knob.lock(lower[-1])
            except (ClockError, OSError, ValueError) as exc:  # keep metering: the reading is still good
                self.failed_locks += 1
                if self.failed_locks == 1:
                    log.warning("power %.1f W over the %.1f W cap, and lowering the clock failed: %s", mean,
                                self.cap_w, exc)
                return None
            event = StepDown(t, now, lower[-1], mean)
            self.steps_down.append(event)
            self._window.clear()
            self._since = t
            log.warning("power %.1f W over the %.1f W cap: %s %g -> %g MHz", mean, self.cap_w, self.knob.name,
                        now / 1e6, lower[-1] / 1e6)
            return event

    def tap(self, source: PowerSource, clock: Clock) -> PowerSource:
        """``source`` as seen by a PowerMeter, every reading also fed here (energy counters differenced)."""
        return _Tapped(source, self, clock)

    def record(self) -> dict[str, Any]:
        """Fields for a round record."""
        return {"final_gpu_hz": self.final_hz, "watchdog_steps_down": len(self.steps_down),
                "over_cap_at_lowest": self.over_at_floor, "peak_window_w": self.peak_mean_w,
                "watchdog_failed_locks": self.failed_locks}


@contextmanager
def capped(knob: FrequencyKnob, source: PowerSource, clock: Clock, choice: Choice,
           window_s: float = 1.0) -> Iterator[tuple[PowerSource, Watchdog]]:
    """Training at ``choice``: its frequency locked, a watchdog on; yields the source to meter through (it feeds
    the watchdog) and the watchdog. The knob is restored on the way out, whatever happened."""
    dog = Watchdog(knob, choice.cap_w, window_s)
    knob.lock(choice.hz)
    try:
        yield dog.tap(source, clock), dog
    finally:
        try:
            dog.final_hz = knob.current()
        finally:
            knob.restore()


@dataclass
class _Tapped:
    source: PowerSource
    watchdog: Watchdog
    clock: Clock
    _last: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def kind(self) -> str:
        return self.source.kind

    @property
    def detail(self) -> str:
        return self.source.detail

    def read(self) -> float:
        value, t = self.source.read(), self.clock.monotonic()
        if self.source.kind == "power":
            self.watchdog.feed(t, value)
        elif self._last is not None and t > self._last[0]:
            self.watchdog.feed(t, (value - self._last[1]) / (t - self._last[0]))
        self._last = (t, value)
        return value


@dataclass(frozen=True)
class RunResult:
    """A setting run on the device for its steps, with the watchdog on."""

    steps: int
    seconds: float
    mean_w: float | None
    energy_j: float | None
    watchdog: Watchdog

    @property
    def steps_down(self) -> list[StepDown]:
        return self.watchdog.steps_down

    def record(self) -> dict[str, Any]:
        """Fields for a round record."""
        return {"measured_s": self.seconds, "mean_w": self.mean_w, "energy_j": self.energy_j,
                **self.watchdog.record()}


def run_setting(runner: StepRunner, knob: FrequencyKnob, source: PowerSource, clock: Clock, choice: Choice,
                window_s: float = 1.0, meter_hz: float = 5.0) -> RunResult:
    """Run the choice's steps at its frequency under the watchdog (as the daemon would train); knob restored after."""
    with capped(knob, source, clock, choice, window_s) as (watched, dog):
        seconds, watts, joules = measure(runner, choice.batch, choice.steps, watched, clock, meter_hz)
    return RunResult(choice.steps, seconds, watts, joules, dog)

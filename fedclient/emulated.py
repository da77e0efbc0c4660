"""An EMULATED Jetson AGX Orin 64GB: GPU clock knob, power source and training steps, with no hardware touched.

For machines without a controllable clock (this project's development
machine), so that the power-cap controller (:mod:`fedclient.powercap`) can be
profiled, run and tested. Everything it prints says EMULATED.

The model: a step of batch B at GPU clock f, with r = f_max / f::

    host(B)   = h0 + h1·B                  CPU: Python, kernel launches, collation (no GPU clock)
    gpu(B, f) = B·(cc·r + cm)              compute part scales with the clock, DRAM part does not
    t(B, f)   = s + max(host(B), gpu(B, f))  the GPU runs while the host queues work; s does not overlap
    u(B, f)   = gpu(B, f) / t(B, f)        the GPU's busy fraction
    P(B, f)   = Ps + k·u^γ·(f/f_max)·(V(f)/V(f_max))²
    V(f)/V(f_max) = V_FLOOR + (1 - V_FLOOR)·f/f_max

The fit (:func:`fit_orin`) uses only the study's Orin rows of Table 2 at the
top clock (Woisetschläger et al. 2023; average W and TPS, with
TPS = ηe x W, for batch 1..128 of FLAN-T5-Small): step time
t = B x 512 / TPS. The host-bound and GPU-bound rows are split where the
fit is best (Small: batch 1 and 8 host-bound); s and cc + cm come from a
least-squares fit of the GPU-bound rows in relative error, h0 and h1 from
the host-bound rows; then Ps, k and γ from the rows' W against u. With γ = 1
(power linear in u) batch 8 is 11% off; the fitted γ ≈ 2 brings every row
within 3%. For Small the fit gives s ≈ 0.155 s, h0 ≈ 0.376 s,
h1 ≈ 0.0245 s, cc + cm ≈ 0.0624 s per item, Ps ≈ 16.4 W, k ≈ 25.4 W, γ ≈ 2.0,
reproducing the table's TPS within 0.5% and W within 3%
(tests/test_powercap.py checks both).

What the study does not give, stated as assumptions: how the time splits
into compute and DRAM parts (cm = three passes over the activations a step
keeps, from :func:`fedclient.bench.training_bytes`, at the Orin's 204.8 GB/s:
about 8% of the per-item time for Small), and the voltage curve (V_FLOOR:
about 0.6 of the top voltage at the lowest clock, a typical DVFS range).
Nothing here is tuned to reproduce the power-cap paper's 2.4x.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np

from fedcore import study
from fedcore.clock import Clock, manual_clock

from .powercap import StepOOM

# The AGX Orin 64GB GPU's devfreq steps (available_frequencies of 17000000.ga10b/17000000.gpu, JetPack 5),
# MAXN's top clock being 1300.5 MHz (NVIDIA Jetson Linux Developer Guide, "Platform Power and Performance",
# AGX Orin 64GB power modes: GPU max 1300 MHz). The 13 steps as listed by published Orin DVFS
# experiments (e.g. IISc DREAM:Lab's power-mode sweeps, gpu_frequencies 114750000 ... 1300500000).
ORIN_GPU_HZ: tuple[int, ...] = (114_750_000, 216_750_000, 318_750_000, 420_750_000, 522_750_000, 624_750_000,
                                726_750_000, 828_750_000, 930_750_000, 1_032_750_000, 1_134_750_000,
                                1_236_750_000, 1_300_500_000)
DEVICES = ("agx-orin-64gb",)
DRAM_BYTES_PER_S = 204.8e9  # AGX Orin 64GB LPDDR5, 256-bit at 6400 MT/s
ACTIVATION_PASSES = 3  # saved activations written, read back in backward, their gradients written
V_FLOOR = 0.55  # V(f)/V(f_max) = V_FLOOR + (1 - V_FLOOR)·f/f_max: an assumption, not from the study


@dataclass(frozen=True)
class OrinModel:
    """Step time and power of one model on the emulated Orin (see the module docstring)."""

    model: str
    serial_s: float  # s
    host_s: float  # h0
    host_per_item_s: float  # h1
    compute_per_item_s: float  # cc, at f_max
    memory_per_item_s: float  # cm
    static_w: float  # Ps
    dynamic_w: float  # k
    gamma: float
    max_batch: int  # the largest the study ran on the Orin without running out of memory
    f_max: int = ORIN_GPU_HZ[-1]

    def gpu_s(self, batch: int, hz: int) -> float:
        return batch * (self.compute_per_item_s * self.f_max / hz + self.memory_per_item_s)

    def step_s(self, batch: int, hz: int) -> float:
        return self.serial_s + max(self.host_s + self.host_per_item_s * batch, self.gpu_s(batch, hz))

    def watts(self, batch: int, hz: int) -> float:
        x = hz / self.f_max
        busy = self.gpu_s(batch, hz) / self.step_s(batch, hz)
        return self.static_w + self.dynamic_w * busy ** self.gamma * x * (V_FLOOR + (1 - V_FLOOR) * x) ** 2

    def fit_errors(self) -> list[tuple[int, float, float]]:
        """(batch, relative TPS error, relative W error) at the top clock against the study's rows."""
        return [(b, (b * study.SEQ_LEN / self.step_s(b, self.f_max)) / tps - 1, self.watts(b, self.f_max) / w - 1)
                for b, tps, w in study_points(self.model)]

    def describe(self) -> str:
        return (f"s {self.serial_s:.4f} s, h0 {self.host_s:.4f} s, h1 {self.host_per_item_s:.5f} s/item, "
                f"cc {self.compute_per_item_s:.5f} s/item at {self.f_max / 1e6:g} MHz, cm {self.memory_per_item_s:.5f} "
                f"s/item, Ps {self.static_w:.2f} W, k {self.dynamic_w:.2f} W, gamma {self.gamma:.2f}")


def study_points(model: str) -> list[tuple[int, float, float]]:
    """(batch, TPS, W) of the study's Table 2 Orin rows for a model; TPS = ηe x W (Table 2's own TPS)."""
    points = []
    for b in study.batches(model):
        r = study.row(model, b, "Orin")
        if r is not None and not isinstance(r, str) and r.watts is not None and r.eta_e is not None:
            points.append((b, r.eta_e * r.watts, r.watts))
    return points


def _rel_lstsq(columns: list[np.ndarray], target: np.ndarray) -> np.ndarray:
    """Least squares of sum(coef·column) against target, in relative error."""
    a = np.stack([c / target for c in columns], axis=1)
    return np.linalg.lstsq(a, np.ones_like(target), rcond=None)[0]


@lru_cache(maxsize=None)
def fit_orin(model: str = "small") -> OrinModel:
    """Fit :class:`OrinModel` to the study's Orin rows of ``model`` (see the module docstring)."""
    from fedcore.flops import T5Shape

    from .bench import training_bytes  # bench imports torch and this module's users; import late

    points = study_points(model)
    if len(points) < 5:  # more rows than the time part's four parameters, or the fit checks nothing
        raise ValueError(f"the study has {len(points)} Orin rows with power for {model}; the emulation needs 5 "
                         f"(FLAN-T5-Small has 6)")
    b = np.array([p[0] for p in points], dtype=float)
    t = b * study.SEQ_LEN / np.array([p[1] for p in points])
    w = np.array([p[2] for p in points])
    best: tuple[float, tuple[float, ...]] | None = None
    for k in range(1, len(b) - 1):  # rows [:k] host-bound, [k:] GPU-bound (at least two)
        s, c = _rel_lstsq([np.ones(len(b) - k), b[k:]], t[k:])
        if k == 1:
            h0, h1 = t[0] - s, 0.0
        else:
            h0s, h1 = _rel_lstsq([np.ones(k), b[:k]], t[:k])
            h0 = h0s - s
        host, gpu = h0 + h1 * b, c * b
        if np.any(host[:k] < gpu[:k]) or np.any(gpu[k:] < host[k:]):
            continue  # this split contradicts itself
        err = float(np.max(np.abs((s + np.maximum(host, gpu)) / t - 1)))
        if best is None or err < best[0]:
            best = (err, (s, h0, h1, c))
    assert best is not None, "no consistent host/GPU split"
    s, h0, h1, c = best[1]
    busy = c * b / (s + np.maximum(h0 + h1 * b, c * b))
    fits = []
    for gamma in np.arange(0.5, 3.001, 0.01):
        ps, kw = _rel_lstsq([np.ones_like(w), busy ** gamma], w)
        fits.append((float(np.sum(((ps + kw * busy ** gamma) / w - 1) ** 2)), float(gamma), float(ps), float(kw)))
    _, gamma, ps, kw = min(fits)
    shape = T5Shape.from_preset(model)
    act_bytes = (training_bytes(shape, 2, study.SEQ_LEN, study.TARGET_LEN)
                 - training_bytes(shape, 1, study.SEQ_LEN, study.TARGET_LEN)) / 1.25  # without its 25% margin
    cm = min(ACTIVATION_PASSES * act_bytes / DRAM_BYTES_PER_S, c)
    max_batch = max(p[0] for p in points)
    return OrinModel(model, float(s), float(h0), float(h1), float(c - cm), float(cm), ps, kw, gamma, max_batch)


@dataclass
class EmulatedGpu:
    """A FrequencyKnob over the emulated Orin's GPU clock (nothing written anywhere)."""

    hz_list: tuple[int, ...] = ORIN_GPU_HZ
    name: str = "emulated-gpu"
    detail: str = "EMULATED Jetson AGX Orin 64GB GPU devfreq (no hardware touched)"
    locked: int | None = None
    locks: list[int] = field(default_factory=list)  # every lock, for tests and reports
    on_change: Callable[[], None] = lambda: None

    def frequencies(self) -> list[int]:
        return list(self.hz_list)

    def current(self) -> int:
        return self.hz_list[-1] if self.locked is None else self.locked  # unlocked: the governor runs at the top

    def lock(self, hz: int) -> None:
        if hz not in self.hz_list:
            raise ValueError(f"{self.name}: {hz} Hz is not one of the available frequencies")
        self.locked = hz
        self.locks.append(hz)
        self.on_change()

    def restore(self) -> None:
        self.locked = None
        self.on_change()


@dataclass
class EmulatedPower:
    """A PowerSource reading the emulated device's power now: the running step's, or idle."""

    device: "EmulatedOrin"
    name: str = "emulated"
    kind: str = "power"
    detail: str = "EMULATED module power (model fitted to the study's Orin figures)"

    def read(self) -> float:
        return self.device.watts_now()


class EmulatedOrin:
    """The emulated device: a knob, a power source, and a step runner that advances a fake clock.

    ``power_bias`` scales the true power (a warmer chip leaks more): set it
    after profiling to make the profile under-predict, as a watchdog must handle.
    """

    hardware = "EMULATED agx-orin-64gb"

    def __init__(self, model: OrinModel | None = None, clock: Clock | None = None, power_bias: float = 1.0) -> None:
        self.model = model or fit_orin("small")
        self.clock = clock or manual_clock()
        self.power_bias = power_bias
        # Clocks change between steps: until the next step runs, the device is idle.
        self.gpu = EmulatedGpu(on_change=self.idle)
        self.power = EmulatedPower(self)
        self.running: int | None = None  # batch of the step in flight (or last run); None: idle
        self.steps = 0

    def step(self, batch: int) -> None:
        """One emulated training step: the clock moves by t(B, f); StepOOM past the largest batch that fits."""
        if batch > self.model.max_batch:
            raise StepOOM(f"EMULATED: batch {batch} does not fit (the study's largest on the Orin: "
                          f"{self.model.max_batch})")
        self.running = batch
        self.clock.sleep(self.model.step_s(batch, self.gpu.current()))
        self.steps += 1

    def idle(self) -> None:
        self.running = None

    def watts_now(self) -> float:
        if self.running is None:
            return self.model.static_w
        return self.power_bias * self.model.watts(self.running, self.gpu.current())

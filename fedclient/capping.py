"""The daemon under a power cap: a round's (batch size, GPU frequency) chosen together, a watchdog while training.

Each round: the profile of this device (cached in the state dir per hardware,
model, lengths, clock and grid; profiled at the first round otherwise), the
gradient noise scale of the round's model on the device's own data (once,
unless `noise_scale` is set), then :func:`fedclient.powercap.choose` for the
round's planned progress. The round policy decides the samples at the task's
minibatch; the choice spends them as the same progress at its own batch size
(S_min·(1 + B_noise/B) steps), so a device may train fewer or more samples
than planned, and its update weighs by the samples it trained.

With `emulate`, the knob and the power source are an EMULATED AGX Orin
(:mod:`fedclient.emulated`): the round still trains for real on this machine
with the chosen batch and steps, and the emulated device runs the same steps
on its own clock for the time, power and energy the record carries as
``cap_emulated_*``.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from fedcore.clock import SYSTEM
from fedcore.flops import T5Shape
from fedcore.power import PowerSource

from . import powercap as pc
from .clocks import ClockError, ClockJournal, FrequencyKnob, find_knob
from .config import BenchConfig, ClientConfig
from .emulated import EmulatedOrin
from .trainer import TrainSettings

log = logging.getLogger("fedclient.capping")

PROFILE_STEPS, PROFILE_WARMUP = 3, 1
# Clocks the daemon profiles, spread over the knob's list with both ends: every step of a real Orin's 13 at 8 batch
# sizes would take round 1 about 40 minutes; NVML GPUs list dozens.
PROFILE_CLOCKS = 7
NOISE_B_BIG, NOISE_REPEATS = 8, 2
CLOCK_JOURNAL = "clocks.json"  # in the state dir


def profile_batches(largest: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `largest`."""
    out, b = [], 1
    while b <= largest:
        out.append(b)
        b *= 2
    return tuple(out)


@dataclass
class Round:
    """One capped round: the choice, and what training under it showed."""

    choice: pc.Choice
    noise_scale: float = math.inf
    baseline_s: float | None = None  # frequency-only's predicted time for the same progress
    watchdog: pc.Watchdog | None = None
    emulated: pc.RunResult | None = None

    def record(self) -> dict[str, float]:
        """The round record's `extra` fields (finite numbers only), prefixed cap_."""
        fields: dict[str, Any] = dict(self.choice.record(), noise_scale=self.noise_scale,
                                      baseline_predicted_s=self.baseline_s)
        if self.watchdog is not None:
            fields.update(self.watchdog.record())
        if self.emulated is not None:
            r = self.emulated
            fields.update(emulated_s=r.seconds, emulated_w=r.mean_w, emulated_energy_j=r.energy_j,
                          **{f"emulated_{k}": v for k, v in r.watchdog.record().items()})
        return {f"cap_{k}": float(v) for k, v in fields.items() if v is not None and math.isfinite(v)}


class PowerCapper:
    """The knob, the profile and the noise scale a device keeps across rounds."""

    def __init__(self, cfg: ClientConfig, state_dir: Path | None, source: PowerSource | None,
                 hardware: str, examples: int) -> None:
        self.cfg, self.cap_w = cfg, cfg.power_cap_w
        self.profile_dir = state_dir / "power-profiles" if state_dir is not None else None
        self.emu: EmulatedOrin | None = None
        if cfg.emulate:
            self.emu = EmulatedOrin()
            knob: FrequencyKnob | None = self.emu.gpu
            source, hardware = self.emu.power, self.emu.hardware
            log.info("power cap %.1f W on an EMULATED %s (no clock or power touched)", self.cap_w, cfg.emulate)
        else:
            if state_dir is None:
                raise ClockError("power_cap_w changes clocks: set state_dir, where the journal that restores them "
                                 "after a kill is kept")
            knob = find_knob(cfg.clock_control, journal=ClockJournal(state_dir / CLOCK_JOURNAL))
            if knob is None:
                raise ClockError(f"power_cap_w = {self.cap_w:g} but this device has no clock it may control "
                                 f"(clock_control = {cfg.clock_control!r}; see the warnings above)")
            if source is None:
                raise ClockError(f"power_cap_w = {self.cap_w:g} needs a power reading, and power_source = "
                                 f"{cfg.power_source!r} found none")
        assert knob is not None
        self.knob, self.source, self.hardware = knob, source, hardware
        self.fixed = pc.BatchEfficiency(cfg.noise_scale) if cfg.noise_scale > 0 else None
        self.noise: dict[str, pc.BatchEfficiency] = {}  # measured, per method
        self.b_big = min(NOISE_B_BIG, examples)
        if self.fixed is None and self.b_big < 2:
            raise ClockError(f"power_cap_w: measuring the gradient noise scale needs at least 2 local examples "
                             f"(this device has {examples}); set noise_scale")
        self.examples = examples
        self.profile: pc.Profile | None = None

    # ------------------------------------------------------------ before training
    def ensure_profile(self, model: torch.nn.Module, model_name: str, settings: TrainSettings,
                       device: torch.device) -> pc.Profile:
        """The profile for the round's model, method and lengths: cached, or measured now (it trains the model
        on synthetic items, so call it before the round's weights are loaded)."""
        largest = self.emu.model.max_batch if self.emu is not None else 128
        if self.cfg.max_batch_size:
            largest = min(largest, self.cfg.max_batch_size)
        mode = getattr(self.knob, "nvpmodel", None)  # a Jetson power mode changes every row
        key = pc.ProfileKey(self.hardware + (f" nvpmodel {mode}" if mode else ""), model_name,
                            settings.max_input_tokens, settings.max_target_tokens, self.knob.name,
                            pc.spread(sorted(self.knob.frequencies()), PROFILE_CLOCKS), profile_batches(largest))
        if self.profile is not None and self.profile.key == key:
            return self.profile
        if self.emu is not None:
            runner, clock = self.emu.step, self.emu.clock
        else:
            from .bench import TorchStepRunner  # the bench's real step: synthetic items, AdamW

            bench = BenchConfig(input_tokens=settings.max_input_tokens, target_tokens=settings.max_target_tokens,
                                seed=settings.seed % (1 << 32))
            runner, clock = TorchStepRunner(model, T5Shape.from_config(model.config), bench, device), SYSTEM
        self.profile, hit = pc.cached_profile(self.profile_dir, key, lambda: pc.profile_grid(
            runner, self.knob, self.source, clock, key, PROFILE_WARMUP, PROFILE_STEPS, echo=log.info))
        log.info("power profile %s: %d points, batches up to %d%s", key.digest(), len(self.profile.rows),
                 self.profile.max_batch, " (cached)" if hit else "")
        return self.profile

    def ensure_noise(self, method: str, model: torch.nn.Module, items: Callable[[], Sequence[Any]],
                     seed: int) -> pc.BatchEfficiency:
        """B_noise of the round's model (weights loaded, trainable tensors as the method set them) on local
        items, measured once per method (what trains changes the gradient's noise)."""
        if self.fixed is not None:
            return self.fixed
        if method not in self.noise:
            est = pc.gradient_noise_scale(model, pc.t5_chunk_loss, items(), 1, self.b_big, NOISE_REPEATS, seed)
            self.noise[method] = pc.BatchEfficiency(est.b_simple)
            log.info("gradient noise scale B_simple %.3g for %s on this device's data (|G|^2 %.3g, tr(S) %.3g)",
                     est.b_simple, method, est.g2, est.trace)
        return self.noise[method]

    def choose(self, settings: TrainSettings, eff: pc.BatchEfficiency) -> tuple[TrainSettings, Round]:
        """The round's settings at the chosen batch and steps, for the progress the task planned.

        Batches above the task's never: the same progress at a larger batch trains more samples than the
        server planned (and weighs by), and one above the local data would not be that batch."""
        assert self.profile is not None
        samples = (settings.local_steps * settings.batch_size if settings.local_steps > 0
                   else settings.local_epochs * self.examples)
        limit = min(settings.batch_size, self.examples)
        profile = pc.Profile(self.profile.key, [r for r in self.profile.rows if r.batch <= limit])
        if not profile.rows:
            profile = pc.Profile(self.profile.key, [r for r in self.profile.rows if r.batch == 1])
        choice = pc.choose(profile, self.cap_w, eff, samples, settings.batch_size)
        if choice is None:
            row = min(profile.rows, key=lambda r: (r.watts, -r.batch))
            choice = pc.Choice(row.batch, row.hz, row.step_s, row.watts,
                               eff.steps(row.batch, samples, settings.batch_size), self.cap_w)
            log.warning("no profiled setting stays under %.1f W (the least: %.1f W at batch %d, %g MHz); training "
                        "there, the watchdog holds the lowest clock", self.cap_w, row.watts, row.batch, row.hz / 1e6)
        base = pc.frequency_only(profile, self.cap_w, eff, samples, settings.batch_size)
        log.info("power cap %.1f W: batch %d at %g MHz, %d steps (%d samples for the %d planned at batch %d), "
                 "predicted %.1f s at %.1f W%s", self.cap_w, choice.batch, choice.hz / 1e6, choice.steps,
                 choice.samples, samples, settings.batch_size, choice.predicted_s, choice.watts,
                 f"; frequency-only: batch {base.batch} at {base.hz / 1e6:g} MHz, {base.predicted_s:.1f} s"
                 if base is not None else "")
        rnd = Round(choice, noise_scale=eff.noise_scale,
                    baseline_s=base.predicted_s if base is not None else None)
        return replace(settings, batch_size=choice.batch, local_steps=choice.steps), rnd

    # ------------------------------------------------------------ during training
    @contextmanager
    def training(self, rnd: Round, own: PowerSource | None) -> Iterator[PowerSource | None]:
        """The frequency locked and the watchdog on while the body trains; yields the source to meter through.

        Emulated: the body trains for real, metered on this machine's own source, and the emulated device runs
        the choice's steps under its own watchdog afterwards."""
        if self.emu is not None:
            yield own
            rnd.emulated = pc.run_setting(self.emu.step, self.knob, self.source, self.emu.clock, rnd.choice)
            return
        with pc.capped(self.knob, self.source, SYSTEM, rnd.choice) as (watched, dog):
            rnd.watchdog = dog
            yield watched

    def close(self) -> None:
        """Clocks back as they were (also done after every round)."""
        self.knob.restore()

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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fedcore.clock import SYSTEM
from fedcore.flops import T5Shape
from fedcore.power import PowerSource

from . import powercap as pc
from .clocks import ClockError, ClockJournal, FrequencyKnob, find_knob, recover
from .config import BenchConfig, ClientConfig
from .emulated import EmulatedOrin
from .trainer import TrainSettings

log = logging.getLogger("fedclient.capping")

PROFILE_STEPS, PROFILE_WARMUP = 3, 1
NOISE_B_BIG, NOISE_REPEATS = 8, 2


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
    watchdog: pc.Watchdog | None = None
    emulated: pc.RunResult | None = None

    def record(self) -> dict[str, float]:
        """The round record's `extra` fields (numbers only), prefixed cap_."""
        fields: dict[str, Any] = dict(self.choice.record())
        if self.watchdog is not None:
            fields.update(self.watchdog.record())
        if self.emulated is not None:
            r = self.emulated
            fields.update(emulated_s=r.seconds, emulated_w=r.mean_w, emulated_energy_j=r.energy_j,
                          **{k: v for k, v in r.watchdog.record().items()})
        return {f"cap_{k}": float(v) for k, v in fields.items() if v is not None}


class PowerCapper:
    """The knob, the profile and the noise scale a device keeps across rounds."""

    def __init__(self, cfg: ClientConfig, state_dir: Path | None, source: PowerSource | None,
                 hardware: str) -> None:
        self.cfg, self.cap_w = cfg, cfg.power_cap_w
        self.profile_dir = state_dir / "power-profiles" if state_dir is not None else None
        self.emu: EmulatedOrin | None = None
        if cfg.emulate:
            self.emu = EmulatedOrin()
            knob: FrequencyKnob | None = self.emu.gpu
            source, hardware = self.emu.power, self.emu.hardware
            log.info("power cap %.1f W on an EMULATED %s (no clock or power touched)", self.cap_w, cfg.emulate)
        else:
            journal = None
            if state_dir is not None:
                recover(state_dir / "clocks.json")
                journal = ClockJournal(state_dir / "clocks.json")
            knob = find_knob(cfg.clock_control, journal=journal)
            if knob is None:
                raise ClockError(f"power_cap_w = {self.cap_w:g} but this device has no clock it may control "
                                 f"(clock_control = {cfg.clock_control!r}; see the warnings above)")
            if source is None:
                raise ClockError(f"power_cap_w = {self.cap_w:g} needs a power reading, and power_source = "
                                 f"{cfg.power_source!r} found none")
        assert knob is not None
        self.knob, self.source, self.hardware = knob, source, hardware
        self.noise = pc.BatchEfficiency(cfg.noise_scale) if cfg.noise_scale > 0 else None
        self.profile: pc.Profile | None = None

    # ------------------------------------------------------------ before training
    def ensure_profile(self, model: torch.nn.Module, model_name: str, settings: TrainSettings,
                       device: torch.device) -> pc.Profile:
        """The profile for the round's model and lengths: cached, or measured now (it trains the model on
        synthetic items, so call it before the round's weights are loaded)."""
        largest = self.emu.model.max_batch if self.emu is not None else (self.cfg.max_batch_size or 128)
        key = pc.ProfileKey(self.hardware, model_name, settings.max_input_tokens, settings.max_target_tokens,
                            self.knob.name, tuple(self.knob.frequencies()), profile_batches(largest))
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

    def ensure_noise(self, model: torch.nn.Module, items: Sequence[Any], seed: int) -> pc.BatchEfficiency:
        """B_noise of the round's model (weights loaded, trainable tensors as the method set them) on local items."""
        if self.noise is None:
            b_big = min(NOISE_B_BIG, len(items))
            if b_big < 2:
                raise ValueError("the gradient noise scale needs at least 2 local examples; set noise_scale")
            est = pc.gradient_noise_scale(model, pc.t5_chunk_loss, items, 1, b_big, NOISE_REPEATS, seed)
            self.noise = pc.BatchEfficiency(est.b_simple)
            log.info("gradient noise scale B_simple %.3g on this device's data (|G|^2 %.3g, tr(S) %.3g)",
                     est.b_simple, est.g2, est.trace)
        return self.noise

    def choose(self, settings: TrainSettings, eff: pc.BatchEfficiency) -> tuple[TrainSettings, Round]:
        """The round's settings at the chosen batch and steps, for the progress the task planned."""
        assert self.profile is not None
        samples = settings.local_steps * settings.batch_size
        choice = pc.choose(self.profile, self.cap_w, eff, samples, settings.batch_size)
        if choice is None:
            row = min(self.profile.rows, key=lambda r: (r.watts, -r.batch))
            choice = pc.Choice(row.batch, row.hz, row.step_s, row.watts,
                               eff.steps(row.batch, samples, settings.batch_size), self.cap_w)
            log.warning("no profiled setting stays under %.1f W (the least: %.1f W at batch %d, %g MHz); training "
                        "there, the watchdog holds the lowest clock", self.cap_w, row.watts, row.batch, row.hz / 1e6)
        base = pc.frequency_only(self.profile, self.cap_w, eff, samples, settings.batch_size)
        log.info("power cap %.1f W: batch %d at %g MHz, %d steps (%d samples for the %d planned at batch %d), "
                 "predicted %.1f s at %.1f W%s", self.cap_w, choice.batch, choice.hz / 1e6, choice.steps,
                 choice.samples, samples, settings.batch_size, choice.predicted_s, choice.watts,
                 f"; frequency-only: batch {base.batch} at {base.hz / 1e6:g} MHz, {base.predicted_s:.1f} s"
                 if base is not None else "")
        return replace(settings, batch_size=choice.batch, local_steps=choice.steps), Round(choice)

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

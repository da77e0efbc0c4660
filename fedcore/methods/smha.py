"""Selective multi-head attention (SMHA; Szablewski, Sani, Lane): devices train a fraction of the heads.

Each device trains 1/4, 1/2 or all of the heads of every attention block
(the same heads in every block), stated by the device or chosen from its
budgets; its trained heads are separate parameters (fedcore.heads), so the
frozen heads cost no weight gradient and no optimizer state. The round's
head sets together cover every head, at least `full_devices` devices a
round train everything (the poster: at least one client must train all
parameters for convergence), and each head's slice is averaged over the
devices that trained it. With `train_rest` the other weights (feed-forward,
norms, embeddings, lm_head) train with the heads on every device.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedcore.flops import training_flops
from fedcore.heads import head_axis
from fedcore.memory import training_memory

from .partial import WHOLE, DeviceBudget, Part, PartialMethod, Plan, PlanContext

#: the head shares a device may train, largest first
FRACTIONS = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class SelectiveHeads(PartialMethod):
    fraction: float = 0.25  # for devices that state none and have no budget that decides
    full_devices: int = 1
    train_rest: bool = True
    name: ClassVar[str] = "smha"
    summary_note: ClassVar[str] = " (heads per device)"

    def describe(self) -> str:
        return (f"selective heads (SMHA), {self.fraction:g} of the heads by default, {self.full_devices} device(s) "
                f"training all a round, {'with' if self.train_rest else 'without'} the other weights")

    def validate(self) -> None:
        if self.fraction not in FRACTIONS:
            raise ValueError(f"smha_fraction must be one of {', '.join(f'{f:g}' for f in FRACTIONS)}, "
                             f"got {self.fraction:g}")
        if self.full_devices < 0:
            raise ValueError(f"smha_full_devices must be >= 0, got {self.full_devices}")

    def plan(self, devices: Sequence[DeviceBudget], ctx: PlanContext) -> dict[str, Plan]:
        heads = ctx.shape.num_heads
        chosen = {d.device_id: self.device_fraction(d, ctx) for d in devices}
        # The devices that train everything: those that asked for it, then the largest memory budgets.
        ranked = sorted(devices, key=lambda d: (chosen[d.device_id][0] < 1.0, -(d.memory_bytes or 1 << 62),
                                                d.device_id))
        full = {d.device_id for d in ranked[:self.full_devices]}
        partial = sorted(d.device_id for d in devices if d.device_id not in full and chosen[d.device_id][0] < 1.0)
        full |= {d.device_id for d in devices if chosen[d.device_id][0] >= 1.0}
        counts = {d: max(1, round(chosen[d][0] * heads)) for d in partial}
        sets = cover_heads(partial, counts, heads, random.Random(f"{ctx.seed}:{ctx.round_no}:smha"),
                           need_cover=not full)
        out: dict[str, Plan] = {}
        for d in devices:
            dev, why = d.device_id, chosen[d.device_id][1]
            if dev in full:
                out[dev] = Plan.whole(list(ctx.state), "all heads and weights" + (
                    f" ({why})" if chosen[dev][0] >= 1.0 else ": this round's full-training device"))
            else:
                out[dev] = self.head_plan(ctx, sets[dev], f"{len(sets[dev])}/{heads} heads ({why})")
        return out

    def head_plan(self, ctx: PlanContext, heads: Sequence[int], note: str) -> Plan:
        d_kv = ctx.shape.d_kv
        parts: dict[str, Part] = {}
        for name in ctx.state:
            axis = head_axis(name)
            if axis is not None:
                parts[name] = Part(axis, d_kv, tuple(sorted(heads)))
            elif self.train_rest:
                parts[name] = WHOLE
        return Plan.of(parts, note)

    def device_fraction(self, d: DeviceBudget, ctx: PlanContext) -> tuple[float, str]:
        """(share of heads, why): the device's own, else the server's, or the largest below it that fits the
        device's memory, FLOPs and upload budgets."""
        if d.head_fraction > 0:
            return min(FRACTIONS, key=lambda f: abs(f - d.head_fraction)), "the device's setting"
        if not (d.memory_bytes or d.compute_flops or d.upload_bytes):
            return self.fraction, "the server's default"
        numel = ctx.numel()
        why = ""
        for f in (f for f in FRACTIONS if f <= self.fraction):
            trained = {n: (int(t * f) if head_axis(n) is not None else t) for n, t in numel.items()
                       if self.train_rest or head_axis(n) is not None or f >= 1.0}
            mem = training_memory(ctx.shape, {**numel, **trained}, list(trained), d.batch_size, d.input_tokens,
                                  d.target_tokens).total
            flops = training_flops(ctx.shape, d.input_tokens, d.target_tokens)
            # fp32 bytes of the trained part (uploads are at most that before compression)
            too_much = d.fits(mem, flops, 4 * sum(trained.values()))
            if not too_much:
                return f, "the server's default" if f == self.fraction else f"fits its budgets ({why} above it)"
            why = too_much
        return FRACTIONS[-1], f"nothing fits its budgets ({why}); the smallest share"


def cover_heads(devices: Sequence[str], counts: dict[str, int], heads: int, rng: random.Random,
                need_cover: bool) -> dict[str, list[int]]:
    """Each device's heads: consecutive (mod `heads`) from a seeded start, one device after the other, so
    the round's sets together cover every head when their counts add up to it; with `need_cover` (no
    device trains everything) heads still uncovered are given out one by one."""
    start = rng.randrange(heads) if heads else 0
    out: dict[str, list[int]] = {}
    for d in devices:
        out[d] = sorted({(start + j) % heads for j in range(min(counts[d], heads))})
        start = (start + counts[d]) % heads
    if need_cover and devices:
        missing = sorted(set(range(heads)) - {h for s in out.values() for h in s})
        for i, h in enumerate(missing):
            d = devices[i % len(devices)]
            out[d] = sorted({*out[d], h})
    return out

"""Layer-wise fine-tuning under device budgets (CAFF; Pfeiffer et al. 2024, arXiv 2411.07826).

LoRA in federated learning saves parameters but not memory or FLOPs: the
backward pass still runs through the whole network. Here each device trains
as many layer units as its budgets allow, counted from the output side
(fedcore.layers: the lm_head, then decoder blocks from the last, then
encoder blocks, the shared embedding last), so the backward pass stops at
the earliest trained unit and everything before it runs without autograd.
The server plans each device's units from its memory budget (fedcore.memory:
weights, gradients, AdamW state, saved activations at the round's batch and
lengths), its FLOP budget (fedcore.flops.partial_training_flops, times the
round's steps) and its upload budget (the units' wire bytes), and averages
each tensor over the devices that trained it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedcore.flops import partial_training_flops
from fedcore.layers import Unit, layer_units, trained_names
from fedcore.memory import training_memory

from .partial import DeviceBudget, PartialMethod, Plan, PlanContext


@dataclass(frozen=True)
class LayerWise(PartialMethod):
    name: ClassVar[str] = "layerwise"
    summary_note: ClassVar[str] = " (each device its output-side layers)"

    def describe(self) -> str:
        return "layer-wise fine-tuning (CAFF)"

    def plan(self, devices: Sequence[DeviceBudget], ctx: PlanContext) -> dict[str, Plan]:
        sh = ctx.shape
        units = layer_units(list(ctx.state), sh.num_layers, sh.num_decoder_layers)
        return {d.device_id: self.device_plan(d, ctx, units) for d in devices}

    def device_plan(self, d: DeviceBudget, ctx: PlanContext, units: list[Unit]) -> Plan:
        """The most units (at least one) whose memory, FLOPs and upload fit the device's budgets."""
        numel = ctx.numel()
        best, why_not = 0, ""
        for k in range(1, len(units) + 1):
            names = trained_names(units, k)
            mem = training_memory(ctx.shape, numel, names, d.batch_size, d.input_tokens, d.target_tokens).total
            dec = sum(1 for u in units[:k] if u.name.startswith("decoder.block."))
            enc = sum(1 for u in units[:k] if u.name.startswith("encoder.block."))
            flops = partial_training_flops(ctx.shape, d.input_tokens, d.target_tokens, dec, enc)
            up = ctx.upload_bytes({n: ctx.state[n] for n in names})
            why_not = d.fits(mem, flops, up)
            if why_not:
                break
            best = k
        if best == len(units):
            note = f"all {len(units)} units fit its budgets"
        elif best == 0:
            best = 1
            note = f"no unit fits its budgets ({why_not}); training the first ({units[0].name}) anyway"
        else:
            note = f"{best} of {len(units)} units, down to {units[best - 1].name} ({units[best].name}: {why_not})"
        return Plan.whole(trained_names(units, best), note)

"""FedSPZO (Ahmed, Pfeiffer et al., arXiv 2502.10239): split-perturbation zero-order steps.

The model is two blocks: the first (for a T5 the encoder with the shared
embedding) takes P1 directions a step, the second (the decoder and lm_head)
P2. The second block's directions are all scored on one forward pass of the
first block: its activations are computed once and reused for the 2 x P2
passes through the second block alone, so more directions cost a fraction
of a full forward each. Seeds are fresh per direction, as in MeZO; each
pair names its block, and a block's direction moves only that block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from fedcore import directions
from fedcore.batching import Batch

from .zeroorder import (FIRST, SECOND, Estimator, StepCost, ZeroOrderMethod, in_block, t5_loss)


class SplitPerturbation(Estimator):
    def step(self, model: torch.nn.Module, params: list[tuple[str, torch.Tensor]], batch: Batch,
             sync: Callable[[], None]) -> tuple[float, StepCost]:
        s, cost = self.spec, StepCost()
        eps, lr, p1, p2 = s.eps, s.learning_rate, s.perturbations, s.second_perturbations
        first = [(n, t) for n, t in params if in_block(n, FIRST, s.second_block)]
        second = [(n, t) for n, t in params if in_block(n, SECOND, s.second_block)]
        losses: list[float] = []
        found: list[tuple[int, int, float, list[tuple[str, torch.Tensor]]]] = []
        # The first block's directions: a full forward pass at each side.
        for j in range(p1):
            seed = self.fresh_seed(FIRST, j)
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(first, seed, eps))
            plus = self.timed(cost, "forward_s", sync, lambda: t5_loss(model, batch))
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(first, seed, -2 * eps))
            minus = self.timed(cost, "forward_s", sync, lambda: t5_loss(model, batch))
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(first, seed, eps))
            found.append((FIRST, seed, (plus - minus) / (2 * eps) / p1, first))
            losses += [plus, minus]
        # The second block's directions, all on one pass of the first block.
        encoded = self.timed(cost, "forward_s", sync, lambda: encode(model, batch))
        for j in range(p2):
            seed = self.fresh_seed(SECOND, j)
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(second, seed, eps))
            plus = self.timed(cost, "forward_s", sync, lambda: t5_loss(model, batch, encoded))
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(second, seed, -2 * eps))
            minus = self.timed(cost, "forward_s", sync, lambda: t5_loss(model, batch, encoded))
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(second, seed, eps))
            found.append((SECOND, seed, (plus - minus) / (2 * eps) / p2, second))
            losses += [plus, minus]
        for block, seed, g, tensors in found:
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(tensors, seed, -lr * g))
            self.note(block, seed, g)
        self.end_step(params, cost, sync)
        cost.first_forwards = 2 * p1 + 1
        cost.second_forwards = 2 * p1 + 2 * p2
        return sum(losses) / len(losses), cost


def encode(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The encoder's last hidden state for `batch` (the first block's activations)."""
    return model.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


@dataclass(frozen=True)
class FedSPZO(ZeroOrderMethod):
    name: ClassVar[str] = "fedspzo"
    blocks_allowed: ClassVar[tuple[int, ...]] = (FIRST, SECOND)

    def describe(self) -> str:
        s = self.spec
        return (f"FedSPZO lr {s.learning_rate:g} eps {s.eps:g}, P1 {s.perturbations} / P2 "
                f"{s.second_perturbations} (second block {','.join(s.second_block)})")

    def validate(self) -> None:
        super().validate()
        if not self.spec.second_block:
            raise ValueError("fedspzo needs a second block: zo_second_block (e.g. decoder.,lm_head.)")

    def directions_per_step(self) -> int:
        return self.spec.perturbations + self.spec.second_perturbations

    def estimator(self, task_seed: int) -> Estimator:
        return SplitPerturbation(self, task_seed)

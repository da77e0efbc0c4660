"""MeZO (Malladi et al. 2023) as a federated method: a fresh seed for every direction of every step.

Each device uploads one (seed, projected gradient) pair per direction it
took; the round's steps are all of them, weighted by the devices' samples,
so a round of D devices with tau steps replays D x tau directions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .zeroorder import Estimator, TwoPointEstimator, ZeroOrderMethod


class FreshSeeds(TwoPointEstimator):
    def key(self, j: int) -> int:
        return self.fresh_seed(j)


@dataclass(frozen=True)
class MeZO(ZeroOrderMethod):
    name: ClassVar[str] = "mezo"

    def describe(self) -> str:
        s = self.spec
        return f"MeZO lr {s.learning_rate:g} eps {s.eps:g}, {s.perturbations} direction(s) a step"

    def estimator(self, task_seed: int) -> Estimator:
        return FreshSeeds(self, task_seed)

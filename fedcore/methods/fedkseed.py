"""FedKSeed (Qin et al., ICML 2024): MeZO steps whose seeds come from a pool of K shared by the run.

Every direction is one of K seeds derived from the run's pool seed, so a
device uploads at most K (pool index, summed projected gradient) pairs and
a round's steps are at most K pairs however many devices and local steps
took part: a device far behind replays at most K directions per round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import UpdateInvalid
from .zeroorder import Estimator, SeedPairs, TwoPointEstimator, ZeroOrderMethod, derive_seed

#: the paper's pool size for its billion-parameter runs
DEFAULT_POOL = 4096


class PoolSeeds(TwoPointEstimator):
    def key(self, j: int) -> int:
        return self.rng.randrange(self.spec.pool_size)


@dataclass(frozen=True)
class FedKSeed(ZeroOrderMethod):
    name: ClassVar[str] = "fedkseed"

    def describe(self) -> str:
        s = self.spec
        return (f"FedKSeed K {s.pool_size} (pool seed {s.pool_seed}) lr {s.learning_rate:g} eps {s.eps:g}, "
                f"{s.perturbations} direction(s) a step")

    def validate(self) -> None:
        super().validate()
        if self.spec.pool_size <= 0:
            raise ValueError("fedkseed needs a seed pool: zo_pool_size > 0 (the paper uses 4096)")

    def direction_seed(self, key: int) -> int:
        return derive_seed("fedkseed-pool", self.spec.pool_seed, key)

    def check_pairs(self, pairs: SeedPairs, max_steps: int) -> None:
        super().check_pairs(pairs, max_steps)
        bad = next((s for s in pairs.seeds if s >= self.spec.pool_size), None)
        if bad is not None:
            raise UpdateInvalid(f"seed index {bad} is outside the pool of {self.spec.pool_size}")

    def estimator(self, task_seed: int) -> Estimator:
        return PoolSeeds(self, task_seed)

"""FedKSeed (Qin et al., ICML 2024): MeZO steps whose seeds come from a pool of K shared by the run.

Every direction is one of K seeds derived from the run's pool seed, so a
device uploads at most K (pool index, summed projected gradient) pairs and
a round's steps are at most K pairs however many devices and local steps
took part: a device far behind replays at most K directions per round.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .base import UpdateInvalid
from .zeroorder import Estimator, SeedPairs, TwoPointEstimator, ZeroOrderMethod, ZeroOrderSpec, derive_seed

#: the paper's pool size for its billion-parameter runs
DEFAULT_POOL = 4096
#: FedKSeed-Pro clips each projected gradient to this magnitude before scoring seeds (the reference code's)
PRO_CLIP = 1000.0


class PoolSeeds(TwoPointEstimator):
    def __init__(self, method: ZeroOrderMethod, task_seed: int) -> None:
        super().__init__(method, task_seed)
        # FedKSeed-Pro: probabilities exp(score) (a softmax of the min-max normalised scores), else uniform.
        w = method.spec.seed_weights
        self.weights = [math.exp(b / 255) for b in w] if w else None
        self.population = range(method.spec.pool_size)

    def key(self, j: int) -> int:
        if self.weights is None:
            return self.rng.randrange(self.spec.pool_size)
        return self.rng.choices(self.population, weights=self.weights)[0]


def seed_scores(spec: ZeroOrderSpec, history: Sequence[SeedPairs], direction_seed) -> bytes:
    """FedKSeed-Pro's scores, one byte a pool seed: the mean |projected gradient| (clipped) of the seed over
    the rounds that used it, min-max normalised to 0..255; a seed never used scores 0.

    The reference code scores the devices' own gradients; the server here
    keeps the rounds' means (what it replays), which is what it has after a
    restart too.
    """
    index = {direction_seed(i): i for i in range(spec.pool_size)}
    total = [0.0] * spec.pool_size
    count = [0] * spec.pool_size
    for pairs in history:
        for seed, value in zip(pairs.seeds, pairs.values):
            i = index.get(seed)
            if i is not None:
                total[i] += min(abs(value) / spec.learning_rate, PRO_CLIP)
                count[i] += 1
    score = [t / c if c else 0.0 for t, c in zip(total, count)]
    lo, hi = min(score), max(score)
    if hi <= lo:
        return bytes(spec.pool_size)
    return bytes(round(255 * (v - lo) / (hi - lo)) for v in score)


@dataclass(frozen=True)
class FedKSeed(ZeroOrderMethod):
    name: ClassVar[str] = "fedkseed"

    def describe(self) -> str:
        s = self.spec
        return (f"FedKSeed{'-Pro' if s.weighted_seeds else ''} K {s.pool_size} (pool seed {s.pool_seed}) "
                f"lr {s.learning_rate:g} eps {s.eps:g}, {s.perturbations} direction(s) a step")

    def round_settings(self, history: Sequence[SeedPairs]) -> FedKSeed:
        if not self.spec.weighted_seeds:
            return self
        return FedKSeed(dataclasses.replace(self.spec, seed_weights=seed_scores(self.spec, history,
                                                                                  self.direction_seed)))

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

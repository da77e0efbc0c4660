"""The steps between global versions: recent broadcast deltas (delta downloads) and every round's seeds
(zero-order replay)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from fedcore.methods.zeroorder import SeedPairs
from fedcore.wire import FrozenStream


@dataclass(frozen=True)
class DeltaStep:
    base: str    # version the delta applies to
    target: str  # version it produces
    stream: FrozenStream


class DeltaHistory:
    """The last `keep` version-to-version deltas, oldest first.

    Memory is `keep` encoded deltas (for int8 a quarter of the fp32 model
    each); a device further behind than that gets the full model.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.steps: list[DeltaStep] = []

    def add(self, step: DeltaStep) -> None:
        if self.steps and self.steps[-1].target != step.base:
            self.steps.clear()  # the chain broke (e.g. a resumed server): older deltas lead nowhere now
        self.steps.append(step)
        del self.steps[:-self.keep]

    def chain(self, base: str, target: str) -> list[DeltaStep] | None:
        """The deltas that take `base` to `target`, in order; None when base is not a kept version."""
        out: list[DeltaStep] = []
        cur = target
        for step in reversed(self.steps):
            if cur == base:
                break
            if step.target != cur:
                return None
            out.append(step)
            cur = step.base
        return out[::-1] if cur == base else None


@dataclass(frozen=True)
class SeedStep:
    round: int
    base: str
    target: str
    pairs: SeedPairs  # direction seeds and the fp32 steps the server added


SEED_PREFIX = "server_zo/"


class SeedHistory:
    """Every zero-order round's steps since the run began, oldest first.

    A round costs a few KB (12 bytes a direction), so all of them are kept
    and checkpointed: a device any number of rounds behind, also after a
    server restart, replays instead of downloading the model.
    """

    def __init__(self) -> None:
        self.steps: list[SeedStep] = []

    def add(self, step: SeedStep) -> None:
        if self.steps and self.steps[-1].target != step.base:
            raise ValueError(f"seed history broken: round {step.round} starts from {step.base[:19]}..., the last "
                             f"round ended on {self.steps[-1].target[:19]}...")
        self.steps.append(step)

    def chain(self, base: str, target: str) -> list[SeedStep] | None:
        """The rounds that take `base` to `target`, in order; None when base is not a version of the history."""
        for i, step in enumerate(self.steps):
            if step.base == base:
                chain = self.steps[i:]
                return chain if chain[-1].target == target else None
        return None

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], str]:
        """(tensors under SEED_PREFIX, the JSON of the rounds' versions and sizes) for the checkpoint."""
        everything = SeedPairs()
        for st in self.steps:
            everything.seeds += st.pairs.seeds
            everything.values += st.pairs.values
            everything.blocks += st.pairs.blocks
        tensors = {SEED_PREFIX + k: v for k, v in everything.to_tensors().items()}
        index = [[st.round, st.base, st.target, len(st.pairs.seeds), st.pairs.scale] for st in self.steps]
        return tensors, json.dumps(index)

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], index_json: str) -> SeedHistory:
        """The history a checkpoint kept; ValueError when its parts do not fit together."""
        hist = cls()
        index = json.loads(index_json)
        if not index:
            return hist
        everything = SeedPairs.from_tensors({k[len(SEED_PREFIX):]: v for k, v in tensors.items()})
        at = 0
        for rnd, base, target, n, scale in index:
            hist.add(SeedStep(int(rnd), base, target, SeedPairs(everything.seeds[at:at + n],
                                                                  everything.values[at:at + n],
                                                                  everything.blocks[at:at + n], scale=float(scale))))
            at += n
        if at != len(everything.seeds):
            raise ValueError(f"the seed history holds {len(everything.seeds)} directions, its index {at}")
        return hist

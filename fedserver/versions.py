"""Broadcast deltas between recent global versions, bounded, for delta downloads."""
from __future__ import annotations

from dataclasses import dataclass

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

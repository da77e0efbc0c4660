"""Full fine-tuning: every weight trains with AdamW; the update is the weights or their delta.

How the update travels (weights or a delta, quantized with error feedback,
compressed) is the wire's business (fedcore.wire), set per task; to this
method every tensor of the model is trainable and the server averages
every tensor's delta. A device holding an earlier version reaches the new
one by the broadcast deltas the server keeps, or by the full model.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import FULL_DESCRIPTION, Method, Trainee, canonical_update


class FullTrainee(Trainee):
    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def update_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        return canonical_update(self.model.state_dict())

    def describe(self) -> str:
        return f"full fine-tuning: {sum(p.numel() for p in self.model.parameters()):,} parameters train"


@dataclass(frozen=True)
class FullFineTuning(Method):
    name: ClassVar[str] = "full"

    def describe(self) -> str:
        return FULL_DESCRIPTION

    def bind(self, model: torch.nn.Module) -> Trainee:
        for p in model.parameters():
            p.requires_grad_(True)
        return FullTrainee(self, model)

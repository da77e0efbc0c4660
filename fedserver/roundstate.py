"""What a round is made of: the assignments of its sampled devices and the round's own state.

Plain data, shared by the round loop and its parts (upload intake, work
planning, round records); the errors they raise for the service to map to
gRPC status codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.methods.partial import Plan
from fedcore.methods.zeroorder import SeedPairs
from fedtune.v1 import fedtune_pb2 as pb

from .strategy import RunningMean, SeedMean


class RoundError(Exception):
    """A request the round cannot take; `code` names the kind for the service."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "not_found", "precondition", "permission", "exhausted", "invalid", "aborted", "unavailable"


class UpdateRefused(RoundError):
    """The update failed validation; it is recorded in the round log and never aggregated."""


@dataclass
class Assignment:
    device_id: str
    task_id: str
    num_samples: int = 0  # the update's FedAvg weight: its claim, bounded by the work its task allowed
    registered_samples: int = 0  # what the device registered at Join when it was sampled
    claimed_samples: int = 0  # what its upload header said
    weight_cut: str = ""  # why num_samples is below the claim ("" when it is not)
    status: str = "sampled"  # sampled -> uploading -> aggregated (verified, staged on disk) | late | refused
    metrics: dict[str, Any] | None = None
    reason: str = ""  # why the update was refused
    bytes_in: int = 0  # wire bytes and chunks received for this task, every attempt counted
    chunks_in: int = 0
    clip_scale: float = 1.0  # applied to the update's delta when it is folded (clip_update_norm)
    local_steps: int = 0  # what the round policy asked of this device
    local_samples: int = 0
    expected_s: float | None = None  # the policy's estimate of download + compute + upload
    staged: Path | None = None  # the verified update, on disk until the round folds it
    manifest: pb.Manifest | None = None
    seeds: SeedPairs | None = None  # a zero-order update (a few KB), held in memory until the round folds it
    done_at: float | None = None  # monotonic time the update was complete
    upload_encoding: str = ""  # chosen for this device this round (link-aware encodings), "" the default
    encoding_reason: str = ""
    plan: Plan | None = None  # what this device trains and uploads this round (methods with plans)
    plan_params: int = 0  # elements its plan trains

    @property
    def settled(self) -> bool:
        return self.status in ("aggregated", "late", "refused")


@dataclass
class RoundState:
    number: int
    attempt: int
    version: str
    started: float
    deadline: float
    assignments: dict[str, Assignment]
    mean: RunningMean | SeedMean
    closed: bool = False
    collected_at: float | None = None  # when the last update arrived or the deadline passed

    @property
    def aggregated(self) -> list[Assignment]:
        return [a for a in self.assignments.values() if a.status == "aggregated"]

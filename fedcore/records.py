"""The round records' schema, said once: a device's round (a line of rounds.jsonl) and a round's summary.

The server writes them (fedserver.roundlog); the metrics exporter, `fedserver
status` and the hardware report read them. ``to_json()`` writes exactly the
keys and values rounds.jsonl and summary.json have always held: a field left
at ``ABSENT`` is omitted, a ``None`` is written as null (an unknown figure is
null, never 0). ``from_json()`` reads old and new lines; keys this schema
does not name are kept in ``more`` and written back, so nothing read is lost.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, TypeVar

from fedcore.efficiency import NUMERIC_KEYS


class Absent(enum.Enum):
    """A key the record does not hold (not the same as null)."""

    ABSENT = "absent"

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:  # `if rec.note:` reads as "holds a note"
        return False


ABSENT = Absent.ABSENT

R = TypeVar("R", bound="_Record")


def known(v: Any) -> Any:
    """The value, or None when the record does not hold it (ABSENT) or holds null."""
    return None if v is ABSENT else v


def device_figure(record: Mapping[str, Any], key: str) -> float | None:
    """A figure from a device's round record (or its metrics) or their `extra` map; None when absent, null or
    not a finite number."""
    for source in (record, record.get("extra") or {}):
        v = source.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


@dataclass
class _Record:
    """Fields in their JSON order; the `more` field's keys are written where it stands."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "more":
                out.update(v)
            elif v is not ABSENT:
                out[f.name] = v
        return out

    @classmethod
    def from_json(cls: type[R], d: Mapping[str, Any]) -> R:
        """The record a JSON object holds: a key it lacks is ABSENT, a key the schema does not name goes to more."""
        names = {f.name for f in fields(cls)} - {"more"}
        return cls(**{k: v for k, v in d.items() if k in names},  # type: ignore[arg-type]
                   more={k: v for k, v in d.items() if k not in names})

    def has(self, name: str) -> bool:
        return getattr(self, name) is not ABSENT


# The hardware figures a device reports in `extra` (fedcore.efficiency) and its record carries
# (tokens_per_s is computed by the server from tokens and t_comp_s; the rest only the device can know).
HARDWARE_KEYS = tuple(k for k in NUMERIC_KEYS if k != "tokens_per_s")

# Device metrics copied into its record as they arrived, when they arrived.
DEVICE_METRIC_KEYS = ("t_comp_s", "t_down_s", "t_up_s", "t_wait_s", "bytes_down", "bytes_up", "tokens",
                      "train_loss", "download_cached", "step_times", "extra")


@dataclass
class DeviceRound(_Record):
    """One device's part in one attempt of a round: a line of rounds.jsonl."""

    round: int | Absent = ABSENT
    attempt: int | Absent = ABSENT
    client: str | Absent = ABSENT
    status: str | Absent = ABSENT  # aggregated | refused | missing
    num_samples: int | Absent = ABSENT  # the update's FedAvg weight
    num_samples_claimed: int | Absent = ABSENT
    weight_cut: str | Absent = ABSENT  # why num_samples is below the claim (omitted when it is not)
    reason: str | Absent = ABSENT  # why the update was refused
    upload_encoding: str | Absent = ABSENT  # link-aware choice (omitted: the configured one)
    encoding_reason: str | Absent = ABSENT
    plan: str | Absent = ABSENT  # methods with plans: what the device trained, and why the planner chose it
    trained_params: int | Absent = ABSENT  # elements of the tensors (or heads' slices) its plan trained
    # What the device reported (DEVICE_METRIC_KEYS), present when its metrics held them.
    t_comp_s: float | Absent = ABSENT
    t_down_s: float | Absent = ABSENT
    t_up_s: float | None | Absent = ABSENT  # null: the device's upload figures were lost (see note)
    t_wait_s: float | None | Absent = ABSENT
    bytes_down: int | Absent = ABSENT
    bytes_up: int | Absent = ABSENT
    tokens: int | Absent = ABSENT
    train_loss: float | Absent = ABSENT
    download_cached: bool | Absent = ABSENT
    step_times: dict[str, float] | Absent = ABSENT  # per-phase seconds and "steps"
    extra: dict[str, Any] | Absent = ABSENT
    note: str | Absent = ABSENT  # why the device's upload figures are unusable
    # Derived from the device's figures, present when it reported t_comp_s; null when unknown.
    t_comm_s: float | None | Absent = ABSENT
    tokens_per_s: float | Absent = ABSENT
    g: float | None | Absent = ABSENT
    flops_per_token: float | None | Absent = ABSENT
    peak_flops: float | None | Absent = ABSENT
    mfu: float | None | Absent = ABSENT
    power_w: float | None | Absent = ABSENT
    energy_j: float | None | Absent = ABSENT
    eta_e: float | None | Absent = ABSENT
    power_source: str | None | Absent = ABSENT
    hardware: str | None | Absent = ABSENT
    # The work planned for it and when its update was complete (server clock).
    policy: str | Absent = ABSENT
    local_steps_assigned: int | Absent = ABSENT
    local_samples_assigned: int | Absent = ABSENT
    expected_s: float | None | Absent = ABSENT
    idle_ratio: float | None | Absent = ABSENT  # waiting for the slowest device, share of the round's wall time
    done_s: float | None | Absent = ABSENT
    bytes_resent_down: int | Absent = ABSENT
    bytes_resent_up: int | Absent = ABSENT
    bytes_resent: int | Absent = ABSENT
    compute_slowdown_emulated: float | Absent = ABSENT
    more: dict[str, Any] = field(default_factory=dict)  # keys this schema does not name

    @property
    def aggregated(self) -> bool:
        return self.status == "aggregated"

    @property
    def measured(self) -> bool:
        """The device reported its round's figures (its record has t_comp_s and what derives from it)."""
        return self.t_comp_s is not ABSENT

    def figure(self, key: str) -> float | None:
        """A device figure from the record or its `extra` map; None when absent, null or not a finite number."""
        return device_figure(self.to_json(), key)

    def extra_value(self, key: str, default: Any = None) -> Any:
        return (known(self.extra) or {}).get(key, default)


assert set(NUMERIC_KEYS) <= {f.name for f in fields(DeviceRound)}, "fedcore.efficiency names a figure DeviceRound lacks"


@dataclass
class RoundSummary(_Record):
    """One round in summary.json (round 0: the initial model's evaluation, with only round, participants,
    version and the evaluation)."""

    round: int | Absent = ABSENT
    participants: list[str] = field(default_factory=list)  # the devices whose updates were aggregated
    sampled: int | Absent = ABSENT
    t_comp_s: float | Absent = ABSENT  # the slowest device's
    t_comm_s: float | None | Absent = ABSENT  # over devices whose figures are known; null when none is
    g: float | None | Absent = ABSENT
    figures_unknown: list[str] | Absent = ABSENT
    t_down_s: float | Absent = ABSENT
    t_up_s: float | None | Absent = ABSENT
    bytes_down: int | Absent = ABSENT
    bytes_up: int | Absent = ABSENT
    tokens: int | Absent = ABSENT
    train_loss: float | Absent = ABSENT
    wall_s: float | Absent = ABSENT  # dispatch to the last update (or the deadline)
    policy: str | Absent = ABSENT
    idle_ratio_mean: float | None | Absent = ABSENT
    bytes_resent: int | Absent = ABSENT
    aggregate_s: float | Absent = ABSENT
    version: str | Absent = ABSENT  # the global model's digest after the round
    strategy: str | Absent = ABSENT
    download: str | Absent = ABSENT
    upload: str | Absent = ABSENT
    more: dict[str, Any] = field(default_factory=dict)  # the method's keys (and any this schema does not name)
    eval_loss: float | Absent = ABSENT
    rouge1: float | Absent = ABSENT
    rouge2: float | Absent = ABSENT
    rougeL: float | Absent = ABSENT  # noqa: N815 (the JSON key)
    eval_n: int | Absent = ABSENT

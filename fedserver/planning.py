"""Work planning for a round: the work each sampled device gets, the round's deadline, its upload encoding.

Round policies (plan_work): the same local steps, the same samples, or the
same expected time on every device, from the estimates the server keeps of
each device's link rates and step time; the deadline (round_deadline) from
the configuration or a multiple of the slowest expected time.

Link-aware upload encoding (choose_upload_encoding): devices report the
rates they measured on their last transfers; the server predicts the next
round's communication time per candidate encoding and takes the most precise
one that meets the target G = T_comp / T_comm (or fits the per-round byte
budget). Before any measurement the configured encoding
is used. The choice and its reason are logged and written to rounds.jsonl.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .config import ServerConfig
from .roundstate import Assignment

log = logging.getLogger("fedserver.planning")


@dataclass(frozen=True)
class LinkEstimate:
    down_bps: float  # bytes per second the device measured downloading
    up_bps: float    # ... uploading
    t_comp_s: float  # its last local fine-tuning time


@dataclass(frozen=True)
class Choice:
    encoding: str
    reason: str
    predicted_g: float | None = None
    predicted_up_bytes: int | None = None


def choose_upload_encoding(candidates: Sequence[str], default: str, up_bytes: Callable[[str], int],
                           down_bytes: int, link: LinkEstimate | None, target_g: float, byte_budget: int,
                           t_comp_s: float = 0.0) -> Choice:
    """The first (most precise) candidate that meets the target; the last one when none does."""
    if link is None or link.up_bps <= 0:
        return Choice(default, "no link measurement yet: configured upload_encoding")
    t_comp = t_comp_s if t_comp_s > 0 else link.t_comp_s
    t_down = down_bytes / link.down_bps if link.down_bps > 0 else 0.0
    last = Choice(default, "")
    for enc in candidates:
        ub = up_bytes(enc)
        t_comm = t_down + ub / link.up_bps
        g = t_comp / t_comm if t_comm > 0 else float("inf")
        rates = (f"up {8 * link.up_bps / 1e6:.2f} Mbit/s, down {8 * link.down_bps / 1e6:.2f} Mbit/s, "
                 f"T_comp {t_comp:.1f} s")
        if byte_budget > 0:
            ok = ub <= byte_budget
            why = f"{ub / 1e6:.1f} MB up {'within' if ok else 'over'} the budget of {byte_budget / 1e6:.1f} MB"
        else:
            ok = g >= target_g
            why = (f"predicted G {g:.3f} {'>=' if ok else '<'} target {target_g:g} "
                   f"(T_comm {t_comm:.1f} s: {down_bytes / 1e6:.1f} MB down, {ub / 1e6:.1f} MB up; {rates})")
        last = Choice(enc, why, g, ub)
        if ok:
            return last
    return Choice(last.encoding, "no encoding meets the target, taking the smallest: " + last.reason,
                  last.predicted_g, last.predicted_up_bytes)


def choose_encodings(cfg: ServerConfig, number: int, assignments: Mapping[str, Assignment],
                     links: Mapping[str, LinkEstimate], down_bytes: Callable[[str], int],
                     up_bytes: Callable[[str], int]) -> None:
    """Set each assignment's upload encoding for round `number` (and why, when link-aware).

    down_bytes(device): what its next download will carry; up_bytes(encoding):
    what an update in that encoding will carry. Without link_aware every device
    uploads the configured encoding.
    """
    for a in assignments.values():
        if not cfg.link_aware:
            a.upload_encoding = cfg.upload_encoding
            continue
        choice = choose_upload_encoding(cfg.link_encoding_list, cfg.upload_encoding, up_bytes,
                                        down_bytes(a.device_id), links.get(a.device_id), cfg.link_target_g,
                                        cfg.link_byte_budget, cfg.link_t_comp_s)
        a.upload_encoding, a.encoding_reason = choice.encoding, choice.reason
        log.info("round %d: %s uploads %s: %s", number, a.device_id, choice.encoding, choice.reason)


def plan_round(cfg: ServerConfig, assignments: Mapping[str, Assignment],
               estimates: Mapping[str, Mapping[str, float]]) -> float:
    """Give each assignment its work under cfg.round_policy; the round's deadline in seconds from now."""
    for d, (steps, samples, expected) in plan_work(cfg, {d: estimates[d] for d in assignments}).items():
        a = assignments[d]
        a.local_steps, a.local_samples, a.expected_s = steps, samples, expected
    return round_deadline(cfg, [a.expected_s for a in assignments.values()])


def expected_seconds(e: Mapping[str, float], steps: int, batch_ratio: float = 1.0) -> float | None:
    """Download + compute + upload seconds for `steps` steps, from a device's estimates (None: not measured)."""
    need = ("down_Bps", "up_Bps", "step_s", "bytes_down", "bytes_up")
    if not all(e.get(k) for k in need[:3]) or not all(k in e for k in need):
        return None
    return (e["bytes_down"] / e["down_Bps"] + e["bytes_up"] / e["up_Bps"] + e.get("overhead_s", 0.0)
            + steps * e["step_s"] * batch_ratio)


def plan_work(cfg: ServerConfig, estimates: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[int, int, float | None]]:
    """Per device: (local_steps, local_samples, expected seconds) under cfg.round_policy.

    steps: every device runs local_steps (0: local_epochs). samples: every
    device processes the same number of samples; a device with a smaller
    batch takes more steps. time: steps chosen per device so that download +
    compute + upload take the same time on all (Szablewski, Sani, Lane's
    minimal-idle policy); until every sampled device has been measured once
    it falls back to local_steps.
    """
    steps = cfg.local_steps
    if cfg.round_policy == "samples":
        samples = cfg.local_samples or cfg.local_steps * cfg.batch_size
        return {d: (0, samples, None) for d in estimates}
    base = {d: expected_seconds(e, steps) for d, e in estimates.items()}
    if cfg.round_policy == "steps" or any(v is None for v in base.values()) or steps <= 0:
        return {d: (steps, 0, base[d]) for d in estimates}
    budget = cfg.time_budget_s or sum(base.values()) / len(base)  # type: ignore[arg-type]
    plan: dict[str, tuple[int, int, float | None]] = {}
    for d, e in estimates.items():
        fixed = expected_seconds(e, 0) or 0.0
        n = max(1, int((budget - fixed) / e["step_s"]))
        plan[d] = (n, 0, expected_seconds(e, n))
    return plan


def round_deadline(cfg: ServerConfig, expected: list[float | None]) -> float:
    """cfg.round_deadline_s, or with deadline_from_estimates a multiple of the slowest expected time."""
    if not cfg.deadline_from_estimates or not expected or any(x is None for x in expected):
        return cfg.round_deadline_s
    return min(cfg.round_deadline_s, max(cfg.deadline_floor_s, cfg.deadline_safety * max(expected)))  # type: ignore

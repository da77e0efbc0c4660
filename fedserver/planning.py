"""Link-aware upload encoding: pick each device's encoding from its measured link rates.

Devices report the rates they measured on their last transfers; the server
predicts the next round's communication time per candidate encoding and
takes the most precise one that meets the target G = T_comp / T_comm (or fits
the per-round byte budget). Before any measurement the configured encoding
is used. The choice and its reason are logged and written to rounds.jsonl.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


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

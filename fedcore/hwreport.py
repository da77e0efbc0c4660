"""Per-device hardware efficiency from rounds.jsonl records, next to the study's A100 and Orin figures.

``efficiency_lines(records, preset, batch_size)`` returns printable lines;
`netem report` and `fedserver simulate` print them, and any other report
can (it needs only the records).
"""
from __future__ import annotations

from statistics import mean
from typing import Any, Iterable, Mapping

from fedcore import study
from fedcore.efficiency import NUMERIC_KEYS
from fedcore.flops import T5Shape, training_flops
from fedcore.records import DeviceRound, known


def _mean(values: Iterable[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return mean(known) if known else None


def _f(v: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def device_rows(records: Iterable[Mapping[str, Any] | DeviceRound], by: str = "client") -> list[dict[str, Any]]:
    """One row per device (``by="client"``) or per kind of hardware (``by="hardware"``): means over the
    aggregated rounds; unknown figures stay None."""
    groups: dict[str, list[DeviceRound]] = {}
    for r in (r if isinstance(r, DeviceRound) else DeviceRound.from_json(r) for r in records):
        if r.aggregated and r.measured:
            groups.setdefault(str(known(getattr(r, by))), []).append(r)
    rows = []
    for key, recs in sorted(groups.items()):
        devices = sorted({str(known(r.client)) for r in recs})
        rows.append({
            "device": devices[0] if len(devices) == 1 else f"{len(devices)} devices",
            "hardware": next((r.hardware for r in recs if r.hardware), None),
            "rounds": len(recs),
            **{k: _mean(known(getattr(r, k)) for r in recs) for k in NUMERIC_KEYS},
            "power_source": next((r.power_source for r in recs if r.power_source), None),
        })
    return rows


def efficiency_lines(records: Iterable[Mapping[str, Any] | DeviceRound], preset: str | None = None,
                     batch_size: int | None = None, by: str = "client") -> list[str]:
    """The per-device (or per-hardware) table and the study's figures for ``preset`` at ``batch_size``."""
    rows = device_rows(records, by)
    if not rows:
        return []
    head = (f"{'device':<10} {'hardware':<22} {'rounds':>6} {'tokens/s':>9} {'FLOPs/token':>11} {'peak TFLOP/s':>12} "
            f"{'MFU %':>6} {'power W':>8} {'J/round':>8} {'ηe tok/s/W':>10}  power source")
    per = "device" if by == "client" else by
    lines = [f"Hardware efficiency per {per} (mean over aggregated device rounds; '-' = unknown)", head,
             "-" * len(head)]
    for r in rows:
        lines.append(f"{r['device']:<10.10} {(r['hardware'] or '-'):<22.22} {r['rounds']:>6} "
                     f"{_f(r['tokens_per_s'], '.1f'):>9} {_f(r['flops_per_token'], '.3g'):>11} "
                     f"{_f(r['peak_flops'], '.3g', 1e-12):>12} {_f(r['mfu'], '.3f', 100):>6} "
                     f"{_f(r['power_w'], '.2f'):>8} {_f(r['energy_j'], '.0f'):>8} {_f(r['eta_e'], '.2f'):>10}  "
                     f"{r['power_source'] or 'unknown'}")
    lines += study_lines(preset, batch_size)
    return lines


def study_lines(preset: str | None, batch_size: int | None) -> list[str]:
    """The study's A100 and Orin figures for this preset and minibatch, where it published them."""
    if preset is None or batch_size is None:
        return []
    found = [(dev, study.row(preset, batch_size, dev)) for dev in ("A100", "Orin")]
    if all(s is None for _, s in found):
        return [f"study (Woisetschläger et al. 2023): no published figures for {preset} at minibatch {batch_size} "
                f"(it measured small, base, large, xl at minibatch {', '.join(map(str, study.batches('small')))})"]
    lines = [f"study (Woisetschläger et al. 2023), {preset}, minibatch {batch_size}, 512 input tokens per item:"]
    per_item = None
    try:
        per_item = training_flops(T5Shape.from_preset(preset), study.SEQ_LEN, study.TARGET_LEN)
    except ValueError:
        pass
    for dev, s in found:
        if s == "oom":
            lines.append(f"  {dev:<5} out of memory")
        elif s is not None and not isinstance(s, str):
            ours = (s.tps / study.SEQ_LEN * per_item / study.PEAK_FLOPS[dev]) if per_item else None
            lines.append(f"  {dev:<5} {s.tps:9.1f} TPS, {_f(s.watts, '.2f')} W, ηe {_f(s.eta_e, '.2f')}, "
                         f"MFU {_f(s.mfu, '.1f', 100)}% (its formula; {_f(ours, '.2f', 100)}% by ours)")
    lines.append("  its TPS counts input tokens only; our tokens/s counts input + target tokens, ηe = tokens/s / W. "
                 "MFU formula: docs/explanation/hardware-efficiency.md.")
    return lines

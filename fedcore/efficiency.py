"""The per-round hardware figures a device reports, under the names rounds.jsonl uses."""
from __future__ import annotations

from typing import Any

from fedcore.flops import mfu
from fedcore.power import PowerReading, efficiency

# rounds.jsonl keys (also read by the metrics exporter and plots). Unknown -> None (null), never 0.
NUMERIC_KEYS = ("tokens_per_s", "flops_per_token", "peak_flops", "mfu", "power_w", "energy_j", "eta_e")
KEYS = NUMERIC_KEYS + ("power_source",)


def figures(tokens: int, seconds: float, model_flops: float, peak_flops: float | None,
            power: PowerReading | None) -> dict[str, Any]:
    """tokens/s, FLOPs/token, MFU (fraction), power, energy (J) and ηe = tokens/s per watt."""
    tps = tokens / seconds if seconds > 0 else 0.0
    return {
        "tokens_per_s": tps,
        "flops_per_token": model_flops / tokens if tokens else None,
        "peak_flops": peak_flops,
        "mfu": mfu(model_flops / seconds, peak_flops) if seconds > 0 else None,
        "power_w": power.mean_w if power else None,
        "energy_j": power.energy_j if power else None,
        "eta_e": efficiency(tps, power.mean_w) if power else None,
        "power_source": power.source if power else None,
    }

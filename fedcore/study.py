"""The study's published hardware figures (Woisetschläger et al. 2023, Tables 2-4), for side-by-side reports.

From /work/shared/reference/study-figures.md; cells marked (r) there were
recomputed from the other columns. None marks "out of memory".
"""
from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("A100", "Orin")
PEAK_FLOPS = {"A100": 312e12, "Orin": 42.5e12}
SEQ_LEN = 512  # input tokens per item; the study's TPS counts these
TARGET_LEN = 95


@dataclass(frozen=True)
class StudyRow:
    """One model, minibatch and device of the study; phases in seconds per step."""

    model: str
    batch: int
    device: str
    batch_loading_s: float
    forward_s: float
    loss_s: float
    backward_s: float
    optimizer_step_s: float
    total_s: float
    tps: float  # Table 4 (input tokens/s)
    watts: float | None  # Table 2
    eta_e: float | None  # Table 2
    mfu: float | None  # Table 3, as a fraction


# Table 4 phases and TPS; (model, batch, device) -> (load, fwd, loss, bwd, opt, total, TPS)
_T4 = {
    ("small", 1, "A100"): (0.01, 0.06, 0.00, 0.09, 0.16, 0.32, 1657.87),
    ("small", 1, "Orin"): (0.01, 0.09, 0.00, 0.15, 0.30, 0.55, 927.51),
    ("small", 8, "A100"): (0.01, 0.06, 0.00, 0.09, 0.16, 0.33, 13051.3),
    ("small", 8, "Orin"): (0.01, 0.10, 0.00, 0.22, 0.40, 0.73, 5665.54),
    ("small", 16, "A100"): (0.01, 0.06, 0.00, 0.09, 0.16, 0.31, 26741.79),
    ("small", 16, "Orin"): (0.01, 0.15, 0.00, 0.36, 0.63, 1.15, 7112.45),
    ("small", 32, "A100"): (0.01, 0.06, 0.00, 0.12, 0.18, 0.37, 45428.27),
    ("small", 32, "Orin"): (0.01, 0.32, 0.00, 0.66, 1.16, 2.15, 7713.02),
    ("small", 64, "A100"): (0.01, 0.06, 0.00, 0.17, 0.26, 0.51, 65944.32),
    ("small", 64, "Orin"): (0.01, 0.64, 0.00, 1.28, 2.22, 4.15, 7992.08),
    ("small", 128, "A100"): (0.02, 0.06, 0.00, 0.28, 0.46, 0.81, 82045.0),
    ("small", 128, "Orin"): (0.01, 1.21, 0.00, 2.60, 4.34, 8.15, 8046.96),
    ("base", 1, "A100"): (0.01, 0.08, 0.00, 0.14, 0.23, 0.46, 1134.51),
    ("base", 1, "Orin"): (0.01, 0.14, 0.00, 0.22, 0.45, 0.82, 631.08),
    ("base", 8, "A100"): (0.01, 0.09, 0.00, 0.14, 0.23, 0.47, 8805.38),
    ("base", 8, "Orin"): (0.01, 0.30, 0.00, 0.51, 0.95, 1.76, 2339.49),
    ("base", 16, "A100"): (0.02, 0.09, 0.00, 0.17, 0.27, 0.54, 15380.06),
    ("base", 16, "Orin"): (0.01, 0.57, 0.00, 0.93, 1.69, 3.19, 2590.44),
    ("base", 32, "A100"): (0.01, 0.10, 0.00, 0.24, 0.38, 0.74, 22427.21),
    ("base", 32, "Orin"): (0.01, 1.09, 0.00, 1.81, 3.19, 6.09, 2692.26),
    ("base", 64, "A100"): (0.01, 0.19, 0.00, 0.40, 0.65, 1.26, 26250.25),
    ("large", 1, "A100"): (0.02, 0.18, 0.00, 0.27, 0.46, 0.92, 562.2),
    ("large", 1, "Orin"): (0.01, 0.27, 0.00, 0.43, 1.03, 1.75, 298.91),
    ("large", 8, "A100"): (0.02, 0.18, 0.00, 0.29, 0.49, 0.97, 4260.38),
    ("large", 8, "Orin"): (0.01, 0.92, 0.00, 1.31, 2.62, 4.85, 850.43),
    ("large", 16, "A100"): (0.02, 0.20, 0.00, 0.40, 0.62, 1.23, 6728.79),
    ("xl", 1, "A100"): (0.02, 0.17, 0.00, 0.27, 0.48, 0.93, 560.07),
}
_OOM = {("base", 64, "Orin"), ("large", 16, "Orin"), ("xl", 1, "Orin")}

# Table 2: (model, batch, device) -> (average W, ηe)
_T2 = {
    ("small", 1, "A100"): (75.8, 21.16), ("small", 1, "Orin"): (16.7, 55.26),
    ("small", 8, "A100"): (103.17, 121.63), ("small", 8, "Orin"): (28.1, 200.75),
    ("small", 16, "A100"): (120.96, 215.03), ("small", 16, "Orin"): (35.8, 198.32),
    ("small", 32, "A100"): (171.15, 258.52), ("small", 32, "Orin"): (38.84, 196.53),
    ("small", 64, "A100"): (212.53, 304.82), ("small", 64, "Orin"): (38.82, 203.57),
    ("small", 128, "A100"): (247.72, 327.2), ("small", 128, "Orin"): (41.08, 195.73),
    ("base", 1, "A100"): (85.63, 13.0), ("base", 1, "Orin"): (24.86, 25.23),
    ("base", 8, "A100"): (135.57, 63.77), ("base", 8, "Orin"): (31.3, 74.21),
    ("base", 16, "A100"): (159.09, 94.55), ("base", 16, "Orin"): (38.59, 66.51),
    ("base", 32, "A100"): (223.55, 99.28), ("base", 32, "Orin"): (38.54, 69.84),
    ("base", 64, "A100"): (260.68, 100.08),
    ("large", 1, "A100"): (91.61, 6.06), ("large", 1, "Orin"): (26.1, 11.24),
    ("large", 8, "A100"): (173.43, 24.24), ("large", 8, "Orin"): (41.46, 20.36),
    ("large", 16, "A100"): (196.9, 33.76),
    ("xl", 1, "A100"): (128.21, 4.31),
}

# Table 3: MFU in percent, (model, batch) -> (A100, Orin)
_T3 = {
    ("small", 1): (0.3, 1.1), ("small", 8): (2.0, 6.5), ("small", 16): (4.2, 8.1), ("small", 32): (7.1, 8.8),
    ("small", 64): (10.3, 9.2), ("small", 128): (12.8, 9.3),
    ("base", 1): (0.6, 2.3), ("base", 8): (4.4, 8.5), ("base", 16): (7.6, 9.4), ("base", 32): (11.1, 9.8),
    ("base", 64): (13.0, None),
    ("large", 1): (0.9, 3.4), ("large", 8): (6.6, 9.7), ("large", 16): (10.5, None),
    ("xl", 1): (3.1, None),
}


def row(model: str, batch: int, device: str) -> StudyRow | None | str:
    """The study's row; "oom" where it ran out of memory; None where it did not measure."""
    key = (model, batch, device)
    if key in _OOM:
        return "oom"
    if key not in _T4:
        return None
    load, fwd, loss, bwd, opt, total, tps = _T4[key]
    watts, eta = _T2.get(key, (None, None))
    mfu_pct = _T3.get((model, batch), (None, None))[DEVICES.index(device)]
    return StudyRow(model, batch, device, load, fwd, loss, bwd, opt, total, tps, watts, eta,
                    mfu_pct / 100 if mfu_pct is not None else None)


def batches(model: str) -> list[int]:
    """Minibatch sizes the study measured for a model."""
    return sorted({b for (m, b, _) in (*_T4, *_OOM) if m == model})

"""Preset FLAN-T5 models for benchmarks, with a line saying where the weights came from."""
from __future__ import annotations

from pathlib import Path

import torch

from fedcore.models import PRESETS, build_model, count_parameters


def preset_names() -> list[str]:
    return list(PRESETS)


def load_model(preset: str, weights_dir: Path | None = None, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """The preset's model and a line saying where its weights came from."""
    model = build_model(preset, weights_dir=weights_dir, seed=seed)
    model.eval()
    if weights_dir is not None:
        return model, f"weights loaded from {weights_dir}"
    return model, (f"RANDOM init (seed {seed}): compression ratios of real FLAN-T5 weights differ; "
                   f"pass --weights-dir for those")


__all__ = ["preset_names", "load_model", "count_parameters"]

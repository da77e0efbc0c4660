"""The device's error-feedback residual on disk, so it survives a daemon restart.

Without a state directory the residual lives in the daemon's memory only and
a restart starts from zero (one round's quantization error is then lost,
not accumulated).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("fedclient.feedback")

RESIDUAL_FILE = "error_feedback.safetensors"


def save_residual(state_dir: Path, residual: dict[str, torch.Tensor]) -> str:
    """Write atomically (temp file, fsync, rename); returns where, for the log."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / RESIDUAL_FILE
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in residual.items()}, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return f"saved to {path}"


def load_residual(state_dir: Path) -> dict[str, torch.Tensor] | None:
    path = state_dir / RESIDUAL_FILE
    if not path.exists():
        return None
    try:
        residual = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        log.warning("error-feedback residual %s unreadable (%s); starting from zero", path, exc)
        return None
    log.info("error-feedback residual loaded from %s (%d tensors)", path, len(residual))
    return residual

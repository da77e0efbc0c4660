"""Preset FLAN-T5 models for benchmarks: fedcore.models when present, else a local fallback.

The fallback keeps the benches runnable on a tree where fedcore.models is not
importable; its presets are the published FLAN-T5 (T5 v1.1) architectures.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("bench.models")

# name: (d_model, d_ff, num_layers, num_heads, d_kv, vocab_size)
FALLBACK_PRESETS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (64, 128, 2, 4, 16, 384),
    "small": (512, 1024, 8, 6, 64, 32128),
    "base": (768, 2048, 12, 12, 64, 32128),
    "large": (1024, 2816, 24, 16, 64, 32128),
    "xl": (2048, 5120, 24, 32, 64, 32128),
}


def preset_names() -> list[str]:
    try:
        from fedcore.models import PRESETS
        return list(PRESETS)
    except ImportError:
        return list(FALLBACK_PRESETS)


def _fallback_config(preset: str):
    from transformers import T5Config
    d_model, d_ff, layers, heads, d_kv, vocab = FALLBACK_PRESETS[preset]
    return T5Config(vocab_size=vocab, d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_layers=layers,
                    num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def load_model(preset: str, weights_dir: Path | None = None, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """The preset's model and a line saying where its weights came from."""
    try:
        from fedcore.models import build_model
    except ImportError:
        build_model = None
    if build_model is not None:
        model = build_model(preset, weights_dir=weights_dir, seed=seed)
        source = "fedcore.models"
    else:
        from transformers import T5ForConditionalGeneration
        if weights_dir is not None:
            model = T5ForConditionalGeneration.from_pretrained(Path(weights_dir), local_files_only=True)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = T5ForConditionalGeneration(_fallback_config(preset))
        source = "bench._models fallback"
    model.eval()
    if weights_dir is not None:
        return model, f"weights loaded from {weights_dir} ({source})"
    return model, (f"RANDOM init (seed {seed}, {source}): compression ratios of real FLAN-T5 weights differ; "
                   f"pass --weights-dir for those")


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters with tied ones counted once (parameters() yields each Parameter once)."""
    return sum(p.numel() for p in model.parameters())

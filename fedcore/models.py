"""FLAN-T5 presets, model construction (local weights or seeded random init), tokenizer, device."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

from fedcore.config import check_weights_dir

log = logging.getLogger("fedcore.models")


@dataclass(frozen=True)
class ModelPreset:
    """The architecture numbers of one T5 size (decoder depth = encoder depth)."""

    name: str
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    d_kv: int = 64
    vocab_size: int = 32128
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    dropout_rate: float = 0.1


PRESETS: dict[str, ModelPreset] = {
    # The FLAN-T5 (T5 v1.1) family: gated-GELU, untied LM head, 32128 vocab.
    "small": ModelPreset("small", d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "base": ModelPreset("base", d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "large": ModelPreset("large", d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "xl": ModelPreset("xl", d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    # For tests and CPU demos (886,528 parameters). vocab 384 is exactly ByT5's
    # id space (3 specials + 256 bytes + 125 sentinels), so the file-less byte
    # tokenizer fits and the embedding and LM head stay small. The head stays
    # untied so tiny has FLAN-T5's tensor layout (shared x3 + separate lm_head)
    # for wire and aggregation tests. d_model 128 with 2+2 layers takes ~1 s
    # per batch of 32 synthetic dialogues on this 2-core CPU; wider (192) or
    # deeper (4+4) variants learned more per step but not more per CPU-second.
    # Dropout is off: on CPU its mask sampling took ~45% of the step time, and
    # a model this small does not overfit a few rounds of data.
    "tiny": ModelPreset("tiny", d_model=128, d_ff=256, num_layers=2, num_heads=4, d_kv=32, vocab_size=384,
                        dropout_rate=0.0),
}


def get_preset(name: str | ModelPreset) -> ModelPreset:
    """Resolve a preset or an alias such as "flan-t5-small" or "google/flan-t5-base"."""
    if isinstance(name, ModelPreset):
        return name
    key = name.strip().lower().rsplit("/", 1)[-1].replace("_", "-")
    for prefix in ("flan-t5-", "t5-v1.1-", "t5-"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} (or flan-t5-<size>)")
    return PRESETS[key]


def t5_config(preset: str | ModelPreset, dropout_rate: float | None = None) -> T5Config:
    """The exact T5Config of a preset; ``dropout_rate`` overrides the preset's (0.1 for FLAN-T5)."""
    p = get_preset(preset)
    return T5Config(
        vocab_size=p.vocab_size,
        d_model=p.d_model,
        d_kv=p.d_kv,
        d_ff=p.d_ff,
        num_layers=p.num_layers,
        num_decoder_layers=p.num_layers,
        num_heads=p.num_heads,
        feed_forward_proj=p.feed_forward_proj,
        tie_word_embeddings=p.tie_word_embeddings,
        dropout_rate=p.dropout_rate if dropout_rate is None else dropout_rate,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def init_model(preset: str | ModelPreset, seed: int = 0) -> T5ForConditionalGeneration:
    """The preset with seeded random weights (as :func:`build_model` without a weights directory, silently)."""
    return _random_model(t5_config(preset), seed)


def _random_model(cfg: T5Config, seed: int) -> T5ForConditionalGeneration:
    # fork_rng keeps the caller's global RNG stream untouched by our seeding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(cfg)
        if not cfg.tie_word_embeddings:
            # transformers draws an untied lm_head with std 1.0, which makes the
            # initial logits ~sqrt(d_model) large (loss ~35 instead of ln(vocab)
            # for tiny) and AdamW needs hundreds of steps to shrink them: the
            # tiny demo learned ~2x slower per step. std d_model**-0.5 gives
            # unit-scale logits, as the tied head's rescaling would.
            with torch.no_grad():
                model.lm_head.weight.normal_(mean=0.0, std=cfg.d_model ** -0.5)
        return model


def build_model(
    preset_or_name: str | ModelPreset,
    weights_dir: Path | None = None,
    seed: int = 0,
) -> T5ForConditionalGeneration:
    """Load weights from a local HF directory, or build the preset randomly initialised (logged)."""
    preset = get_preset(preset_or_name)
    if weights_dir is not None:
        model = load_pretrained(weights_dir)
        cfg = model.config
        if (cfg.d_model, cfg.num_layers, cfg.vocab_size) != (preset.d_model, preset.num_layers, preset.vocab_size):
            log.warning("weights in %s (d_model=%d, layers=%d, vocab=%d) do not match preset %s",
                        weights_dir, cfg.d_model, cfg.num_layers, cfg.vocab_size, preset.name)
        log.info("loaded %s weights from %s", preset.name, weights_dir)
        return model
    model = init_model(preset, seed)
    log.warning("model %s has RANDOM weights (seed %d): no weights directory given", preset.name, seed)
    return model


def load_pretrained(weights_dir: Path) -> T5ForConditionalGeneration:
    """The model saved in a local Hugging Face directory, as the server loads a run's initial weights."""
    return T5ForConditionalGeneration.from_pretrained(check_weights_dir(weights_dir), local_files_only=True)


def config_json(model: T5ForConditionalGeneration) -> str:
    """The full config of a model as JSON, for a peer to rebuild the architecture."""
    return model.config.to_json_string(use_diff=False)


def model_from_config_json(json_str: str, seed: int = 0) -> T5ForConditionalGeneration:
    """Build a randomly initialised T5 from :func:`config_json` output; weights arrive later."""
    try:
        data = json.loads(json_str)
    except json.JSONDecodeError as e:
        raise ValueError(f"model config is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict) or data.get("model_type") != "t5":
        got = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"model config must describe a T5 model (model_type 't5'), got {got!r}")
    model = _random_model(T5Config.from_dict(data), seed)
    log.info("built model from received config (d_model=%d, layers=%d); awaiting weights",
             model.config.d_model, model.config.num_layers)
    return model


def load_tokenizer(weights_dir: Path | None = None) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved with the weights, or ByT5's byte tokenizer (needs no files)."""
    if weights_dir is not None:
        tok = transformers.AutoTokenizer.from_pretrained(check_weights_dir(weights_dir), local_files_only=True)
        log.info("loaded tokenizer from %s", weights_dir)
        return tok
    log.info("no weights directory: using the file-less ByT5 byte tokenizer")
    return transformers.ByT5Tokenizer()


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters, counting tied (shared) tensors once."""
    seen: set[tuple] = set()
    total = 0
    # parameters() already drops repeated Parameter objects; the storage key also
    # catches distinct Parameters that view the same memory (not possible on meta).
    for p in model.parameters():
        key: tuple = (id(p),) if p.device.type == "meta" else (
            p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def pick_device(requested: str = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available here")
    return device

"""Model presets, construction, tokenizer and device choice."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import T5ForConditionalGeneration

from fedcore.batching import IGNORE_INDEX, collate, encode_examples, iterate_batches
from fedcore.data import Example, synthetic_corpus
from fedcore.models import (
    PRESETS,
    build_model,
    config_json,
    count_parameters,
    get_preset,
    load_tokenizer,
    model_from_config_json,
    pick_device,
    t5_config,
)

EXPECTED = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080, "xl": 2_849_757_184}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts(name: str) -> None:
    # The meta device builds the exact module tree without allocating 11 GB for xl.
    with torch.device("meta"):
        model = T5ForConditionalGeneration(t5_config(name))
    assert count_parameters(model) == EXPECTED[name]
    # FLAN-T5 keeps a separate LM head but shares the input embedding three ways.
    assert model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.decoder.embed_tokens.weight is model.shared.weight


def test_small_built_for_real_has_untied_head_and_tied_embeddings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedcore.models"):
        model = build_model("flan-t5-small", seed=0)
    assert "RANDOM" in caplog.text
    assert count_parameters(model) == EXPECTED["small"]
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert model.decoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    # state_dict lists the shared tensor three times; counting must not.
    assert sum(v.numel() for v in model.state_dict().values()) > count_parameters(model)


def test_aliases_and_unknown() -> None:
    assert get_preset("flan-t5-base") is PRESETS["base"]
    assert get_preset("google/flan-t5-large") is PRESETS["large"]
    assert get_preset("XL") is PRESETS["xl"]
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("flan-t5-huge")


def test_config_fields() -> None:
    cfg = t5_config("small")
    assert (cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id) == (0, 0, 1)
    assert cfg.num_decoder_layers == cfg.num_layers == 8
    assert cfg.dropout_rate == 0.1 and not cfg.tie_word_embeddings
    assert cfg.feed_forward_proj == "gated-gelu"
    assert t5_config("small", dropout_rate=0.0).dropout_rate == 0.0
    tiny = t5_config("tiny")
    assert tiny.dropout_rate == 0.0 and not tiny.tie_word_embeddings


def test_random_model_starts_with_unit_scale_logits(tok) -> None:
    # Initial loss near ln(vocab): the untied head is drawn at d_model**-0.5,
    # not transformers' 1.0 (which starts tiny at a loss of ~35).
    model = build_model("tiny", seed=0)
    batch = collate(encode_examples(tok, synthetic_corpus(4, seed=0), 128, 95))
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    assert out.loss.item() < 1.5 * math.log(model.config.vocab_size)


def test_build_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("tiny", seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_model("tiny", seed=5)
    c = build_model("tiny", seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_config_json_roundtrip() -> None:
    model = build_model("tiny")
    other = model_from_config_json(config_json(model))
    assert other.config.to_dict() == model.config.to_dict()
    assert count_parameters(other) == count_parameters(model)
    assert set(other.state_dict()) == set(model.state_dict())
    with pytest.raises(ValueError, match="T5"):
        model_from_config_json('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="JSON"):
        model_from_config_json("{nope")


def test_save_and_load_local_weights(tmp_path) -> None:
    model = build_model("tiny", seed=1)
    model.save_pretrained(tmp_path)
    load_tokenizer(None).save_pretrained(tmp_path)
    loaded = build_model("tiny", weights_dir=tmp_path)
    sd, ld = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], ld[k]) for k in sd)
    assert loaded.lm_head.weight.data_ptr() != loaded.shared.weight.data_ptr()
    assert load_tokenizer(tmp_path)("hi").input_ids == [107, 108, 1]


def test_tiny_vocab_fits_byte_tokenizer() -> None:
    tok = load_tokenizer(None)
    assert len(tok) <= PRESETS["tiny"].vocab_size
    ids = tok("Zoë: naïve ☕").input_ids
    assert max(ids) < PRESETS["tiny"].vocab_size and ids[-1] == tok.eos_token_id


def test_pick_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")


# ---------------------------------------------------------------- batching

def test_encode_and_collate_pad_and_mask() -> None:
    tok = load_tokenizer(None)
    examples = [Example("1", "A: hi", "A greets."), Example("2", "B: hello there, how are you?", "B asks.")]
    enc = encode_examples(tok, examples, max_input_tokens=20, max_target_tokens=5)
    assert enc[0].input_ids == tok("summarize: A: hi").input_ids
    assert len(enc[1].input_ids) == 20 and enc[1].input_ids[-1] == tok.eos_token_id
    assert len(enc[0].labels) == 5 and enc[0].labels[-1] == tok.eos_token_id
    batch = collate(enc)
    assert batch.input_ids.shape == (2, 20) and batch.labels.shape == (2, 5)
    n0 = len(enc[0].input_ids)
    assert batch.attention_mask[0].tolist() == [1] * n0 + [0] * (20 - n0)
    assert (batch.input_ids[0, n0:] == 0).all()
    assert batch.n_tokens == n0 + 20 + 5 + 5
    short = collate([encode_examples(tok, [Example("3", "x", "ab")])[0], enc[0]])
    assert short.labels[0].tolist() == tok("ab").input_ids + [IGNORE_INDEX] * (5 - 3)


def test_batch_iterator_shuffles_deterministically_per_epoch() -> None:
    tok = load_tokenizer(None)
    enc = encode_examples(tok, synthetic_corpus(10, seed=0))

    def order(seed: int, epoch: int) -> list[list[int]]:
        return [b.input_ids[:, 11:20].tolist() for b in iterate_batches(enc, 4, seed=seed, epoch=epoch)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    sizes = [b.n_examples for b in iterate_batches(enc, 4, seed=0)]
    assert sizes == [4, 4, 2]
    assert sum(b.n_tokens for b in iterate_batches(enc, 4)) == sum(len(e.input_ids) + len(e.labels) for e in enc)

"""The T5 training FLOPs count: by hand, against torch's own FLOP counter, and on the study's scale."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5Config, T5ForConditionalGeneration

from fedcore.flops import T5Shape, flops_per_token, mfu, parameter_count, study_flops_per_token, training_flops
from fedcore.models import count_parameters


def test_training_flops_match_a_hand_computation() -> None:
    # d=4, heads 3 x d_kv 2 (attention width 6 != d_model), d_ff 5, 1 encoder and 2 decoder layers, vocab 7.
    shape = T5Shape(d_model=4, d_kv=2, num_heads=3, d_ff=5, num_layers=1, num_decoder_layers=2, vocab_size=7)
    # S = 3 input, T = 2 target tokens.
    # encoder token: 1 * (4*4*6 + 3*4*5)           = 96 + 60          = 156
    # cross k,v per encoder token: 2 * 2*4*6                          = 96
    # decoder token: 2 * (6*4*6 + 3*4*5) + 4*7     = 2*(144+60) + 28  = 436
    # matmuls: 6 * (3*(156+96) + 2*436)           = 6 * 1628         = 9768
    # attention: 12*6 * (1*3*3 + 2*2*2 + 2*2*3)    = 72 * 29          = 2088
    assert training_flops(shape, 3, 2) == 9768 + 2088
    assert flops_per_token(shape, 3, 2) == pytest.approx((9768 + 2088) / 5)
    # Not gated: two FFN matrices instead of three.
    plain = T5Shape(d_model=4, d_kv=2, num_heads=3, d_ff=5, num_layers=1, num_decoder_layers=2, vocab_size=7,
                    gated=False)
    # each token loses one d*f = 20 matrix per layer: 6 * (3*1*20 + 2*2*20) = 840
    assert training_flops(plain, 3, 2) == 9768 + 2088 - 840


BATCH, S, T = 2, 7, 5


def _small_t5() -> T5ForConditionalGeneration:
    cfg = T5Config(vocab_size=50, d_model=16, d_kv=4, num_heads=3, d_ff=24, num_layers=2, num_decoder_layers=3,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg)


def _counted_step_flops(model: T5ForConditionalGeneration) -> int:
    """torch's own FLOP count of one forward and backward on a random batch of BATCH x (S input, T target)."""
    ids = torch.randint(1, 50, (BATCH, S))
    labels = torch.randint(1, 50, (BATCH, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    return counter.get_total_flops()


def test_training_flops_equal_torchs_count_of_a_real_forward_and_backward() -> None:
    model = _small_t5()
    shape = T5Shape.from_config(model.config)
    assert parameter_count(shape) == count_parameters(model)
    assert _counted_step_flops(model) == BATCH * training_flops(shape, S, T)


def test_frozen_weights_count_four_not_six_per_matmul() -> None:
    # As under LoRA: no weight gradient, but activation gradients all the way down. Freezing every
    # weight except the input embedding (whose backward is a scatter, not a matmul) gives exactly that.
    model = _small_t5()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "shared.weight")
    shape = T5Shape.from_config(model.config)
    assert _counted_step_flops(model) == BATCH * training_flops(shape, S, T, weight_grads=False)
    # Hand check on the small shape of the first test: matmuls 4 * 1628 instead of 6 * 1628.
    tiny = T5Shape(d_model=4, d_kv=2, num_heads=3, d_ff=5, num_layers=1, num_decoder_layers=2, vocab_size=7)
    assert training_flops(tiny, 3, 2, weight_grads=False) == 4 * 1628 + 2088


def test_presets_and_the_studys_convention() -> None:
    small = T5Shape.from_preset("small")
    assert parameter_count(small) == 76_961_152  # FLAN-T5-Small, tied embedding once
    ours = flops_per_token(small, 512, 95)
    study = study_flops_per_token(small, 512)
    assert 1.6e8 < ours < 1.7e8
    # The study's Table 2/3: Orin, Small, batch 1: 923.04 input tokens/s and 1.1% MFU of 42.5 TFLOP/s.
    assert mfu(923.04 * study, 42.5e12) == pytest.approx(0.011, abs=0.0006)
    assert mfu(1.0, None) is None and mfu(1.0, 0.0) is None
    with pytest.raises(ValueError):
        flops_per_token(small, 0, 0)

"""Training FLOPs of an encoder-decoder T5, for model FLOPs utilisation (MFU).

The count is PaLM's (Chowdhery et al. 2022, appendix B: 6N + 12·L·H·Q·T per
token) adapted to what T5 actually computes for one example with S input
and T target tokens. With d = d_model, a = num_heads·d_kv (the attention
width, which differs from d_model in T5 v1.1: 384 vs 512 for Small),
f = d_ff, m = 3 FFN matrices when gated (FLAN-T5's wi_0, wi_1, wo) else 2,
V = vocab, Le/Ld = encoder/decoder layers:

    encoder token:  Pe = Le·(4·d·a + m·d·f)                      (q, k, v, o; FFN)
    decoder token:  Pd = Ld·(4·d·a + 2·d·a + m·d·f) + d·V        (self q,k,v,o; cross q,o; FFN; lm_head)
    cross k, v:     Pc = Ld·2·d·a, applied to every ENCODER token
    matmuls:        6·(S·(Pe + Pc) + T·Pd)
    attention:      12·a·(Le·S² + Ld·T² + Ld·T·S)                (enc self, dec self, cross)

    FLOPs(example) = matmuls + attention;  FLOPs/token = FLOPs(example) / (S + T)

6 = 2 (multiply-add) x 3 (forward, plus backward at twice the forward).
With frozen weights (LoRA: only the small adapters train) the backward pass
computes the activations' gradients but not the weights', so the matmuls
count 4 instead of 6; the attention term stays (its backward has no weights
to skip) and the adapters' own FLOPs (rank r, under 1% at r 8) are left out.
Embedding lookups, layer norms, softmax, activations and the relative
position bias are not matmuls and are left out, as PaLM leaves them out;
the decoder's causal mask is not halved (T5 computes the full score matrix).
MFU = achieved model FLOP/s / peak FLOP/s, with achieved = FLOPs/token x
tokens/s (tokens = input + target tokens, padding not counted).

The study reports MFU with the decoder-only formula applied as is: every
input token through all parameters and all layers, 6·N + 12·(Le+Ld)·d·S
per input token (N = all 77M parameters for Small). Its published MFU
matches that within a few percent; :func:`study_flops_per_token` gives it
so that our MFU can also be put on the study's scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RELATIVE_ATTENTION_BUCKETS = 32  # T5's default; only the parameter count needs it


@dataclass(frozen=True)
class T5Shape:
    """The numbers of a T5 that the FLOPs count depends on."""

    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int
    gated: bool = True  # FLAN-T5 / T5 v1.1: gated-GELU, wi_0 and wi_1
    tied_lm_head: bool = False  # FLAN-T5 has its own lm_head

    @property
    def attn_width(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def ffn_matrices(self) -> int:
        return 3 if self.gated else 2

    @classmethod
    def from_config(cls, cfg: Any) -> "T5Shape":
        """From a transformers T5Config (or anything with its attribute names)."""
        dec = getattr(cfg, "num_decoder_layers", None)
        return cls(d_model=cfg.d_model, d_kv=cfg.d_kv, num_heads=cfg.num_heads, d_ff=cfg.d_ff,
                   num_layers=cfg.num_layers, num_decoder_layers=dec if dec is not None else cfg.num_layers,
                   vocab_size=cfg.vocab_size, gated=str(cfg.feed_forward_proj).startswith("gated"),
                   tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", False)))

    @classmethod
    def from_preset(cls, name: str) -> "T5Shape":
        from fedcore.models import get_preset  # imports torch; only needed here

        p = get_preset(name)
        return cls(d_model=p.d_model, d_kv=p.d_kv, num_heads=p.num_heads, d_ff=p.d_ff, num_layers=p.num_layers,
                   num_decoder_layers=p.num_layers, vocab_size=p.vocab_size,
                   gated=p.feed_forward_proj.startswith("gated"), tied_lm_head=p.tie_word_embeddings)


def shape_of_state(state: Any) -> T5Shape:
    """The T5Shape of a T5 state dict, from its tensors' names and shapes (a server may hold no config)."""
    names = list(state)
    shared = state["shared.weight"]
    q = state["encoder.block.0.layer.0.SelfAttention.q.weight"]
    heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]

    def blocks(stack: str) -> int:
        return len({n.split(".")[2] for n in names if n.startswith(f"{stack}.block.")})

    head = state.get("lm_head.weight")
    return T5Shape(d_model=shared.shape[1], d_kv=q.shape[0] // heads, num_heads=heads, d_ff=wi.shape[0],
                   num_layers=blocks("encoder"), num_decoder_layers=blocks("decoder"), vocab_size=shared.shape[0],
                   gated=gated, tied_lm_head=head is None or (head.device.type != "meta"
                                                                and head.data_ptr() == shared.data_ptr()))


def block_forward_flops(shape: T5Shape, input_len: float, target_len: float) -> tuple[float, float, float]:
    """Forward FLOPs of one example through (one encoder block, one decoder block, the lm_head): the terms of
    :func:`forward_flops`, per block."""
    d, a, f, V, m = shape.d_model, shape.attn_width, shape.d_ff, shape.vocab_size, shape.ffn_matrices
    S, T = float(input_len), float(target_len)
    enc = 2 * S * (4 * d * a + m * d * f) + 4 * a * S * S
    dec = 2 * (S * 2 * d * a + T * (6 * d * a + m * d * f)) + 4 * a * (T * T + T * S)
    return enc, dec, 2 * T * d * V


def partial_training_flops(shape: T5Shape, input_len: float, target_len: float, decoder_blocks: int,
                           encoder_blocks: int = 0) -> float:
    """Model FLOPs of a step that trains only the output side: the lm_head, the last `decoder_blocks` decoder
    blocks and, beyond them, the last `encoder_blocks` encoder blocks. Everything runs forward; the backward
    pass (activation and weight gradients: twice the forward) runs only from the loss down to the earliest
    trained block. With every block trained this is :func:`training_flops`."""
    enc, dec, head = block_forward_flops(shape, input_len, target_len)
    forward = shape.num_layers * enc + shape.num_decoder_layers * dec + head
    return forward + 2 * (head + decoder_blocks * dec + encoder_blocks * enc)


def training_flops(shape: T5Shape, input_len: float, target_len: float, weight_grads: bool = True) -> float:
    """Model FLOPs of one training step (forward + backward) on one example; see the module docstring.

    ``weight_grads=False``: the model's weights are frozen (LoRA), so the backward skips their gradients.
    """
    d, a, f, V = shape.d_model, shape.attn_width, shape.d_ff, shape.vocab_size
    le, ld, m = shape.num_layers, shape.num_decoder_layers, shape.ffn_matrices
    S, T = float(input_len), float(target_len)
    per_enc_token = le * (4 * d * a + m * d * f)
    per_cross_kv_token = ld * 2 * d * a
    per_dec_token = ld * (6 * d * a + m * d * f) + d * V
    passes = 6 if weight_grads else 4
    matmuls = passes * (S * (per_enc_token + per_cross_kv_token) + T * per_dec_token)
    attention = 12 * a * (le * S * S + ld * T * T + ld * T * S)
    return matmuls + attention


def forward_flops(shape: T5Shape, input_len: float, target_len: float) -> tuple[float, float]:
    """Model FLOPs of one forward pass on one example, split (encoder, decoder with lm_head).

    The forward third of :func:`training_flops`: 2 per multiply-add, and the
    attention's 4·a per score. The cross-attention's k and v projections of
    the encoder tokens belong to the decoder. Zero-order methods count their
    work in these (a step is forward passes only; FedSPZO runs the two parts
    different numbers of times).
    """
    d, a, f, V = shape.d_model, shape.attn_width, shape.d_ff, shape.vocab_size
    le, ld, m = shape.num_layers, shape.num_decoder_layers, shape.ffn_matrices
    S, T = float(input_len), float(target_len)
    encoder = 2 * S * le * (4 * d * a + m * d * f) + 4 * a * le * S * S
    decoder = (2 * (S * ld * 2 * d * a + T * (ld * (6 * d * a + m * d * f) + d * V))
               + 4 * a * (ld * T * T + ld * T * S))
    return encoder, decoder


def flops_per_token(shape: T5Shape, input_len: float, target_len: float) -> float:
    """Training FLOPs per (input + target) token for examples of these lengths."""
    if input_len + target_len <= 0:
        raise ValueError("flops_per_token: need at least one token")
    return training_flops(shape, input_len, target_len) / (input_len + target_len)


def parameter_count(shape: T5Shape) -> int:
    """Parameters of T5ForConditionalGeneration with this shape (tied embedding once)."""
    d, a, f, V, m = shape.d_model, shape.attn_width, shape.d_ff, shape.vocab_size, shape.ffn_matrices
    rel_bias = RELATIVE_ATTENTION_BUCKETS * shape.num_heads  # first layer of each stack
    enc_layer = 4 * d * a + m * d * f + 2 * d  # + two layer norms
    dec_layer = 8 * d * a + m * d * f + 3 * d
    total = V * d  # shared embedding
    total += shape.num_layers * enc_layer + rel_bias + d  # + final layer norm
    total += shape.num_decoder_layers * dec_layer + rel_bias + d
    if not shape.tied_lm_head:
        total += d * V
    return total


def study_flops_per_token(shape: T5Shape, seq_len: int = 512) -> float:
    """The study's convention: PaLM's decoder-only 6N + 12·L·d·S per input token, N = all parameters."""
    layers = shape.num_layers + shape.num_decoder_layers
    return 6 * parameter_count(shape) + 12 * layers * shape.d_model * seq_len


def mfu(flops_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.05 = 5%); None when the peak is unknown."""
    if not peak_flops or peak_flops <= 0:
        return None
    return flops_per_s / peak_flops

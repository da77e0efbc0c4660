"""Peak memory of one AdamW training step of a T5 that trains only its last k layer units.

weights    all parameters (tied ones once) x param_bytes
grads      the trained parameters x param_bytes
optimizer  AdamW's exp_avg and exp_avg_sq: 2 x the trained parameters x param_bytes
           (torch keeps the moments in the parameter's dtype, and so the grads)
activations what autograd keeps for backward from the earliest trained unit to the loss,
           plus the logits the trainer holds through backward

The activation terms are what transformers' T5 (gated-GELU, NewGELU written
out in Python) saves, counted op by op and checked against
``saved_tensors_hooks`` in tests/test_memory.py. With N tokens in a stack
(B·S encoder, B·T decoder), d = d_model, a = heads·d_kv, f = d_ff, h = heads,
K = the attended length, b = activation bytes, m = dropout-mask bytes and
δ = 1 when dropout is on, in elements (x b unless marked m):

    RMS norm       2Nd + N (input, rsqrt, x·rsqrt); Nd at the boundary (input needs no grad)
    attention      Nd + 2Na + 2BKa + hNK (linear input, the q/k/v copies matmul makes,
                   o input, softmax) + δ(hNK·(m+b) + Nd·m)  (probs mask + dropped probs,
                   residual mask)
    gated FFN      Nd + 7Nf (+ δ(Nf + Nd)·m); ReLU FFN Nd + Nf (+ δ(Nf·(m+b) + Nd·m))
    encoder block  2 norms + self attention (K = S) + FFN
    decoder block  3 norms + self attention (K = T) + cross attention (K = S) + FFN
    stacks' ends   encoder final norm (+ its dropout mask), the encoder output the cross
                   attentions' k/v save (once), the decoder final norm and its mask,
                   lm_head input Nd (a tied head's only with the embedding), log-probs and
                   logits 2·B·T·V fp32, int64 targets
    embedding      int64 ids, dropout masks of both stacks' embeddings

The first trained block's first norm is at the boundary, and so is decoder
block 0's when the embedding is frozen: its input is the frozen embedding,
the encoder reaches it only through cross attention. Block 0 of a stack
also saves its relative-position buckets (int64 K·K). Dropout on CPU keeps
a float mask (4 bytes), CUDA's fused dropout a bool one (1 byte).
Activations are counted at param_bytes; checked at fp32 only (in half
precision the norms' fp32 upcasts would add to it).
Transient workspace (the frozen part's forward, activation gradients, the
logits' gradient, AdamW's foreach temporaries, allocator slack) is not
counted: a planner leaves headroom for it (bench.layerwise measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from fedcore.flops import T5Shape
from fedcore.layers import Unit, trained_names, unit_names, unit_of

INT64 = 8


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step, by kind."""

    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def training(self) -> int:
        """What training adds over the resident weights."""
        return self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        mb = 1e6
        return (f"weights {self.weights / mb:.1f} MB + grads {self.grads / mb:.1f} MB + optimizer "
                f"{self.optimizer / mb:.1f} MB + activations {self.activations / mb:.1f} MB = {self.total / mb:.1f} MB")


@dataclass(frozen=True)
class _Sizes:
    shape: T5Shape
    B: int
    S: int
    T: int
    b: int       # activation bytes
    m: int       # dropout-mask bytes, 0 without dropout
    relu: bool   # FFN non-gated (T5 v1.0): ReLU saves its output only

    def norm(self, n: int, boundary: bool) -> int:
        d = self.shape.d_model
        return self.b * (n * d if boundary else 2 * n * d + n)

    def attention(self, n: int, k: int) -> int:
        """n query tokens attending to k keys per example."""
        d, a, h, B = self.shape.d_model, self.shape.attn_width, self.shape.num_heads, self.B
        probs = h * n * k  # n already counts the batch
        saved = self.b * (n * d + 2 * n * a + 2 * B * k * a + probs)
        if self.m:
            saved += probs * (self.m + self.b) + n * d * self.m
        return saved

    def ffn(self, n: int) -> int:
        d, f = self.shape.d_model, self.shape.d_ff
        if self.relu:
            return self.b * (n * d + n * f) + (n * f * (self.m + self.b) + n * d * self.m if self.m else 0)
        return self.b * (n * d + 7 * n * f) + n * (f + d) * self.m

    def encoder_block(self, boundary: bool, first: bool) -> int:
        n = self.B * self.S
        out = self.norm(n, boundary) + self.norm(n, False) + self.attention(n, self.S) + self.ffn(n)
        return out + (INT64 * self.S * self.S if first else 0)

    def decoder_block(self, boundary: bool, first: bool) -> int:
        n = self.B * self.T
        out = (self.norm(n, boundary) + 2 * self.norm(n, False) + self.attention(n, self.T)
               + self.attention(n, self.S) + self.ffn(n))
        return out + (INT64 * self.T * self.T if first else 0)

    def head(self, boundary: bool, lm_head_trained: bool) -> int:
        n, d, V = self.B * self.T, self.shape.d_model, self.shape.vocab_size
        # log_softmax keeps its output; the logits stay alive in the trainer: both fp32 (it calls .float())
        out = self.norm(n, boundary) + n * d * self.m + 2 * 4 * n * V + INT64 * n
        # the lm_head keeps its input only to grad its weight: a tied one trains with the embedding
        return out + (self.b * n * d if lm_head_trained else 0)


def _activations(z: _Sizes, start: int) -> int:
    """Saved bytes when training reaches down to unit `start` (output-first index)."""
    L, Ld = z.shape.num_layers, z.shape.num_decoder_layers
    embedding = start == L + Ld + 1
    out = z.head(boundary=start == 0, lm_head_trained=embedding or not z.shape.tied_lm_head)
    dec = min(start, Ld)  # trained decoder blocks
    for j in range(Ld - dec, Ld):
        # decoder block 0's input is the embedding: needs grad only when that is trained
        boundary = j == Ld - dec if start <= Ld else (j == 0 and not embedding)
        out += z.decoder_block(boundary, first=j == 0)
    if dec:
        out += z.b * z.B * z.S * z.shape.d_model  # the encoder output every cross attention's k, v save
    enc = max(0, min(start - Ld, L))  # trained encoder blocks
    if enc:
        n = z.B * z.S
        out += z.norm(n, False) + n * z.shape.d_model * z.m  # encoder final norm and its dropout
        for i in range(L - enc, L):
            out += z.encoder_block(boundary=i == L - enc and not embedding, first=i == 0)
    if embedding:
        out += INT64 * z.B * (z.S + z.T) + z.B * (z.S + z.T) * z.shape.d_model * z.m
    return out


def training_memory(shape: T5Shape, numel_by_name: Mapping[str, int], trained: Iterable[str], batch: int,
                    input_tokens: int, target_tokens: int, param_bytes: int = 4, dropout_rate: float = 0.1,
                    mask_bytes: int = 1) -> MemoryEstimate:
    """The memory of one step training the parameters `trained` (canonical names, tied tensors once).

    ``numel_by_name``: every canonical parameter's element count. ``trained``
    is read as reaching down to its earliest unit (CAFF trains the last k
    units). ``mask_bytes``: 1 for CUDA's bool dropout masks, 4 on CPU.
    """
    L, Ld = shape.num_layers, shape.num_decoder_layers
    trained = list(trained)
    unknown = [n for n in trained if n not in numel_by_name]
    if unknown:
        raise ValueError(f"trained names not among the parameters: {', '.join(unknown[:3])}")
    n_trained = sum(numel_by_name[n] for n in set(trained))
    weights = sum(numel_by_name.values()) * param_bytes
    grads = n_trained * param_bytes
    if not trained:
        return MemoryEstimate(weights, 0, 0, 0)
    order = unit_names(L, Ld)
    start = max(order.index(unit_of(n, L, Ld)) for n in trained)
    z = _Sizes(shape, batch, input_tokens, target_tokens, param_bytes, mask_bytes if dropout_rate > 0 else 0,
               relu=not shape.gated)
    return MemoryEstimate(weights, grads, 2 * grads, _activations(z, start))


def unit_memory_table(shape: T5Shape, numel_by_name: Mapping[str, int], units: Sequence[Unit], batch: int,
                      input_tokens: int, target_tokens: int, **kw) -> list[MemoryEstimate]:
    """:func:`training_memory` for k = 0..len(units) trained units (a planner picks the largest k that fits)."""
    return [training_memory(shape, numel_by_name, trained_names(units, k), batch, input_tokens, target_tokens, **kw)
            for k in range(len(units) + 1)]

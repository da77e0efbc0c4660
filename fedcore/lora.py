"""LoRA adapters in the global state: names, the shared initialisation of A, and merging.

Server and devices agree on one layout: for every targeted linear layer
``<module>`` (say ``encoder.block.0.layer.0.SelfAttention.q``) the global
state carries ``<module>.lora_A.weight`` (rank x in) and
``<module>.lora_B.weight`` (out x rank) next to the frozen ``<module>.weight``;
the layer computes ``W x + (alpha / rank) B A x``. These are peft's adapter
file names without its ``base_model.model.`` prefix.

Aggregation is FFA-LoRA (Sun et al. 2024): A is drawn once by the server,
sent with the first full download and never trained, B starts at zero and is
the only tensor devices train, upload and the server averages. With A common
and fixed, ``mean_i (s B_i A) = s mean_i(B_i) A``: averaging B is averaging
the weight updates exactly, which averaging A and B separately is not
(``mean(B) mean(A) != mean(B A)``).

Pure tensor code: no torch.nn, no peft (devices use peft to train, see
fedclient.trainer).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedcore.wire import unique_tensors

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
# The nn.Linear layers of a T5 by their attribute name (T5 v1.1 / FLAN-T5 have wi_0 and wi_1, T5 v1.0 wi).
T5_LINEAR = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module, e.g. q,v")
        unknown = [t for t in self.targets if t not in T5_LINEAR]
        if unknown:
            raise ValueError(f"LoRA target(s) {', '.join(unknown)} are not T5 linear layers; choose from "
                             f"{', '.join(T5_LINEAR)}")

    def describe(self) -> str:
        return f"LoRA r{self.rank} alpha {self.alpha:g} on {','.join(self.targets)}"


def parse_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def target_modules(state: Mapping[str, torch.Tensor], targets: tuple[str, ...]) -> list[str]:
    """Module paths, in state order, of the 2-D ``<module>.weight`` tensors whose last name is a target."""
    out = []
    for name, t in state.items():
        if not name.endswith(".weight") or is_adapter(name) or t.dim() != 2:
            continue
        module = name[:-len(".weight")]
        if module.rsplit(".", 1)[-1] in targets:
            out.append(module)
    return out


def init_adapters(state: Mapping[str, torch.Tensor], spec: LoraSpec, seed: int) -> dict[str, torch.Tensor]:
    """A and B for every targeted layer: A as peft draws it (kaiming-uniform, bound 1/sqrt(in)), B zero.

    Seeded from the run seed only, so a restarted server or a second server
    of the same run draws the same A.
    """
    modules = target_modules(state, spec.targets)
    if not modules:
        raise ValueError(f"LoRA targets {','.join(spec.targets)} match no linear layer of the model")
    # A weight tied to another tensor (lm_head and the shared embedding of a tied T5) cannot take a merged
    # W + sBA under one name only: loading the merged model would push the adapter into its twin too.
    ties = {n: [e.name, *e.aliases] for e in unique_tensors(state) for n in (e.name, *e.aliases)}
    for m in modules:
        w = state[m + ".weight"]
        if w.device.type == "meta":  # shapes only (size estimates): no storage to tell ties by
            continue
        twins = [k for k in ties[m + ".weight"] if k != m + ".weight"]
        if twins:
            raise ValueError(f"LoRA target {m} is tied to {', '.join(twins)}; an adapter on a tied weight "
                             f"cannot be merged: leave {m.rsplit('.', 1)[-1]} out of lora_targets")
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        w = state[m + ".weight"]
        n_out, n_in = w.shape
        bound = 1.0 / math.sqrt(n_in)
        out[m + A_SUFFIX] = torch.empty(spec.rank, n_in, dtype=torch.float32).uniform_(-bound, bound, generator=g)
        out[m + B_SUFFIX] = torch.zeros(n_out, spec.rank, dtype=torch.float32)
    return out


def is_adapter(name: str) -> bool:
    return name.endswith((A_SUFFIX, B_SUFFIX))


def trainable_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The B matrices: the only tensors devices train and upload."""
    return [k for k in state if k.endswith(B_SUFFIX)]


def adapter_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module paths that carry an adapter pair in ``state``."""
    return [k[:-len(B_SUFFIX)] for k in state if k.endswith(B_SUFFIX)]


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """(alpha / rank) B A in fp32: what the adapter adds to its layer's weight."""
    return (b.float() @ a.float()) * scaling


def merged(state: Mapping[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The plain model: W + (alpha / rank) B A for every adapted layer, adapters dropped.

    Untouched tensors are the same objects as in ``state``, so tied tensors stay tied.
    """
    out = {k: v for k, v in state.items() if not is_adapter(k)}
    for m in adapter_modules(state):
        w = state[m + ".weight"]
        out[m + ".weight"] = (w.float() + delta_weight(state[m + A_SUFFIX], state[m + B_SUFFIX], scaling)).to(w.dtype)
    return out

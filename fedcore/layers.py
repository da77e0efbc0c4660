"""The layer units of a T5 state dict, output side first, for layer-wise training (CAFF, arXiv 2411.07826).

A device that trains "the last k units" backpropagates only from the loss
down to the k-th unit; everything before it runs without autograd. The
order is therefore the backward order:

    head                 decoder.final_layer_norm (+ lm_head.weight when it is its own tensor)
    decoder.block.{Ld-1} ... decoder.block.0
    encoder.block.{L-1}  (+ encoder.final_layer_norm: the first encoder part met from the output side)
    ...  encoder.block.0
    embedding            shared.weight and its aliases

The shared embedding comes last: it feeds both stacks, so training it means
backpropagating through everything. Block 0 of each stack holds that stack's
relative_attention_bias (all its blocks use it); it stays with block 0, where
the state dict puts it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fedcore.wire import unique_tensors

HEAD, EMBEDDING = "head", "embedding"
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_BLOCK = re.compile(r"(encoder|decoder)\.block\.(\d+)\.")


@dataclass(frozen=True)
class Unit:
    """One trainable unit: its name and the canonical state-dict names of its tensors."""

    name: str
    tensors: tuple[str, ...]


def unit_names(num_layers: int, num_decoder_layers: int) -> list[str]:
    """The units' names, output side first."""
    return ([HEAD] + [f"decoder.block.{i}" for i in reversed(range(num_decoder_layers))]
            + [f"encoder.block.{i}" for i in reversed(range(num_layers))] + [EMBEDDING])


def unit_of(name: str, num_layers: int, num_decoder_layers: int) -> str:
    """The unit a state-dict name belongs to; ValueError when it fits none."""
    if name in ("lm_head.weight", "decoder.final_layer_norm.weight"):
        return HEAD
    if name in EMBEDDING_NAMES:
        return EMBEDDING
    if name == "encoder.final_layer_norm.weight":
        return f"encoder.block.{num_layers - 1}"
    m = _BLOCK.match(name)
    if m and int(m.group(2)) < (num_layers if m.group(1) == "encoder" else num_decoder_layers):
        return f"{m.group(1)}.block.{int(m.group(2))}"
    raise ValueError(f"{name!r} fits no layer unit of a T5 with {num_layers}+{num_decoder_layers} blocks")


def layer_units(names: Sequence[str], num_layers: int, num_decoder_layers: int) -> list[Unit]:
    """The units of these (canonical) names, output side first, each name in exactly one unit.

    Pass canonical names (see :func:`canonical_names`): a tied lm_head is then
    absent and the head holds only the final layer norm.
    """
    order = unit_names(num_layers, num_decoder_layers)
    members: dict[str, list[str]] = {u: [] for u in order}
    for n in names:
        members[unit_of(n, num_layers, num_decoder_layers)].append(n)
    empty = [u for u in order if not members[u]]
    if empty:  # wrong layer counts, or a partial list: a unit that trains nothing would mislead a planner
        raise ValueError(f"no tensors for unit(s) {', '.join(empty)}")
    return [Unit(u, tuple(members[u])) for u in order]


def canonical_names(state: Mapping[str, torch.Tensor], tied_lm_head: bool | None = None) -> list[str]:
    """State-dict names with each tied tensor once, under its first name.

    Meta tensors have no storage to compare, so there T5's known ties are
    assumed: the embed_tokens aliases of shared.weight, and lm_head.weight
    when ``tied_lm_head`` (required then).
    """
    if not any(t.device.type == "meta" for t in state.values()):
        return [e.name for e in unique_tensors(state)]
    if tied_lm_head is None:
        raise ValueError("meta tensors: say whether the lm_head is tied (tied_lm_head)")
    drop = set(EMBEDDING_NAMES[1:]) | ({"lm_head.weight"} if tied_lm_head else set())
    return [n for n in state if n not in drop]


def trained_names(units: Sequence[Unit], k: int) -> list[str]:
    """The tensors of the first (output-side) k units."""
    if not 0 <= k <= len(units):
        raise ValueError(f"k must be in 0..{len(units)}, got {k}")
    return [n for u in units[:k] for n in u.tensors]

"""Tokenize summarization examples once and serve padded, shuffled minibatches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from fedcore.data import Example

PREFIX = "summarize: "
IGNORE_INDEX = -100  # what torch's cross-entropy skips: padded label positions


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example (both end with EOS, truncated to the limits)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Batch:
    """Padded tensors for one minibatch and its size in real (non-pad) tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_tokens: int
    n_examples: int

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.n_tokens, self.n_examples)


def encode_examples(
    tokenizer,
    examples: Sequence[Example],
    max_input_tokens: int = 512,
    max_target_tokens: int = 95,
) -> list[EncodedExample]:
    """Tokenize "summarize: <dialogue>" and the summary, truncating to the limits."""
    if not examples:
        return []
    inputs = tokenizer([PREFIX + e.dialogue for e in examples], max_length=max_input_tokens, truncation=True)
    targets = tokenizer(text_target=[e.summary for e in examples], max_length=max_target_tokens, truncation=True)
    return [EncodedExample(list(i), list(t)) for i, t in zip(inputs["input_ids"], targets["input_ids"])]


def collate(items: Sequence[EncodedExample], pad_id: int = 0) -> Batch:
    """Pad to the longest item in the batch (not the limit): padding is pure wasted compute."""
    n = len(items)
    in_len = max(len(x.input_ids) for x in items)
    tgt_len = max(len(x.labels) for x in items)
    input_ids = torch.full((n, in_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, in_len), dtype=torch.long)
    labels = torch.full((n, tgt_len), IGNORE_INDEX, dtype=torch.long)
    tokens = 0
    for row, x in enumerate(items):
        input_ids[row, : len(x.input_ids)] = torch.tensor(x.input_ids, dtype=torch.long)
        attention_mask[row, : len(x.input_ids)] = 1
        labels[row, : len(x.labels)] = torch.tensor(x.labels, dtype=torch.long)
        tokens += len(x.input_ids) + len(x.labels)
    return Batch(input_ids, attention_mask, labels, tokens, n)


def iterate_batches(
    encoded: Sequence[EncodedExample],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    pad_id: int = 0,
) -> Iterator[Batch]:
    """One epoch of minibatches (last may be smaller), order fixed by (seed, epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(len(encoded)) if shuffle else np.arange(len(encoded))
    for start in range(0, len(order), batch_size):
        yield collate([encoded[int(i)] for i in order[start : start + batch_size]], pad_id)

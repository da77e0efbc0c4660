"""Held-out evaluation of the global model: teacher-forced loss and ROUGE of greedy summaries."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from fedcore.batching import IGNORE_INDEX, collate, encode_examples
from fedcore.data import Example


@dataclass
class EvalResult:
    """Mean token cross-entropy and mean ROUGE F-measures in percent over ``n`` examples."""

    loss: float
    rouge1: float
    rouge2: float
    rougeL: float
    n: int
    predictions: list[str] = field(default_factory=list, repr=False)  # in input order


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    device: torch.device,
    batch_size: int = 16,
    max_input_tokens: int = 512,
    max_target_tokens: int = 95,
) -> EvalResult:
    """Evaluate ``model`` on ``examples``; the model's train/eval mode is restored afterwards."""
    if not examples:
        raise ValueError("evaluate: no examples")
    device = torch.device(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_examples(tokenizer, examples, max_input_tokens, max_target_tokens)
    # Batching similar lengths together cuts padding; results are per example,
    # so the order does not change them.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    predictions: list[str] = [""] * len(encoded)
    loss_sum = 0.0
    loss_tokens = 0

    # A model whose vocabulary is larger than its tokenizer's (FLAN-T5's 32128
    # rows with ByT5's 384 bytes, or the 28 padding rows of the T5 tokenizer)
    # must not emit ids the tokenizer cannot turn back into text.
    vocab = model.get_output_embeddings().weight.shape[0]
    undecodable = list(range(len(tokenizer), vocab)) or None
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = collate([encoded[i] for i in idx], pad_id).to(device)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               decoder_input_ids=model._shift_right(batch.labels), use_cache=False).logits
                loss_sum += float(F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch.labels.view(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="sum"))
                loss_tokens += int((batch.labels != IGNORE_INDEX).sum())
                generated = model.generate(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, suppress_tokens=undecodable,
                    max_new_tokens=max_target_tokens, do_sample=False, num_beams=1,
                    decoder_start_token_id=model.config.decoder_start_token_id,
                    pad_token_id=pad_id, eos_token_id=model.config.eos_token_id,
                )
                for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                    predictions[i] = text.strip()
    finally:
        model.train(was_training)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for ex, pred in zip(examples, predictions):
        scores = scorer.score(ex.summary, pred)
        for key in totals:
            totals[key] += scores[key].fmeasure
    n = len(examples)
    return EvalResult(
        loss=loss_sum / max(loss_tokens, 1),
        rouge1=100.0 * totals["rouge1"] / n,
        rouge2=100.0 * totals["rouge2"] / n,
        rougeL=100.0 * totals["rougeL"] / n,
        n=n,
        predictions=predictions,
    )

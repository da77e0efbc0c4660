"""Local fine-tuning on a device's own data, as its method prepared the model, with the study's per-step timing breakdown."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from fedcore.batching import IGNORE_INDEX, Batch, EncodedExample, encode_examples, iterate_batches
from fedcore.data import Example
from fedcore.flops import T5Shape, forward_flops, training_flops
from fedcore.methods.zeroorder import Estimator, perturbed


@dataclass
class TrainSettings:
    """Hyperparameters of one round's local training."""

    local_epochs: int = 1
    local_steps: int = 0  # > 0: exactly this many steps, cycling the data; overrides local_epochs
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_input_tokens: int = 512
    max_target_tokens: int = 95
    seed: int = 0
    # EMULATION of a slower device on a fast machine: after each step, sleep
    # (compute_slowdown - 1) x that step's measured time. 1.0: off.
    compute_slowdown: float = 1.0

    def validate(self) -> None:
        """Raise ValueError, naming the setting, for values no training can run with."""
        def whole(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} {v!r} is outside {lo}..{hi}")

        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate {self.learning_rate!r} is not a positive finite number")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"weight_decay {self.weight_decay!r} is not a non-negative finite number")
        whole("batch_size", 1, MAX_BATCH)
        whole("local_steps", 0, MAX_STEPS)
        whole("local_epochs", 0 if self.local_steps > 0 else 1, MAX_EPOCHS)
        whole("max_input_tokens", 1, MAX_TOKENS)
        whole("max_target_tokens", 1, MAX_TOKENS)
        if not (math.isfinite(self.compute_slowdown) and self.compute_slowdown >= 1):
            raise ValueError(f"compute_slowdown {self.compute_slowdown!r} must be at least 1")


# Bounds of one round's local work that no real plan reaches; beyond them a task is a mistake, not work.
MAX_BATCH = 1 << 16
MAX_STEPS = 1_000_000
MAX_EPOCHS = 10_000
MAX_TOKENS = 1 << 16


@dataclass
class StepTimes:
    """Seconds spent in each phase of a training step, summed over ``steps`` steps."""

    batch_loading_s: float = 0.0
    forward_s: float = 0.0
    loss_s: float = 0.0
    backward_s: float = 0.0
    optimizer_step_s: float = 0.0
    steps: int = 0

    @property
    def total_s(self) -> float:
        return self.batch_loading_s + self.forward_s + self.loss_s + self.backward_s + self.optimizer_step_s


@dataclass
class TrainResult:
    """What one call of :func:`train_local` did and how long it took."""

    t_comp_s: float
    steps: int
    samples: int
    tokens: int  # non-pad input + target tokens processed
    tokens_per_s: float
    mean_loss: float
    step_times: StepTimes
    losses: list[float] = field(default_factory=list)  # per step, for learning curves
    model_flops: float = 0.0  # training FLOPs of the real (unpadded) lengths, fedcore.flops
    emulated_sleep_s: float = 0.0  # part of t_comp_s spent emulating a slower device

    @property
    def flops_per_token(self) -> float:
        return self.model_flops / self.tokens if self.tokens else 0.0


def _batches(encoded: Sequence[EncodedExample], settings: TrainSettings, pad_id: int) -> Iterator[Batch]:
    """Minibatches for local_epochs, or an endless cycle when local_steps bounds the run."""
    epoch = 0
    while settings.local_steps > 0 or epoch < settings.local_epochs:
        yield from iterate_batches(encoded, settings.batch_size, seed=settings.seed, epoch=epoch, pad_id=pad_id)
        epoch += 1


def train_local(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    settings: TrainSettings,
    device: torch.device,
    weight_grads: bool = True,
    zero_order: Estimator | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place with AdamW; returns timings and losses. Leaves it in eval().

    The parameters that require grad train (the method's Trainee set them);
    ``weight_grads`` False says the model's own weights are frozen (only
    adapters learn), so the backward pass skips their gradients in the FLOP
    count. With ``zero_order`` the steps are that estimator's forward-only
    ones instead (dropout off, no optimizer; fedcore.methods.zeroorder): its
    forward passes count as forward time, its perturbations as optimizer
    step time.

    The optimizer is created fresh per call (FedAvg clients keep no state
    between rounds). Dropout is seeded from ``settings.seed``, so callers
    should vary it per round and client.
    """
    if not examples:
        raise ValueError("train_local: no training examples")
    settings.validate()
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    synchronize(device)
    t_start = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = encode_examples(tokenizer, examples, settings.max_input_tokens, settings.max_target_tokens)
    model.to(device)
    model.train(zero_order is None)
    optimizer = make_optimizer(model, settings) if zero_order is None else None
    params = perturbed(model) if zero_order is not None else []

    times = StepTimes()
    losses: list[float] = []
    samples = tokens = 0
    model_flops = 0.0
    shape = T5Shape.from_config(model.config)
    slept = 0.0
    batches = _batches(encoded, settings, pad_id)
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.manual_seed(settings.seed)
        while settings.local_steps <= 0 or times.steps < settings.local_steps:
            t_step = time.perf_counter()
            if zero_order is None:
                done = timed_step(model, optimizer, batches, device, times)
            else:
                done = zero_order_step(model, zero_order, params, batches, device, times)
            if done is None:
                break
            host_batch, loss, forwards = done
            losses.append(loss)
            samples += host_batch.n_examples
            tokens += host_batch.n_tokens
            model_flops += (batch_flops(shape, host_batch, weight_grads) if forwards is None
                            else batch_forward_flops(shape, host_batch, *forwards))
            if settings.compute_slowdown > 1.0:
                # EMULATED slower device: sleep (factor - 1) x the step's measured time.
                pause = (settings.compute_slowdown - 1.0) * (time.perf_counter() - t_step)
                time.sleep(pause)
                slept += pause

    model.eval()
    del optimizer  # free Adam moments before returning (2x model size)
    synchronize(device)
    t_comp = time.perf_counter() - t_start
    return TrainResult(
        t_comp_s=t_comp,
        steps=times.steps,
        samples=samples,
        tokens=tokens,
        tokens_per_s=tokens / t_comp if t_comp > 0 else 0.0,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        step_times=times,
        losses=losses,
        model_flops=model_flops,
        emulated_sleep_s=slept,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels: without this, timers measure kernel launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


def load_batch(batches: Iterator[Batch], device: torch.device, times: StepTimes) -> tuple[Batch, Batch] | None:
    """The next batch (host copy, on `device`), its loading timed into ``times``; None when out of batches."""
    t0 = time.perf_counter()
    host_batch = next(batches, None)
    if host_batch is None:
        return None
    batch = host_batch.to(device)
    synchronize(device)
    times.batch_loading_s += time.perf_counter() - t0
    return host_batch, batch


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[Batch],
               device: torch.device, times: StepTimes) -> tuple[Batch, float, None] | None:
    """One training step, each phase timed into ``times``; (host batch, loss, None), or None when out of batches."""
    loaded = load_batch(batches, device, times)
    if loaded is None:
        return None
    host_batch, batch = loaded
    t1 = time.perf_counter()
    decoder_input_ids = model._shift_right(batch.labels)
    # use_cache=False: a training step has no use for the decoder's KV cache.
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   decoder_input_ids=decoder_input_ids, use_cache=False).logits
    synchronize(device)
    t2 = time.perf_counter()
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch.labels.view(-1),
                           ignore_index=IGNORE_INDEX)
    synchronize(device)
    t3 = time.perf_counter()
    loss.backward()
    synchronize(device)
    t4 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    t5 = time.perf_counter()

    times.forward_s += t2 - t1
    times.loss_s += t3 - t2
    times.backward_s += t4 - t3
    times.optimizer_step_s += t5 - t4
    times.steps += 1
    return host_batch, float(loss.detach()), None


def zero_order_step(model: torch.nn.Module, estimator: Estimator, params: list[tuple[str, torch.Tensor]],
                    batches: Iterator[Batch], device: torch.device, times: StepTimes
                    ) -> tuple[Batch, float, tuple[int, int]] | None:
    """One zero-order step, timed into ``times``; (host batch, loss, forward passes per block), or None."""
    loaded = load_batch(batches, device, times)
    if loaded is None:
        return None
    host_batch, batch = loaded
    with torch.no_grad():
        loss, cost = estimator.step(model, params, batch, lambda: synchronize(device))
    times.forward_s += cost.forward_s
    times.optimizer_step_s += cost.perturb_s
    times.steps += 1
    return host_batch, loss, (cost.first_forwards, cost.second_forwards)


def batch_forward_flops(shape: T5Shape, batch: Batch, encoder_passes: int, decoder_passes: int) -> float:
    """Model FLOPs of a step of forward passes only: each example's encoder and decoder passes at its lengths."""
    in_lens = batch.attention_mask.sum(dim=1).tolist()
    tgt_lens = (batch.labels != IGNORE_INDEX).sum(dim=1).tolist()
    total = 0.0
    for s, t in zip(in_lens, tgt_lens):
        enc, dec = forward_flops(shape, s, t)
        total += encoder_passes * enc + decoder_passes * dec
    return total


def batch_flops(shape: T5Shape, batch: Batch, weight_grads: bool = True) -> float:
    """Model FLOPs of one step: each example at its own lengths (padding is not model work)."""
    in_lens = batch.attention_mask.sum(dim=1).tolist()
    tgt_lens = (batch.labels != IGNORE_INDEX).sum(dim=1).tolist()
    return sum(training_flops(shape, s, t, weight_grads) for s, t in zip(in_lens, tgt_lens))

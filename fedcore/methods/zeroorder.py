"""What the zero-order methods (MeZO, FedKSeed, FedSPZO) share: settings, the update as (seed, scalar) pairs,
the device's forward-only step, the server's fold into per-seed steps and the replay that rebuilds a version.

A device perturbs every weight along a direction z regenerated from a seed
(fedcore.directions), takes the loss at theta + eps z and theta - eps z, and
moves by -lr g z with the projected gradient g = (L+ - L-) / (2 eps): no
backward pass, no optimizer state. Its update is the list of (seed, g)
pairs; the round's new model is theta + sum_k step_k z_k with step_k =
-lr x (the samples-weighted mean of the devices' g for seed k), which is
FedAvg of the devices' local moves written in the directions' basis. A
device that holds version v replays the steps of rounds v+1..v+k
(`apply_steps`, the same arithmetic the server did) and must then hold the
digest of v+k.

The three methods differ in where seeds come from and which weights a
direction moves: `mezo` draws a fresh seed per direction, `fedkseed` picks
each from a pool of K (so a round's steps are at most K pairs), `fedspzo`
splits the model into two blocks with P1 and P2 directions per step and
reuses the first block's activations for the second block's directions.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
import torch.nn.functional as F

from fedcore import directions
from fedcore.batching import IGNORE_INDEX, Batch

from .base import Method, Trainee, UpdateInvalid

if TYPE_CHECKING:
    from fedtune.v1 import fedtune_pb2 as pb

#: the blocks a pair may name: the whole model, or FedSPZO's first and second block
WHOLE, FIRST, SECOND = 0, 1, 2
#: FedSPZO's default split of a T5: the encoder (with the shared embedding) first, the decoder and lm_head second
T5_SECOND_BLOCK = ("decoder.", "lm_head.")
#: more pairs than this in one update is a bug or an attack, whatever the task said
MAX_PAIRS = 1 << 20
MAX_PERTURBATIONS = 1024
MAX_POOL = 1 << 24

# The update's tensor form, as a device keeps it on disk until the server holds it.
SEEDS, VALUES, BLOCKS = "zo.seeds", "zo.values", "zo.blocks"


def derive_seed(*parts: int | str) -> int:
    """A uint64 from integers and strings, the same everywhere (blake2b, not Python's salted hash)."""
    h = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class ZeroOrderSpec:
    """Settings a zero-order run shares between server and devices."""

    learning_rate: float = 1e-4   # of the local steps and of the server's step (FedKSeed applies the same)
    eps: float = 1e-3
    perturbations: int = 1        # directions per step (FedSPZO: of the first block)
    pool_size: int = 0            # FedKSeed's K; 0: a fresh seed for every direction
    pool_seed: int = 0
    second_block: tuple[str, ...] = ()  # FedSPZO: tensor-name prefixes of the second block
    second_perturbations: int = 0       # FedSPZO: P2
    weight_decay: float = 0.0           # of the local steps; the round's step decays the weights the same
    weighted_seeds: bool = False        # FedKSeed-Pro: sample pool seeds by their past gradients
    seed_weights: bytes = b""           # ... this round's scores, one byte a pool seed (set in tasks)

    def validate(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"zero-order learning_rate must be positive, got {self.learning_rate}")
        if not (math.isfinite(self.eps) and 0 < self.eps < 1):
            raise ValueError(f"zo_eps must be in (0, 1), got {self.eps}")
        if not 1 <= self.perturbations <= MAX_PERTURBATIONS:
            raise ValueError(f"zo_perturbations must be 1..{MAX_PERTURBATIONS}, got {self.perturbations}")
        if not 0 <= self.pool_size <= MAX_POOL:
            raise ValueError(f"zo_pool_size must be 0..{MAX_POOL}, got {self.pool_size}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.learning_rate * self.weight_decay < 1):
            raise ValueError(f"weight_decay {self.weight_decay} with learning_rate {self.learning_rate}: "
                             f"learning_rate x weight_decay must be in [0, 1)")
        if self.weighted_seeds and not self.pool_size:
            raise ValueError("weighted seeds (FedKSeed-Pro) need a seed pool: method 'fedkseed'")
        if self.seed_weights and len(self.seed_weights) != self.pool_size:
            raise ValueError(f"{len(self.seed_weights)} seed weights for a pool of {self.pool_size}")
        if self.second_block and not 1 <= self.second_perturbations <= MAX_PERTURBATIONS:
            raise ValueError(f"zo_second_perturbations must be 1..{MAX_PERTURBATIONS}, got "
                             f"{self.second_perturbations}")

    def to_proto(self, z: pb.ZeroOrderSettings) -> None:
        z.eps, z.perturbations, z.pool_size, z.pool_seed = self.eps, self.perturbations, self.pool_size, self.pool_seed
        z.second_perturbations = self.second_perturbations
        z.second_block[:] = list(self.second_block)
        z.seed_weights = self.seed_weights
        z.directions = directions.SCHEME

    @classmethod
    def from_proto(cls, training: pb.TrainingSettings) -> ZeroOrderSpec:
        z = training.zero_order
        if z.directions != directions.SCHEME:
            raise ValueError(f"the task's directions are {z.directions or 'unnamed'!r}, this device generates "
                             f"{directions.SCHEME!r}: update fedtune on the device or the server")
        return cls(learning_rate=training.learning_rate, weight_decay=training.weight_decay, eps=z.eps,
                   perturbations=z.perturbations,
                   pool_size=z.pool_size, pool_seed=z.pool_seed, second_block=tuple(z.second_block),
                   second_perturbations=z.second_perturbations, weighted_seeds=bool(z.seed_weights),
                   seed_weights=z.seed_weights)


# ------------------------------------------------------------------ the update
@dataclass
class SeedPairs:
    """An update or a round's steps: parallel lists of seeds (or pool indices), values and blocks."""

    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    steps: int = 0
    scale: float = 1.0  # a round's steps: the weights are multiplied by this first (weight decay)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The form a device keeps on disk (uint64 seeds stored bit for bit as int64)."""
        seeds = [s - (1 << 64) if s >= 1 << 63 else s for s in self.seeds]
        return {SEEDS: torch.tensor(seeds, dtype=torch.int64), VALUES: torch.tensor(self.values, dtype=torch.float32),
                BLOCKS: torch.tensor(self.blocks, dtype=torch.int64), "zo.steps": torch.tensor([self.steps])}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor]) -> SeedPairs:
        return cls([s & ((1 << 64) - 1) for s in t[SEEDS].tolist()], t[VALUES].tolist(), t[BLOCKS].tolist(),
                   int(t["zo.steps"][0]))

    def to_proto(self, msg: pb.SeedUpdate) -> None:
        msg.seeds[:] = self.seeds
        msg.values[:] = self.values
        msg.blocks[:] = self.blocks if any(self.blocks) else []
        msg.steps = self.steps

    @classmethod
    def from_proto(cls, msg: pb.SeedUpdate) -> SeedPairs:
        return cls(list(msg.seeds), list(msg.values), list(msg.blocks) or [WHOLE] * len(msg.seeds), msg.steps)

    def digest(self) -> str:
        h = hashlib.sha256()
        for s, v, b in zip(self.seeds, self.values, self.blocks):
            h.update(f"{s}:{float(v).hex()}:{b};".encode())
        return "sha256:" + h.hexdigest()


def block_numels(state: Mapping[str, torch.Tensor], second_block: tuple[str, ...]) -> dict[int, int]:
    """Elements each block's directions move."""
    from fedcore.wire import unique_tensors

    second = sum(e.tensor.numel() for e in unique_tensors(state)
                 if e.tensor.is_floating_point() and second_block and e.name.startswith(second_block))
    total = sum(e.tensor.numel() for e in unique_tensors(state) if e.tensor.is_floating_point())
    return {WHOLE: total, FIRST: total - second, SECOND: second}


# ------------------------------------------------------------------ the methods
@dataclass(frozen=True)
class ZeroOrderMethod(Method):
    """The seam's answers every zero-order method shares; subclasses set where seeds come from."""

    spec: ZeroOrderSpec = ZeroOrderSpec()
    update_form: ClassVar[str] = "seeds"
    backpropagates: ClassVar[bool] = False  # forward passes only, perturbing in place
    summary_note: ClassVar[str] = " (seed, scalar) pairs"
    #: the blocks an update of this method may name
    blocks_allowed: ClassVar[tuple[int, ...]] = (WHOLE,)

    def validate(self) -> None:
        self.spec.validate()

    def check_transfers(self, download_payload: str, download_encoding: str) -> None:
        if download_encoding != "fp32":
            raise ValueError(f"{self.name}: devices catch up by replaying seeds onto the exact model they hold; a "
                             f"{download_encoding} download is not exact, so set download_encoding = 'fp32'")
        if download_payload != "weights":
            raise ValueError(f"{self.name}: a device holding a version replays the seeds of later rounds (a few KB) "
                             f"instead of broadcast deltas: set download_payload = 'weights'")

    def to_task(self, training: pb.TrainingSettings) -> None:
        training.method = self.name
        training.learning_rate, training.weight_decay = self.spec.learning_rate, self.spec.weight_decay
        self.spec.to_proto(training.zero_order)

    @classmethod
    def from_task(cls, training: pb.TrainingSettings) -> ZeroOrderMethod:
        return cls(ZeroOrderSpec.from_proto(training))

    def summary_fields(self) -> dict[str, str]:
        return {"zero_order": self.describe()}

    # ----------------------------------------------------------- seeds
    def direction_seed(self, key: int) -> int:
        """The direction seed of an update's key (a pool index for FedKSeed, else the seed itself)."""
        return key

    def check_pairs(self, pairs: SeedPairs, max_steps: int) -> None:
        """UpdateInvalid for an update no honest device of this task sends."""
        n = len(pairs.seeds)
        if len(pairs.values) != n or len(pairs.blocks) != n:
            raise UpdateInvalid(f"{n} seeds, {len(pairs.values)} values and {len(pairs.blocks)} blocks: the lists "
                                f"must be parallel")
        if not 0 < pairs.steps <= max_steps:
            raise UpdateInvalid(f"the update says {pairs.steps} local steps; its task allows 1 to {max_steps}")
        most = min(MAX_PAIRS, pairs.steps * self.directions_per_step())
        if n > most:
            raise UpdateInvalid(f"{n} (seed, value) pairs for {pairs.steps} steps; at most {most}")
        bad = next((b for b in pairs.blocks if b not in self.blocks_allowed), None)
        if bad is not None:
            raise UpdateInvalid(f"block {bad} is not a block of {self.name} (allowed: {self.blocks_allowed})")
        if not all(math.isfinite(v) for v in pairs.values):
            raise UpdateInvalid("a projected gradient is NaN or infinite")
        if len(set(zip(pairs.seeds, pairs.blocks))) != n:
            raise UpdateInvalid("a seed appears twice in one block: a device sums the values of a repeated seed")

    def directions_per_step(self) -> int:
        return self.spec.perturbations

    def round_settings(self, history: Sequence[SeedPairs]) -> ZeroOrderMethod:
        """The method as this round's tasks carry it, given every earlier round's steps (default: as it is)."""
        return self

    def update_norm(self, pairs: SeedPairs, state: Mapping[str, torch.Tensor]) -> float:
        """The L2 norm of the local move -lr sum v z (Rademacher directions are near-orthogonal: |z|^2 = d), the
        quantity max_update_norm bounds for tensor updates."""
        lr, numels = self.spec.learning_rate, block_numels(state, self.spec.second_block)
        return lr * math.sqrt(sum(v * v * numels[b] for v, b in zip(pairs.values, pairs.blocks)))

    def decay(self, steps: int) -> float:
        """What `steps` local steps' weight decay multiplied the weights by."""
        return (1.0 - self.spec.learning_rate * self.spec.weight_decay) ** steps

    def round_steps(self, mean: Mapping[tuple[int, int], float], scale: float = 1.0) -> SeedPairs:
        """The round's steps from the mean value per (block, key): direction seeds, fp32 steps, in a fixed order;
        `scale` the mean decay of the devices' weights."""
        out = SeedPairs(scale=float(torch.tensor(scale, dtype=torch.float32)))
        for (block, key) in sorted(mean):
            out.seeds.append(self.direction_seed(key))
            out.values.append(float(torch.tensor(-self.spec.learning_rate * mean[(block, key)], dtype=torch.float32)))
            out.blocks.append(block)
        return out

    # ----------------------------------------------------------- device
    def bind(self, model: torch.nn.Module) -> Trainee:
        for p in model.parameters():
            p.requires_grad_(False)  # forward passes only: autograd keeps nothing
        return ZeroOrderTrainee(self, model)

    def estimator(self, task_seed: int) -> Estimator:
        raise NotImplementedError


def in_block(name: str, block: int, second_block: tuple[str, ...]) -> bool:
    """Whether a direction of `block` moves tensor `name`."""
    if block == WHOLE:
        return True
    return name.startswith(second_block) == (block == SECOND)


def apply_steps(state: Mapping[str, torch.Tensor], pairs: SeedPairs, second_block: Sequence[str]) -> None:
    """Add a round's steps to `state` in place (each tensor once, tied ones under their first name)."""
    from fedcore.wire import unique_tensors

    second = tuple(second_block)
    directions.combined_step([(e.name, e.tensor) for e in unique_tensors(state) if e.tensor.is_floating_point()],
                             list(zip(pairs.seeds, pairs.values, pairs.blocks)),
                             lambda name, block: in_block(name, block, second), scale=pairs.scale)


#: rounds one replay may carry; further behind, the full model is cheaper to send than to replay
MAX_REPLAY_ROUNDS = 10_000


def replay(base: Mapping[str, torch.Tensor], msg: pb.SeedReplay, held_version: str) -> tuple[dict[str, torch.Tensor],
                                                                                               str]:
    """The model `msg` leads to from `base` (exactly `held_version`), on fresh tensors (a base mapped from a
    cache file stays as it is); (state, version). WireError "digest" when it does not end on that version."""
    from fedcore.wire import WireError, clone_tied, digest

    if msg.directions != directions.SCHEME:
        raise WireError("payload", f"the replay's directions are {msg.directions!r}, this device generates "
                                   f"{directions.SCHEME!r}")
    if msg.base_version != held_version:
        raise WireError("base", f"the replay starts from {msg.base_version[:19]}..., this device holds "
                                f"{held_version[:19]}...")
    if not 0 < len(msg.rounds) <= MAX_REPLAY_ROUNDS:
        raise WireError("payload", f"a replay of {len(msg.rounds)} rounds")
    state = clone_tied(base)
    for r in msg.rounds:
        pairs = SeedPairs(list(r.seeds), list(r.values), list(r.blocks) or [WHOLE] * len(r.seeds),
                          scale=r.scale or 1.0)
        if not len(pairs.values) == len(pairs.seeds) == len(pairs.blocks) or any(
                b not in (WHOLE, FIRST, SECOND) for b in pairs.blocks) or not all(map(math.isfinite, pairs.values)) \
                or not 0 < pairs.scale <= 1:
            raise WireError("payload", f"round {r.round} of the replay is malformed")
        apply_steps(state, pairs, tuple(msg.second_block))
    version = msg.rounds[-1].version
    got = digest(state)
    if got != version:
        raise WireError("digest", f"replaying {len(msg.rounds)} round(s) of seeds ended on {got[:19]}..., not "
                                  f"{version[:19]}...")
    return state, version


# ------------------------------------------------------------------ the device's step
def perturbed(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors a direction moves, in a fixed order, tied ones once under their first name (as the
    server's state lists them)."""
    return [(n, p.data) for n, p in model.named_parameters() if p.is_floating_point()]


@dataclass
class StepCost:
    """One zero-order step: seconds in forward passes and in perturbing, and the forward passes per block."""

    forward_s: float = 0.0
    perturb_s: float = 0.0
    first_forwards: int = 0   # forward passes through the first block (the encoder)
    second_forwards: int = 0  # ... through the second block (the decoder and lm_head)


def t5_loss(model: torch.nn.Module, batch: Batch, encoder_out: torch.Tensor | None = None) -> float:
    """Mean token cross-entropy of `batch`; with `encoder_out` the encoder is not run again."""
    kwargs = {"encoder_outputs": (encoder_out,)} if encoder_out is not None else {"input_ids": batch.input_ids}
    logits = model(attention_mask=batch.attention_mask, decoder_input_ids=model._shift_right(batch.labels),
                   use_cache=False, **kwargs).logits
    return float(F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch.labels.view(-1),
                                 ignore_index=IGNORE_INDEX))


class Estimator:
    """A device's zero-order steps for one task: picks seeds, estimates, moves the model, sums the pairs."""

    def __init__(self, method: ZeroOrderMethod, task_seed: int) -> None:
        self.method, self.spec = method, method.spec
        self.rng = random.Random(task_seed)
        self.task_seed = task_seed
        self.sums: dict[tuple[int, int], float] = {}  # (block, key) -> summed value
        self.steps = 0

    def fresh_seed(self, *where: int) -> int:
        return derive_seed(self.task_seed, self.steps, *where)

    def note(self, block: int, key: int, value: float) -> None:
        self.sums[(block, key)] = self.sums.get((block, key), 0.0) + value

    def pairs(self) -> SeedPairs:
        keys = list(self.sums)  # first use order: the device's own, the server sorts
        return SeedPairs([k for _, k in keys], [float(self.sums[k]) for k in keys], [b for b, _ in keys], self.steps)

    def step(self, model: torch.nn.Module, params: list[tuple[str, torch.Tensor]], batch: Batch,
             sync: Callable[[], None]) -> tuple[float, StepCost]:
        """One step on `batch`: (loss at the unperturbed model, or the mean of the perturbed ones; cost)."""
        raise NotImplementedError

    @staticmethod
    def timed(cost: StepCost, what: str, sync: Callable[[], None], fn: Callable[[], float | None]) -> float | None:
        t0 = time.perf_counter()
        out = fn()
        sync()
        setattr(cost, what, getattr(cost, what) + time.perf_counter() - t0)
        return out

    def end_step(self, params: list[tuple[str, torch.Tensor]], cost: StepCost, sync: Callable[[], None]) -> None:
        """Weight decay (theta -= lr wd theta, as MeZO's step), then count the step."""
        factor = 1.0 - self.spec.learning_rate * self.spec.weight_decay
        if factor != 1.0:
            def decay() -> None:
                for _, t in params:
                    t.mul_(factor)
            self.timed(cost, "perturb_s", sync, decay)
        self.steps += 1


class ZeroOrderTrainee(Trainee):
    """The model as a zero-order method trains it: every weight, forward passes only."""

    weight_grads: ClassVar[bool] = False

    def __init__(self, method: ZeroOrderMethod, model: torch.nn.Module) -> None:
        super().__init__(method, model)
        self.estimator: Estimator | None = None

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def start(self, task_seed: int) -> Estimator:
        """A fresh estimator for a task (its seeds follow from the task's seed)."""
        assert isinstance(self.method, ZeroOrderMethod)
        self.estimator = self.method.estimator(task_seed)
        return self.estimator

    def update_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        assert self.estimator is not None, "update_state before training"
        t = self.estimator.pairs().to_tensors()
        return t, {k: [] for k in t}

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"{self.method.describe()}: {n:,} parameters train with forward passes only"


class TwoPointEstimator(Estimator):
    """MeZO's step (Malladi et al. 2023): P directions of the whole model, each scored at theta +/- eps z."""

    def key(self, j: int) -> int:
        """The update's key of this step's j-th direction."""
        raise NotImplementedError

    def step(self, model: torch.nn.Module, params: list[tuple[str, torch.Tensor]], batch: Batch,
             sync: Callable[[], None]) -> tuple[float, StepCost]:
        cost, eps, lr, n = StepCost(), self.spec.eps, self.spec.learning_rate, self.spec.perturbations
        losses: list[float] = []
        found: list[tuple[int, int, float]] = []
        for j in range(n):
            key = self.key(j)
            seed = self.method.direction_seed(key)
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(params, seed, eps))
            plus = self.timed(cost, "forward_s", sync, lambda: t5_loss(model, batch))
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(params, seed, -2 * eps))
            minus = self.timed(cost, "forward_s", sync, lambda: t5_loss(model, batch))
            g = (plus - minus) / (2 * eps) / n
            # The last direction's restore and the steps of all of them in as few passes as possible.
            back = eps - lr * g if j == n - 1 else eps
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(params, seed, back))
            found.append((key, seed, g))
            losses += [plus, minus]
        for key, seed, g in found[:-1]:
            self.timed(cost, "perturb_s", sync, lambda: directions.perturb(params, seed, -lr * g))
        for key, _, g in found:
            self.note(WHOLE, key, g)
        self.end_step(params, cost, sync)
        cost.first_forwards = cost.second_forwards = 2 * n
        return sum(losses) / len(losses), cost

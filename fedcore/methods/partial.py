"""Methods that give each device its own part of the model to train: a TrainPlan per device and round.

A plan names the tensors a device trains, each whole or only some of its
attention heads (a `Part`); everything else stays frozen on the device
(no gradient, no optimizer state, no upload). The update carries exactly
the plan's tensors, a sliced one as its heads' slices (fedcore.heads), and
the server averages every tensor, and every head's slice, over the devices
that trained it (fedserver.strategy.RunningMean with a plan).

Two methods plan differently and share the rest:
`fedcore.methods.layerwise` (CAFF: as many output-side layers as a
device's memory, FLOP and upload budgets allow) and `fedcore.methods.smha`
(a fraction of the heads of every attention block). Planning runs on the
server (`PartialMethod.plan`), from the budgets devices state at Join.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import torch

from fedcore import heads as headlib
from fedcore.flops import T5Shape
from fedcore.wire import unique_tensors

from .base import Method, Trainee, UpdateInvalid

if TYPE_CHECKING:
    from fedtune.v1 import fedtune_pb2 as pb

# No T5 has more attention heads than this; a plan naming more is malformed.
MAX_HEADS = 4096


@dataclass(frozen=True)
class Part:
    """What of one tensor a device trains: the whole tensor (head_size 0) or some heads along `axis`."""

    axis: int = 0
    head_size: int = 0
    heads: tuple[int, ...] = ()

    @property
    def whole(self) -> bool:
        return self.head_size == 0

    def shape(self, full: Sequence[int]) -> tuple[int, ...]:
        """The shape of the update's tensor for a tensor of shape `full`."""
        if self.whole:
            return tuple(full)
        out = list(full)
        out[self.axis] = len(self.heads) * self.head_size
        return tuple(out)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.whole else headlib.gather(t, self.axis, self.head_size, self.heads)

    def index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The positions along the head axis this part trains, in the update's order."""
        return headlib.part_index(self.head_size, self.heads).to(device)

    def check(self, name: str, full: Sequence[int]) -> None:
        """ValueError for a part that does not fit a tensor of shape `full`."""
        if self.whole:
            return
        if self.axis not in (0, 1) or self.axis >= len(full):
            raise ValueError(f"plan for {name}: head axis {self.axis} does not exist in shape {tuple(full)}")
        n = full[self.axis] // self.head_size if self.head_size else 0
        if self.head_size <= 0 or n * self.head_size != full[self.axis] or n > MAX_HEADS:
            raise ValueError(f"plan for {name}: heads of {self.head_size} do not divide axis {self.axis} "
                             f"of shape {tuple(full)}")
        if not self.heads or list(self.heads) != sorted(set(self.heads)) or self.heads[-1] >= n:
            raise ValueError(f"plan for {name}: heads {list(self.heads)[:8]} are not distinct, ascending and "
                             f"below {n}")

    def describe(self, full_heads: int) -> str:
        return "whole" if self.whole else f"{len(self.heads)}/{full_heads} heads"


WHOLE = Part()


@dataclass(frozen=True)
class Plan:
    """What one device trains in one round: canonical tensor name -> Part, in state order."""

    parts: tuple[tuple[str, Part], ...]
    note: str = field(default="", compare=False)  # why the planner chose it, for logs and round records
    index: dict[str, Part] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", dict(self.parts))

    @classmethod
    def of(cls, parts: Mapping[str, Part], note: str = "") -> Plan:
        return cls(tuple(parts.items()), note)

    @classmethod
    def whole(cls, names: Sequence[str], note: str = "") -> Plan:
        return cls(tuple((n, WHOLE) for n in names), note)

    def names(self) -> list[str]:
        return [n for n, _ in self.parts]

    def __len__(self) -> int:
        return len(self.parts)

    def layout(self, full: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
               ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The layout an update following this plan has (fedcore.wire.check_manifest's `expect`)."""
        return {n: (full[n][0], p.shape(full[n][1])) for n, p in self.parts}

    def check(self, full: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        """ValueError for a plan that does not fit a model of this layout."""
        if not self.parts:
            raise ValueError("the plan trains nothing")
        for n, p in self.parts:
            if n not in full:
                raise ValueError(f"the plan names {n!r}, which is not a tensor of the model")
            p.check(n, full[n][1])

    def gather(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The plan's tensors (sliced ones gathered) of a full state."""
        return {n: p.gather(state[n]) for n, p in self.parts}

    def to_proto(self, msg: pb.TrainPlan) -> None:
        for n, p in self.parts:
            msg.tensors.add(name=n, axis=p.axis, head_size=p.head_size, heads=list(p.heads))

    @classmethod
    def from_proto(cls, msg: pb.TrainPlan) -> Plan:
        parts = [(t.name, Part(t.axis, t.head_size, tuple(t.heads)) if t.head_size else WHOLE) for t in msg.tensors]
        if len({n for n, _ in parts}) != len(parts):
            raise ValueError("the task's plan lists a tensor twice")
        return cls(tuple(parts))

    def describe(self) -> str:
        whole = sum(1 for _, p in self.parts if p.whole)
        sliced = [p for _, p in self.parts if not p.whole]
        heads = f", {len(sliced)} sliced to {len(sliced[0].heads)} heads" if sliced else ""
        return f"{whole} tensors whole{heads}"


class PartialTrainee(Trainee):
    """A model training exactly its plan: whole tensors learn, sliced ones learn only their heads, the rest is
    frozen (requires_grad False: no gradient, no optimizer state, and backprop stops before frozen early layers)."""

    alters_model: ClassVar[bool] = True  # head slicing replaces Linear modules

    def __init__(self, method: PartialMethod, model: torch.nn.Module) -> None:
        super().__init__(method, model)
        plan = method.plan_
        if plan is None:
            raise ValueError(f"{method.describe()}: the task carries no plan of what to train")
        self.plan = plan
        entries = unique_tensors(model.state_dict())
        self.aliases = {e.name: list(e.aliases) for e in entries}
        plan.check({e.name: (e.tensor.dtype, tuple(e.tensor.shape)) for e in entries})
        trained = {n for n, p in plan.parts if p.whole}
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
        sliced = {n: (p.axis, p.head_size, p.heads) for n, p in plan.parts if not p.whole}
        self.sliced = headlib.slice_heads(model, sliced) if sliced else {}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        headlib.load_full_state(self.model, state)

    def update_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        full = headlib.full_state(self.model)
        out = {n: p.gather(full[n]).detach().to("cpu", copy=True) for n, p in self.plan.parts}
        return out, {n: self.aliases.get(n, []) for n in out}

    def update_base(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.plan.gather(base)

    def residual_key(self, name: str) -> str:
        p = self.plan.index[name]
        return name if p.whole else f"{name}@{p.axis}:{p.head_size}:{','.join(map(str, p.heads))}"

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return f"{self.method.describe()}: {self.plan.describe()}, {n:,} parameters train"


@dataclass(frozen=True)
class PartialMethod(Method):
    """The shared part of the plan methods: the task's plan, per-plan validation and update deltas."""

    #: the device's plan for this task (set on the device from the task; None on the server, which plans)
    plan_: Plan | None = field(default=None, compare=True)
    plans: ClassVar[bool] = True
    upload_hint: ClassVar[str] = " (an update carries exactly the tensors and heads of the device's TrainPlan)"

    def to_task(self, training: pb.TrainingSettings) -> None:
        super().to_task(training)
        if self.plan_ is not None:
            self.plan_.to_proto(training.plan)

    @classmethod
    def from_task(cls, training: pb.TrainingSettings) -> PartialMethod:
        # The plan is all a device needs: the planner's settings stay on the server.
        return cls(plan_=Plan.from_proto(training.plan) if training.plan.tensors else None)

    def with_plan(self, plan: Plan) -> PartialMethod:
        return replace(self, plan_=plan)

    def plan(self, devices: Sequence[DeviceBudget], ctx: PlanContext) -> dict[str, Plan]:
        """Each sampled device's plan for the round (every device of `devices` gets one)."""
        raise NotImplementedError

    def check_update(self, update: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor],
                     plan: Plan | None = None) -> None:
        if plan is None:
            return super().check_update(update, glob)
        extra = sorted(set(update) - set(plan.index))
        if extra:
            raise UpdateInvalid(f"tensor {extra[0]!r} is outside this device's plan ({plan.describe()})")
        missing = sorted(set(plan.index) - set(update))
        if missing:
            raise UpdateInvalid(f"the update lacks {missing[0]!r} of this device's plan ({plan.describe()})")
        for name, t in update.items():
            g, want = glob[name], plan.index[name].shape(glob[name].shape)
            if t.dtype != g.dtype or tuple(t.shape) != want:
                raise UpdateInvalid(f"{name}: {t.dtype} {tuple(t.shape)} does not match the plan's "
                                    f"{g.dtype} {want}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise UpdateInvalid(f"tensor {name} holds NaN or Inf")

    def update_delta(self, update: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor],
                     is_delta: bool, plan: Plan | None = None) -> dict[str, torch.Tensor]:
        if plan is None:
            return super().update_delta(update, glob, is_delta)
        return {k: (v.float() if is_delta else v.float() - plan.index[k].gather(glob[k]).float())
                for k, v in update.items() if v.is_floating_point()}

    def bind(self, model: torch.nn.Module) -> Trainee:
        return PartialTrainee(self, model)


@dataclass(frozen=True)
class DeviceBudget:
    """One sampled device as a planner sees it: its budgets (0: none) and this round's work."""

    device_id: str
    memory_bytes: int = 0
    compute_flops: float = 0.0
    upload_bytes: int = 0
    head_fraction: float = 0.0  # SMHA: the share of heads the device asks to train (0: the plan chooses)
    steps: int = 1  # local steps this round (the round policy's; samples / batch for a samples policy)
    batch_size: int = 1
    input_tokens: int = 512
    target_tokens: int = 95

    def fits(self, memory: int, flops_per_example: float, upload: int) -> str:
        """"" when a plan of this cost fits every budget, else the first budget it exceeds, in words."""
        if self.memory_bytes and memory > self.memory_bytes:
            return f"memory {memory / 2**20:.0f} MiB > budget {self.memory_bytes / 2**20:.0f} MiB"
        work = flops_per_example * self.batch_size * self.steps
        if self.compute_flops and work > self.compute_flops:
            return f"compute {work / 1e12:.2f} TFLOP > budget {self.compute_flops / 1e12:.2f} TFLOP"
        if self.upload_bytes and upload > self.upload_bytes:
            return f"upload {upload / 1e6:.1f} MB > budget {self.upload_bytes / 1e6:.1f} MB"
        return ""


@dataclass(frozen=True)
class PlanContext:
    """What a planner knows of the model and the round."""

    state: Mapping[str, torch.Tensor]  # the global state, canonical names (ties once)
    shape: T5Shape
    round_no: int
    seed: int
    upload_bytes: Callable[[Mapping[str, torch.Tensor]], int]  # wire bytes of an update of these tensors

    def numel(self) -> dict[str, int]:
        return {k: t.numel() for k, t in self.state.items()}

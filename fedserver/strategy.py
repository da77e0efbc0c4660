"""Server-side aggregation: a running weighted mean of client deltas and the
server optimizers that apply it (FedAvg, FedAdam, FedAdamW, FedYogi).

Notation follows Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2. Each round the clients return deltas ``x_i - x``; the server folds
them into ``Δ = Σ w_i (x_i - x) / Σ w_i`` with :class:`RunningMean` and then a
strategy turns ``Δ`` into the next global model.

Tied tensors: callers pass state dicts in which tied tensors appear once
(aliases removed, as on the wire). Nothing here knows about ties; a tie left in
would be averaged and updated twice.

All arithmetic is done in fp32 whatever the dtype of the global tensors, and
the optimizer moments are kept in fp32. A bf16 global model therefore loses
updates smaller than its resolution; keep the server's master copy in fp32 if
that matters.

This module must not import grpc: the round logic and tests use it directly.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

__all__ = [
    "UpdateMismatchError",
    "RunningMean",
    "ServerStrategy",
    "FedAvg",
    "FedAdam",
    "FedAdamW",
    "FedYogi",
    "STRATEGIES",
    "make_strategy",
]


class UpdateMismatchError(ValueError):
    """A client update or mean delta does not fit the model it is applied to."""


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0.0:
        raise ValueError(f"update weight must be a finite number >= 0, got {weight!r}")
    return w


def _float_names(state: Mapping[str, Tensor]) -> list[str]:
    return [k for k, t in state.items() if t.is_floating_point()]


class RunningMean:
    """Weighted running sum of client deltas, folded one update at a time.

    Memory is one fp32 accumulator per floating-point tensor of ``template``,
    independent of the number of clients. Non-float tensors of the template
    (integer buffers) are not averaged; deltas for them are ignored.

    Two ways to fold an update:

    * ``add(delta, weight)`` folds a whole update at once; it validates every
      tensor (names, shapes, dtypes, finiteness) before touching the sum, so a
      rejected update leaves the aggregate unchanged.
    * ``add_slice(name, offset, values, weight)`` folds a chunk as it arrives,
      in any order; ``finish_update()`` then checks that every float tensor was
      covered exactly once and counts the update. A slice that is rejected, or
      an update that is never finished, leaves a partial sum that cannot be
      undone: ``mean()`` refuses while an update is pending. Fold only verified
      chunks, or discard this aggregate if a client vanishes mid-update.
    """

    def __init__(self, template: Mapping[str, Tensor]) -> None:
        self._acc: dict[str, Tensor] = {}
        self._ignored: set[str] = set()
        for name, t in template.items():
            if t.is_floating_point():
                self._acc[name] = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
            else:
                self._ignored.add(name)
        self._count = 0
        self._total_weight = 0.0
        # Pending chunked update: its weight and, per tensor, sorted disjoint
        # [start, end) intervals already folded (to catch gaps and overlaps).
        self._pending_weight: float | None = None
        self._covered: dict[str, list[list[int]]] = {}
        # Partial updates (plans): per tensor, the weight that covered each head (or the whole tensor, one
        # element), and the axis its heads lie along.
        self._cover: dict[str, Tensor] = {}
        self._axes: dict[str, int] = {}

    @property
    def count(self) -> int:
        """Number of complete updates folded."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights of complete updates folded."""
        return self._total_weight

    @property
    def names(self) -> list[str]:
        """Names of the averaged (floating-point) tensors, in template order."""
        return list(self._acc)

    @property
    def pending(self) -> bool:
        """True while a chunked update has slices folded but is not finished."""
        return self._pending_weight is not None

    def _check_tensor(self, name: str, t: Tensor, *, who: str) -> None:
        if not t.is_floating_point():
            raise UpdateMismatchError(
                f"{who}: tensor {name!r} has dtype {t.dtype}, expected a floating-point delta"
            )
        if not bool(torch.isfinite(t).all()):
            raise UpdateMismatchError(f"{who}: tensor {name!r} contains NaN or Inf")

    def add(self, delta: Mapping[str, Tensor], weight: float, plan: Any = None) -> None:
        """Fold ``weight * delta`` into the sum (validated first, then applied).

        With a ``plan`` (fedcore.methods.partial.Plan) the update holds only
        the plan's tensors, a sliced one as its heads' slices: each tensor,
        and each head's slice, is then averaged over the updates that hold it.
        """
        w = _check_weight(weight)
        if self.pending:
            raise RuntimeError("add() called while a chunked update is pending; call finish_update()")
        if plan is not None:
            self._add_part(delta, w, plan)
            return
        unknown = [k for k in delta if k not in self._acc and k not in self._ignored]
        if unknown:
            raise UpdateMismatchError(f"update has tensors not in the model: {unknown[:5]}")
        missing = [k for k in self._acc if k not in delta]
        if missing:
            raise UpdateMismatchError(
                f"update lacks {len(missing)} float tensor(s) of the model, e.g. {missing[:5]}"
            )
        for name, acc in self._acc.items():
            t = delta[name]
            if tuple(t.shape) != tuple(acc.shape):
                raise UpdateMismatchError(
                    f"update tensor {name!r} has shape {tuple(t.shape)}, "
                    f"model has {tuple(acc.shape)}"
                )
            self._check_tensor(name, t, who="update")
        for name, acc in self._acc.items():
            acc.add_(delta[name].to(device=acc.device, dtype=torch.float32), alpha=w)
        for name, cover in self._cover.items():
            cover.add_(w)  # a whole update covers every head of every tensor
        self._count += 1
        self._total_weight += w

    def _add_part(self, delta: Mapping[str, Tensor], w: float, plan: Any) -> None:
        unknown = [k for k in delta if k not in self._acc]
        if unknown:
            raise UpdateMismatchError(f"update has tensors not in the model: {unknown[:5]}")
        if set(delta) != set(plan.index):
            raise UpdateMismatchError(f"update tensors differ from its plan's: {sorted(set(delta) ^ set(plan.index))[:5]}")
        for name, t in delta.items():
            want = plan.index[name].shape(self._acc[name].shape)
            if tuple(t.shape) != want:
                raise UpdateMismatchError(f"update tensor {name!r} has shape {tuple(t.shape)}, its plan {want}")
            self._check_tensor(name, t, who="update")
        if not self._cover:
            # From the first partial update on, each tensor keeps the weight that covered each of its heads
            # (one number a head); what whole updates folded so far covered everything.
            for name, acc in self._acc.items():
                self._cover[name] = torch.full((1,), self._total_weight, dtype=torch.float64)
        for name, t in delta.items():
            part, acc = plan.index[name], self._acc[name]
            t32 = t.to(device=acc.device, dtype=torch.float32)
            cover = self._cover[name]
            if part.whole:
                acc.add_(t32, alpha=w)
                cover.add_(w)
                continue
            heads = acc.shape[part.axis] // part.head_size
            if cover.numel() != heads:
                cover = self._cover[name] = cover.expand(heads).clone()
            if self._axes.setdefault(name, part.axis) != part.axis:
                raise UpdateMismatchError(f"{name}: heads along axis {part.axis}, earlier updates' along "
                                          f"{self._axes[name]}")
            acc.index_add_(part.axis, part.index(acc.device), t32, alpha=w)
            cover[list(part.heads)] += w
        self._count += 1
        self._total_weight += w

    def add_slice(self, name: str, offset: int, values: Tensor, weight: float) -> None:
        """Fold ``weight * values`` into the flattened tensor ``name`` at ``[offset:offset+n]``."""
        w = _check_weight(weight)
        if name not in self._acc:
            what = "is not averaged (non-float)" if name in self._ignored else "is not in the model"
            raise UpdateMismatchError(f"slice for tensor {name!r}: it {what}")
        if self._pending_weight is not None and self._pending_weight != w:
            raise UpdateMismatchError(
                f"slice for {name!r} has weight {w}, but the pending update uses "
                f"{self._pending_weight}; finish_update() before starting another"
            )
        flat = self._acc[name].view(-1)
        vals = values.reshape(-1)
        n = vals.numel()
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise UpdateMismatchError(f"slice for {name!r}: offset must be an int, got {offset!r}")
        if offset < 0 or offset + n > flat.numel():
            raise UpdateMismatchError(
                f"slice for {name!r}: [{offset}:{offset + n}] is outside the tensor's "
                f"{flat.numel()} elements"
            )
        self._check_tensor(name, vals, who="slice")
        intervals = self._covered.setdefault(name, [])
        if n:
            self._insert_interval(name, intervals, offset, offset + n)
        flat[offset : offset + n].add_(vals.to(device=flat.device, dtype=torch.float32), alpha=w)
        self._pending_weight = w

    @staticmethod
    def _insert_interval(name: str, intervals: list[list[int]], start: int, end: int) -> None:
        i = bisect.bisect_left(intervals, [start, end])
        if (i > 0 and intervals[i - 1][1] > start) or (i < len(intervals) and intervals[i][0] < end):
            raise UpdateMismatchError(
                f"slice for {name!r}: [{start}:{end}] overlaps a slice already folded"
            )
        # Merge with neighbours so the list stays short for in-order streams.
        if i > 0 and intervals[i - 1][1] == start:
            intervals[i - 1][1] = end
            if i < len(intervals) and intervals[i][0] == end:
                intervals[i - 1][1] = intervals[i][1]
                del intervals[i]
        elif i < len(intervals) and intervals[i][0] == end:
            intervals[i][0] = start
        else:
            intervals.insert(i, [start, end])

    def finish_update(self) -> None:
        """Count the pending chunked update after checking every float tensor was fully covered."""
        if self._pending_weight is None:
            raise RuntimeError("finish_update() without any add_slice() for this update")
        incomplete = []
        for name, acc in self._acc.items():
            iv = self._covered.get(name, [])
            if acc.numel() and iv != [[0, acc.numel()]]:
                got = sum(e - s for s, e in iv)
                incomplete.append(f"{name} ({got}/{acc.numel()})")
        if incomplete:
            # The partial sum stays in place; it cannot be undone, so the
            # update stays pending and mean() keeps refusing.
            raise UpdateMismatchError(
                f"chunked update incomplete for {len(incomplete)} tensor(s), e.g. {incomplete[:3]}"
            )
        for cover in self._cover.values():
            cover.add_(self._pending_weight)
        self._count += 1
        self._total_weight += self._pending_weight
        self._pending_weight = None
        self._covered = {}

    def mean(self) -> dict[str, Tensor]:
        """The weighted mean ``Σ w_i Δ_i / Σ w_i`` as new fp32 tensors."""
        if self.pending:
            raise ValueError("mean() while a chunked update is pending (partial sum)")
        if self._count == 0:
            raise ValueError("mean() of a RunningMean with no updates")
        if self._total_weight <= 0.0:
            raise ValueError("mean() with total weight 0")
        if not self._cover:
            return {k: acc / self._total_weight for k, acc in self._acc.items()}
        out = {}
        for k, acc in self._acc.items():
            cover = self._cover[k]
            if cover.numel() == 1:
                out[k] = acc / float(cover) if float(cover) > 0 else torch.zeros_like(acc)
                continue
            shape = [1] * acc.dim()
            axis = self._axis_of(k, acc, cover)
            shape[axis] = cover.numel()
            per_head = torch.where(cover > 0, 1.0 / cover.clamp_min(1e-300), torch.zeros_like(cover)).float()
            rows = per_head.repeat_interleave(acc.shape[axis] // cover.numel()).view(
                [acc.shape[axis] if i == axis else 1 for i in range(acc.dim())])
            out[k] = acc * rows
        return out

    def covered(self) -> dict[str, Tensor | None]:
        """What the mean moves: tensor name -> None (all of it) or a bool mask along its head axis; a tensor no
        update held is absent. Without partial updates, every tensor."""
        if not self._cover:
            return {k: None for k in self._acc}
        out: dict[str, Tensor | None] = {}
        for k, cover in self._cover.items():
            if cover.numel() == 1:
                if float(cover) > 0:
                    out[k] = None
            elif bool((cover > 0).all()):
                out[k] = None
            elif bool((cover > 0).any()):
                acc = self._acc[k]
                axis = self._axis_of(k, acc, cover)
                mask = (cover > 0).repeat_interleave(acc.shape[axis] // cover.numel())
                out[k] = mask.view([acc.shape[axis] if i == axis else 1 for i in range(acc.dim())])
        return out

    def _axis_of(self, name: str, acc: Tensor, cover: Tensor) -> int:
        axis = self._axes.get(name)
        if axis is None:
            raise UpdateMismatchError(f"{name}: per-head weights without a head axis")
        return axis


class SeedMean:
    """Weighted running mean of a zero-order round's scalars, keyed by (block, seed), one update at a time.

    Memory is one float per distinct seed (FedKSeed: at most its pool);
    folded in device order, so the sums are reproducible.
    """

    def __init__(self) -> None:
        self._acc: dict[tuple[int, int], float] = {}
        self._count = 0
        self._total_weight = 0.0
        self._scale = 0.0  # weighted sum of what each device's weight decay multiplied its weights by

    @property
    def count(self) -> int:
        return self._count

    def add(self, values: Mapping[tuple[int, int], float], weight: float, scale: float = 1.0) -> None:
        """Fold one device's values with its FedAvg weight; `scale`: its weight decay's factor."""
        w = _check_weight(weight)
        if not all(math.isfinite(v) for v in values.values()) or not 0 < scale <= 1:
            raise UpdateMismatchError("update holds a NaN or infinite value, or a decay outside (0, 1]")
        for k, v in values.items():
            self._acc[k] = self._acc.get(k, 0.0) + w * v
        self._count += 1
        self._total_weight += w
        self._scale += w * scale

    def _check(self) -> None:
        if self._count == 0 or self._total_weight <= 0.0:
            raise ValueError("mean() of a SeedMean with no updates")

    def mean(self) -> dict[tuple[int, int], float]:
        self._check()
        return {k: v / self._total_weight for k, v in self._acc.items()}

    def scale(self) -> float:
        """The weighted mean decay factor (1.0: no weight decay)."""
        self._check()
        return self._scale / self._total_weight


class ServerStrategy(ABC):
    """Turns the mean client delta into the next global model.

    ``apply`` does not modify its arguments. It requires ``mean_delta`` to
    have exactly the floating-point tensors of ``global_state`` with the same
    shapes; non-float tensors are copied unchanged.
    """

    name: ClassVar[str] = ""
    step: int  # number of apply() calls so far; set by each dataclass

    @abstractmethod
    def _update(self, name: str, x: Tensor, delta: Tensor) -> Tensor:
        """Return the new fp32 value of one tensor; ``x`` and ``delta`` are fp32."""

    def _validate(self) -> None:
        """Check hyperparameters (overridden)."""

    def apply(self, global_state: Mapping[str, Tensor], mean_delta: Mapping[str, Tensor],
              covered: Mapping[str, Tensor | None] | None = None) -> dict[str, Tensor]:
        """Return the new global state (float tensors updated in fp32, cast back).

        ``covered`` (RunningMean.covered, after partial updates): only the
        tensors it names move, a masked one only where its mask is set; the
        optimizer moments of everything else stay as they were.
        """
        floats = _float_names(global_state)
        missing = [k for k in floats if k not in mean_delta]
        extra = [k for k in mean_delta if k not in global_state or not global_state[k].is_floating_point()]
        if missing or extra:
            raise UpdateMismatchError(
                f"{self.name}: mean delta does not match the model's float tensors "
                f"(missing {missing[:5]}, unexpected {extra[:5]})"
            )
        for k in floats:
            d = mean_delta[k]
            if tuple(d.shape) != tuple(global_state[k].shape):
                raise UpdateMismatchError(
                    f"{self.name}: delta {k!r} has shape {tuple(d.shape)}, "
                    f"model has {tuple(global_state[k].shape)}"
                )
            if not d.is_floating_point():
                raise UpdateMismatchError(f"{self.name}: delta {k!r} has non-float dtype {d.dtype}")
        self._check_moments(global_state, floats)
        out: dict[str, Tensor] = {}
        for k, x in global_state.items():
            if not x.is_floating_point():
                out[k] = x.clone()
                continue
            if covered is not None and k not in covered:
                out[k] = x  # no update trained it: neither it nor its moments move
                continue
            mask = covered.get(k) if covered is not None else None
            kept = [t.clone() for t in self._moments(k)] if mask is not None else []
            # copy=True: an fp32 input must not be updated in place.
            x32 = x.to(dtype=torch.float32, copy=True)
            d32 = mean_delta[k].to(device=x.device, dtype=torch.float32)
            new = self._update(k, x32, d32)
            if mask is not None:
                m = mask.to(x.device)
                new = torch.where(m, new, x.float())
                for now, before in zip(self._moments(k), kept):
                    now.copy_(torch.where(m, now, before))
            out[k] = new.to(x.dtype)
        self.step += 1
        return out

    def _check_moments(self, global_state: Mapping[str, Tensor], floats: list[str]) -> None:
        """Create or check optimizer moments (no-op for stateless strategies)."""

    def _moments(self, name: str) -> list[Tensor]:
        """The optimizer state of one tensor (none for stateless strategies)."""
        return []

    def params(self) -> dict[str, float]:
        """Hyperparameters, for logs and checkpoint metadata."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Tensor]:
        """Optimizer state: ``step`` plus ``m.<name>`` / ``v.<name>`` moments (fp32)."""
        return {"step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, d: Mapping[str, Tensor]) -> None:
        """Restore state saved by :meth:`state_dict` so the server continues exactly."""
        if "step" not in d:
            raise ValueError(f"{self.name}: optimizer state lacks 'step'")
        unexpected = [k for k in d if k != "step"]
        if unexpected:
            raise ValueError(f"{self.name}: unexpected optimizer state entries {unexpected[:5]}")
        self.step = int(d["step"])


@dataclass(eq=False)
class FedAvg(ServerStrategy):
    """x ← x + η Δ (η = 1 is plain FedAvg: the weighted mean of client models)."""

    server_lr: float = 1.0
    step: int = field(default=0, init=False, repr=False)
    name: ClassVar[str] = "fedavg"

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"{self.name}: server_lr must be > 0, got {self.server_lr!r}")

    def _update(self, name: str, x: Tensor, delta: Tensor) -> Tensor:
        return x.add_(delta, alpha=self.server_lr)


@dataclass(eq=False)
class FedAdam(ServerStrategy):
    """Adam on the server (Reddi et al. 2021, Alg. 2), without bias correction.

    m ← β1 m + (1−β1) Δ;  v ← β2 v + (1−β2) Δ²;  x ← x + η m / (√v + τ).
    The paper has no bias correction and neither do we; v starts at τ² (the
    paper asks v_{-1} ≥ τ²), m at 0. Moments are created on the first apply.
    """

    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    step: int = field(default=0, init=False, repr=False)
    _m: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)
    _v: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)
    name: ClassVar[str] = "fedadam"

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"{self.name}: server_lr must be > 0, got {self.server_lr!r}")
        for b in ("beta1", "beta2"):
            val = getattr(self, b)
            if not 0.0 <= val < 1.0:
                raise ValueError(f"{self.name}: {b} must be in [0, 1), got {val!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"{self.name}: tau must be > 0, got {self.tau!r}")

    def _check_moments(self, global_state: Mapping[str, Tensor], floats: list[str]) -> None:
        if not self._m:
            for k in floats:
                x = global_state[k]
                self._m[k] = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                self._v[k] = torch.full(x.shape, self.tau**2, dtype=torch.float32, device=x.device)
            return
        if set(self._m) != set(floats):
            raise UpdateMismatchError(
                f"{self.name}: model tensors differ from the optimizer state "
                f"(new {sorted(set(floats) - set(self._m))[:5]}, gone {sorted(set(self._m) - set(floats))[:5]})"
            )
        for k in floats:
            if tuple(self._m[k].shape) != tuple(global_state[k].shape):
                raise UpdateMismatchError(
                    f"{self.name}: tensor {k!r} has shape {tuple(global_state[k].shape)}, "
                    f"optimizer state has {tuple(self._m[k].shape)}"
                )
            # Moments loaded from a checkpoint live on the CPU; follow the model.
            if self._m[k].device != global_state[k].device:
                self._m[k] = self._m[k].to(global_state[k].device)
                self._v[k] = self._v[k].to(global_state[k].device)

    def _moments(self, name: str) -> list[Tensor]:
        return [self._m[name], self._v[name]]

    def _second_moment(self, v: Tensor, delta: Tensor) -> None:
        v.mul_(self.beta2).addcmul_(delta, delta, value=1.0 - self.beta2)

    def _decay(self, x: Tensor) -> Tensor:
        return x

    def _update(self, name: str, x: Tensor, delta: Tensor) -> Tensor:
        m, v = self._m[name], self._v[name]
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._second_moment(v, delta)
        x = self._decay(x)
        return x.addcdiv_(m, v.sqrt().add_(self.tau), value=self.server_lr)

    def state_dict(self) -> dict[str, Tensor]:
        d = super().state_dict()
        for k, t in self._m.items():
            d[f"m.{k}"] = t.clone()
        for k, t in self._v.items():
            d[f"v.{k}"] = t.clone()
        return d

    def load_state_dict(self, d: Mapping[str, Tensor]) -> None:
        if "step" not in d:
            raise ValueError(f"{self.name}: optimizer state lacks 'step'")
        m = {k[2:]: t for k, t in d.items() if k.startswith("m.")}
        v = {k[2:]: t for k, t in d.items() if k.startswith("v.")}
        other = [k for k in d if k != "step" and not k.startswith(("m.", "v."))]
        if other:
            raise ValueError(f"{self.name}: unexpected optimizer state entries {other[:5]}")
        if set(m) != set(v):
            raise ValueError(f"{self.name}: optimizer state has m and v for different tensors")
        for k in m:
            if m[k].shape != v[k].shape:
                raise ValueError(f"{self.name}: m and v shapes differ for {k!r}")
        self.step = int(d["step"])
        self._m = {k: t.to(torch.float32).clone() for k, t in m.items()}
        self._v = {k: v[k].to(torch.float32).clone() for k in m}


@dataclass(eq=False)
class FedAdamW(FedAdam):
    """FedAdam with decoupled weight decay (Loshchilov & Hutter).

    Order: the decay uses the pre-update x, as torch.optim.AdamW does:
    x ← x − η λ x + η m / (√v + τ)  =  (1 − η λ) x + η m / (√v + τ).
    It decays every float tensor (including norms and embeddings).
    """

    weight_decay: float = 1e-2
    name: ClassVar[str] = "fedadamw"

    def _validate(self) -> None:
        super()._validate()
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"{self.name}: weight_decay must be >= 0, got {self.weight_decay!r}")

    def _decay(self, x: Tensor) -> Tensor:
        return x.mul_(1.0 - self.server_lr * self.weight_decay)


@dataclass(eq=False)
class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment: v ← v − (1−β2) Δ² sign(v − Δ²).

    v stays positive when it starts positive (we start it at τ²).
    """

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: Tensor, delta: Tensor) -> None:
        d2 = delta * delta
        v.addcmul_(d2, torch.sign(v - d2), value=-(1.0 - self.beta2))


STRATEGIES: dict[str, type[ServerStrategy]] = {
    cls.name: cls for cls in (FedAvg, FedAdam, FedAdamW, FedYogi)
}


def make_strategy(name: str, **params: float) -> ServerStrategy:
    """Build a strategy by name ("fedavg", "fedadam", "fedadamw", "fedyogi"; any case)."""
    cls = STRATEGIES.get(str(name).strip().lower())
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    accepted = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = [p for p in params if p not in accepted]
    if unknown:
        raise ValueError(
            f"strategy {cls.name} does not take {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted)}"
        )
    return cls(**params)

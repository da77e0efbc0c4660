"""Attention-head slices of T5 weights, and Linears that train only some heads (SMHA).

Head h of a T5 attention module is rows [h*d_kv, (h+1)*d_kv) of its q, k and
v weights (axis 0) and the same columns of its o weight (axis 1).

`slice_heads` swaps such a Linear for a `HeadSlicedLinear` holding the
trained heads as one Parameter (`trained`) and the others as a frozen one
(`frozen`, requires_grad False): an optimizer over the requires_grad
parameters never sees the frozen heads, so weight decay cannot move them.
Its forward is one GEMM with the full weight (bit-identical outputs); its
backward computes the input gradient and the weight gradient of the trained
rows/columns only, so the frozen heads' weight-gradient GEMM is never run
(on CPU this beat two GEMMs whose outputs are cat-and-permuted or scattered
into place: those paid more for the copies than the smaller GEMM saved).
The module reads and writes its state under the original name and shape
(`<module>.weight`), so `model.state_dict()` / `load_state_dict()` of a
sliced model look like the plain model's; `full_state` / `load_full_state`
say so at call sites. `unslice_heads` puts plain Linears back.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ATTENTION_WEIGHT = re.compile(r"(?:^|\.)(?:SelfAttention|EncDecAttention)\.([qkvo])\.weight$")


def head_axis(name: str) -> int | None:
    """The axis a state-dict tensor's heads lie along: 0 for attention q/k/v weights, 1 for o, None otherwise."""
    m = _ATTENTION_WEIGHT.search(name)
    if m is None:
        return None
    return 1 if m.group(1) == "o" else 0


def part_index(size: int, parts: Sequence[int]) -> Tensor:
    """The positions along the head axis of heads `parts` (each `size` long), in the order given."""
    if not parts:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * size, (h + 1) * size) for h in parts])


def gather(t: Tensor, axis: int, size: int, parts: Sequence[int]) -> Tensor:
    """The slices of heads `parts` of `t` along `axis`, concatenated in the order given (a copy)."""
    return t.index_select(axis, part_index(size, parts).to(t.device))


def scatter(dest: Tensor, axis: int, size: int, parts: Sequence[int], values: Tensor) -> None:
    """Write `values` (shaped as `gather` returns them) into the heads `parts` of `dest`, in place."""
    dest.index_copy_(axis, part_index(size, parts).to(dest.device), values.to(dest.dtype))


def _slice_grad(gy: Tensor, x: Tensor, axis: int, index: Tensor) -> Tensor:
    """The weight gradient of the rows (axis 0) or columns (axis 1) `index` of a Linear's weight."""
    gy2 = gy.reshape(-1, gy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if axis == 0:
        return gy2.index_select(1, index).t() @ x2
    return gy2.t() @ x2.index_select(1, index)


class _HeadLinear(torch.autograd.Function):
    """y = x @ W^T with W assembled from its trained and frozen heads; weight gradients only where asked."""

    @staticmethod
    def forward(ctx, x: Tensor, trained: Tensor, frozen: Tensor, axis: int,  # type: ignore[override]
                trained_index: Tensor, frozen_index: Tensor) -> Tensor:
        w = assemble(trained, frozen, axis, trained_index, frozen_index)
        ctx.save_for_backward(x, w, trained_index, frozen_index)
        ctx.axis = axis
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, w, trained_index, frozen_index = ctx.saved_tensors
        gy = gy.to(w.dtype)  # under autocast the output (and so its gradient) may be of lower precision
        gx = (gy @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
        # The frozen slice normally needs no gradient: skipping its GEMM is the whole saving.
        g_tr = _slice_grad(gy, x.to(w.dtype), ctx.axis, trained_index) if ctx.needs_input_grad[1] else None
        g_fr = _slice_grad(gy, x.to(w.dtype), ctx.axis, frozen_index) if ctx.needs_input_grad[2] else None
        return gx, g_tr, g_fr, None, None, None


def assemble(trained: Tensor, frozen: Tensor, axis: int, trained_index: Tensor, frozen_index: Tensor) -> Tensor:
    """The full weight from its trained and frozen slices (a new tensor, original layout)."""
    shape = list(trained.shape)
    shape[axis] = trained_index.numel() + frozen_index.numel()
    w = trained.new_empty(shape)
    w.index_copy_(axis, trained_index, trained.detach())
    w.index_copy_(axis, frozen_index, frozen.detach())
    return w


class HeadSlicedLinear(nn.Module):
    """A bias-free Linear whose heads `parts` (sorted) train and whose other heads stay frozen."""

    def __init__(self, linear: nn.Linear, axis: int, size: int, parts: Sequence[int]) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("HeadSlicedLinear needs a Linear without bias (T5's attention has none)")
        if axis not in (0, 1):
            raise ValueError(f"head axis must be 0 or 1, got {axis}")
        w = linear.weight.detach()
        n = w.shape[axis] // size if size > 0 else 0
        if size <= 0 or n * size != w.shape[axis]:
            raise ValueError(f"heads of {size} do not divide axis {axis} of weight shape {tuple(w.shape)}")
        parts = tuple(int(h) for h in parts)
        if list(parts) != sorted(set(parts)) or (parts and not 0 <= parts[0] <= parts[-1] < n):
            raise ValueError(f"heads {list(parts)[:8]} are not distinct, ascending and below {n}")
        rest = tuple(h for h in range(n) if h not in set(parts))
        self.axis, self.size, self.parts = axis, size, parts
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.trained = nn.Parameter(gather(w, axis, size, parts), requires_grad=bool(parts))
        self.frozen = nn.Parameter(gather(w, axis, size, rest), requires_grad=False)
        # Not persistent: the state dict holds only `weight` (see _save_to_state_dict).
        self.register_buffer("trained_index", part_index(size, parts).to(w.device), persistent=False)
        self.register_buffer("frozen_index", part_index(size, rest).to(w.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # All heads or none: one plain Linear, nothing to split.
        if not self.frozen.numel():
            return F.linear(x, self.trained)
        if not self.trained.numel():
            return F.linear(x, self.frozen)
        return _HeadLinear.apply(x, self.trained, self.frozen, self.axis, self.trained_index, self.frozen_index)

    def weight(self) -> Tensor:
        """The full current weight (detached, a new tensor, the original Linear's layout)."""
        return assemble(self.trained, self.frozen, self.axis, self.trained_index, self.frozen_index)

    def load_weight(self, w: Tensor) -> None:
        """Split a full weight into the trained and frozen slices (in place)."""
        with torch.no_grad():
            self.trained.copy_(w.index_select(self.axis, self.trained_index.to(w.device)))
            self.frozen.copy_(w.index_select(self.axis, self.frozen_index.to(w.device)))

    def extra_repr(self) -> str:
        n = (self.trained_index.numel() + self.frozen_index.numel()) // self.size
        return (f"in_features={self.in_features}, out_features={self.out_features}, axis={self.axis}, "
                f"heads={list(self.parts)} of {n}")

    # The state dict speaks the plain Linear's language: `weight`, full shape.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key)
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        w = state_dict[key]
        full = (self.out_features, self.in_features)
        if tuple(w.shape) != full:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)} from "
                              f"checkpoint, the shape in current model is {full}.")
            return
        self.load_weight(w)


def slice_heads(model: nn.Module, parts: Mapping[str, tuple[int, int, Sequence[int]]]
                ) -> dict[str, HeadSlicedLinear]:
    """Replace, in place, each Linear whose weight is named in `parts` (state-dict name -> (axis, head size,
    sorted heads)) by a HeadSlicedLinear training those heads; returns name -> new module."""
    out: dict[str, HeadSlicedLinear] = {}
    for name, (axis, size, heads) in parts.items():
        if not name.endswith(".weight"):
            raise ValueError(f"{name!r} is not a weight's name")
        path = name[: -len(".weight")]
        linear = model.get_submodule(path)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{path} is a {type(linear).__name__}, not a plain Linear (slice it only once)")
        parent, _, attr = path.rpartition(".")
        sliced = HeadSlicedLinear(linear, axis, size, heads)
        setattr(model.get_submodule(parent) if parent else model, attr, sliced)
        out[name] = sliced
    return out


def unslice_heads(model: nn.Module) -> None:
    """Put plain Linears back, holding the current full weights (requires_grad if the module trained heads)."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, HeadSlicedLinear):
            continue
        # On the meta device: no random init of a weight that is replaced at once.
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(module.weight(), requires_grad=module.trained.requires_grad)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear)


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state in the plain model's names and shapes, sliced or not (sliced weights: new tensors)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_full_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a plain model's full state (strict) into a model, sliced or not; sliced weights are split."""
    model.load_state_dict(state, strict=True)

"""Update deltas: what a lossy encoding delivers, error feedback, and bit-reproducible application.

Both ends of a DELTA transfer call the same functions on the same decoded
values, so a server that applies a broadcast delta to its own model and a
device that applies the received one hold bit-identical tensors: elementwise
fp32 addition is correctly rounded, the same inputs give the same bits.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from . import quant
from .formats import wire_encoding


def as_received(t: torch.Tensor, encoding: int, block_size: int, chunk_elems: int) -> torch.Tensor:
    """The values a receiver decodes from `t` sent with this encoding (chunk by chunk, as StateEncoder slices it)."""
    enc = wire_encoding(encoding, t.dtype)
    flat = t.detach().reshape(-1).cpu()
    out = torch.empty_like(flat)
    for o in range(0, flat.numel(), chunk_elems):
        piece = flat[o:o + chunk_elems]
        raw, scales = quant.encode(piece, enc, block_size)
        out[o:o + piece.numel()].copy_(quant.decode(raw, scales, enc, t.dtype, piece.numel(), block_size))
    return out.view(t.shape)


def subtract(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """new - old in fp32 for float tensors; non-float tensors travel as their new value."""
    return {k: (v.detach().float() - old[k].detach().float()) if v.is_floating_point() else v
            for k, v in new.items()}


def apply_delta(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """base + delta in fp32, cast back to base's dtype; non-float entries of delta replace base's."""
    out: dict[str, torch.Tensor] = {}
    for k, b in base.items():
        d = delta[k]
        if b.is_floating_point():
            out[k] = (b.float() + d.to(device=b.device, dtype=torch.float32)).to(b.dtype)
        else:
            out[k] = d.to(device=b.device, dtype=b.dtype).clone()
    return out


class ErrorFeedback:
    """The residual of lossy delta encoding, added to the next delta (Seide et al. 2014; Karimireddy et al. 2019).

    Sent deltas then sum to the true deltas up to the last residual, which is
    at most one quantization step, instead of accumulating every round's
    error. Tensors are keyed by name; a residual whose shape no longer fits is
    dropped.
    """

    def __init__(self, residual: Mapping[str, torch.Tensor] | None = None) -> None:
        self.residual: dict[str, torch.Tensor] = dict(residual or {})

    def compensate(self, delta: Mapping[str, torch.Tensor], encoding: int, block_size: int, chunk_elems: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(to send, what the receiver will decode, the next residual). Commit the residual once sent."""
        send: dict[str, torch.Tensor] = {}
        received: dict[str, torch.Tensor] = {}
        residual: dict[str, torch.Tensor] = {}
        for k, d in delta.items():
            if not d.is_floating_point():
                send[k] = received[k] = d
                continue
            c = d.detach().float().cpu()
            r = self.residual.get(k)
            if r is not None and r.shape == c.shape:
                c = c + r
            got = as_received(c, encoding, block_size, chunk_elems)
            send[k], received[k], residual[k] = c, got, c - got
        return send, received, residual

    def commit(self, residual: Mapping[str, torch.Tensor]) -> None:
        self.residual = dict(residual)

    def norm(self) -> float:
        """L2 norm of the residual, for logs."""
        return float(sum(float(r.double().pow(2).sum()) for r in self.residual.values()) ** 0.5)

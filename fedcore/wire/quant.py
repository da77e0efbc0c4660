"""Element encodings: a 1-D float slice <-> (payload bytes, scales bytes).

Pure tensor arithmetic, no framing. INT8 is blockwise absmax (error at most
absmax/254 per block); NF4 is the 4-bit NormalFloat code of QLoRA (Dettmers
et al. 2023), blockwise absmax, two codes a byte, low nibble first. INT4 is
symmetric blockwise absmax 4-bit: levels -7..7 times absmax/7, stored as
level + 8 in a nibble; its levels are evenly spaced, which suits update deltas
(flatter than the bell-shaped weights NF4 is built for; see bench.codec --deltas).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from fedtune.v1 import fedtune_pb2 as pb

from .formats import WireError

NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
_F32_MAX = torch.finfo(torch.float32).max


def as_tensor(buf: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A read-only view of buf as a 1-D tensor (no copy)."""
    if len(buf) == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        # The view is only read (copied into its destination), never written.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Bytes of a contiguous CPU tensor in its own dtype."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.numpy().tobytes()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    n = x.numel()
    pad = (-n) % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, block_size)


def _absmax_scales(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.abs().amax(dim=1)


def encode(x: torch.Tensor, encoding: int, block_size: int) -> tuple[bytes, bytes]:
    """Encode a 1-D slice. Float encodings take any float dtype; RAW keeps x's dtype."""
    if encoding == pb.RAW:
        return tensor_bytes(x), b""
    if encoding == pb.FP32:
        return tensor_bytes(x.to(torch.float32)), b""
    if encoding == pb.FP16:
        return tensor_bytes(x.to(torch.float16)), b""
    if encoding == pb.BF16:
        return tensor_bytes(x.to(torch.bfloat16)), b""
    x = x.to(torch.float32)
    n = x.numel()
    blocks = _blocks(x, block_size)
    absmax = _absmax_scales(blocks)
    if encoding == pb.INT8:
        scale = absmax / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.view(-1)[:n].numpy().tobytes(), scale.numpy().tobytes()
    if encoding == pb.NF4:
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        idx = torch.bucketize(blocks / safe[:, None], _NF4_MIDPOINTS).to(torch.uint8)
        return _pack_nibbles(idx.view(-1)[:n]), absmax.numpy().tobytes()
    if encoding == pb.INT4:
        scale = absmax / 7.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[:, None]).clamp_(-7, 7).add_(8).to(torch.uint8)
        return _pack_nibbles(q.view(-1)[:n]), scale.numpy().tobytes()
    raise WireError("encoding", f"unknown encoding {encoding}")


def _pack_nibbles(idx: torch.Tensor) -> bytes:
    if idx.numel() % 2:
        idx = torch.nn.functional.pad(idx, (0, 1))
    return (idx[0::2] | (idx[1::2] << 4)).numpy().tobytes()


def _unpack_nibbles(payload: bytes, count: int) -> torch.Tensor:
    packed = as_tensor(payload, torch.uint8)
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:count].long()


def decode(payload: bytes, scales: bytes, encoding: int, dtype: torch.dtype, count: int,
           block_size: int) -> torch.Tensor:
    """Decode to a 1-D tensor of `count` elements (fp32 for quantized codes).

    The result may be a read-only view of payload: copy it before keeping it.
    """
    if encoding == pb.RAW:
        if dtype == torch.bool:
            b = np.frombuffer(payload, dtype=np.uint8)
            # Bytes other than 0/1 would make torch bools that are neither True nor False.
            if b.size and b.max() > 1:
                raise WireError("value", "bool payload holds bytes other than 0 and 1")
            return torch.from_numpy(b.astype(np.bool_))
        return as_tensor(payload, dtype)
    if encoding == pb.FP32:
        return as_tensor(payload, torch.float32)
    if encoding == pb.FP16:
        return as_tensor(payload, torch.float16)
    if encoding == pb.BF16:
        return as_tensor(payload, torch.bfloat16)
    scale = as_tensor(scales, torch.float32)
    if not torch.isfinite(scale).all():
        raise WireError("value", "NaN or Inf in the block scales")
    nblocks = scale.numel()
    if encoding == pb.INT8:
        q = as_tensor(payload, torch.int8).to(torch.float32)
    elif encoding == pb.NF4:
        q = NF4_LEVELS[_unpack_nibbles(payload, count)]
    elif encoding == pb.INT4:
        q = (_unpack_nibbles(payload, count) - 8).to(torch.float32)
    else:
        raise WireError("encoding", f"unknown encoding {encoding}")
    pad = nblocks * block_size - count
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    out = (q.view(nblocks, block_size) * scale[:, None]).view(-1)[:count]
    if encoding in (pb.INT8, pb.INT4):
        # absmax/127 rounds up at times, so 127 * scale can pass float32's max
        # for a block whose absmax is within an ulp of it: clamp it back.
        out.clamp_(-_F32_MAX, _F32_MAX)
    return out

"""Seeded random directions for zero-order training: the same bits on every machine, torch build and device.

A zero-order update is a list of (seed, scalar) pairs; server and devices
regenerate each direction z from its seed and must get identical bits, or a
replayed model would not match the version digest. Torch's own generators
do not promise that (CPU normal_ takes an AVX2 path on x86, CUDA uses
Philox), so the directions come from a counter-based integer hash written
in plain int64 tensor arithmetic, which every backend computes exactly:

- z is Rademacher (each element +1 or -1), one bit of a 32-bit hash word;
- the word for element i of tensor `name` under `seed` is
  lowbias32(lowbias32(i // 32 ^ k1) ^ k2), bit i % 32, where k1, k2 derive
  from the seed's two halves and the CRC-32 of the tensor's name (so a
  tensor's direction does not depend on which other tensors are perturbed);
- 32-bit products are split into 16-bit halves so no int64 overflows.

Rademacher also makes the arithmetic exact: z * c is +c or -c, so
`theta + z * c` is one correctly rounded fp32 addition on any hardware, with
or without fused multiply-add. Cost: about a dozen int64 operations per 32
elements plus a table lookup per byte (docs/explanation/zero-order.md has
the figures); tests/test_zeroorder.py pins the output by checksum.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence

import torch

SCHEME = "rademacher-lowbias32-v1"  # named in tasks' logs and docs; a change of scheme is a new name
_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers (C. Wellons, hash-prospector)
# At most this many elements are unpacked at once: bounds the int64 temporaries to 64 MiB per slice.
SLICE = 1 << 23


def _mix_int(x: int) -> int:
    """lowbias32 on a Python int (the per-tensor keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for int64 x in [0, 2**32), without any product reaching 2**63."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def tensor_keys(seed: int, name: str) -> tuple[int, int]:
    """The two 32-bit keys of `name`'s direction under `seed` (a uint64)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"direction seed {seed} is not a uint64")
    n = zlib.crc32(name.encode())
    k1 = _mix_int(_mix_int(seed & _MASK32) ^ n)
    k2 = _mix_int(_mix_int((seed >> 32) ^ 0x9E3779B9) ^ k1)
    return k1, k2


def direction(seed: int, name: str, numel: int, start: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements start..start+numel of `name`'s direction under `seed`: fp32 +1/-1, flat."""
    k1, k2 = tensor_keys(seed, name)
    first, last = start // 32, (start + numel + 31) // 32
    words = _mix(_mix(torch.arange(first, last, dtype=torch.int64, device=device) ^ k1) ^ k2)
    # Each byte of a word, low byte first, picks its 8 signs (bit j -> element j) from a table: 3x faster
    # than unpacking single bits.
    octets = ((words.unsqueeze(1) >> torch.tensor([0, 8, 16, 24], device=device)) & 255).reshape(-1)
    z = _signs(words.device).index_select(0, octets).reshape(-1)
    return z[start - 32 * first: start - 32 * first + numel]


_SIGNS: dict[torch.device, torch.Tensor] = {}


def _signs(device: torch.device) -> torch.Tensor:
    """256 x 8 table: row b holds +1/-1 for the bits of b, lowest bit first."""
    if device not in _SIGNS:
        bits = (torch.arange(256, dtype=torch.int64).unsqueeze(1) >> torch.arange(8)) & 1
        _SIGNS[device] = (bits.to(torch.float32) * 2 - 1).to(device)
    return _SIGNS[device]


def add_direction(t: torch.Tensor, name: str, seed: int, scale: float) -> None:
    """t += scale * z in place, slice by slice; `scale` is rounded to fp32 first, so every machine adds the
    same +/-scale."""
    c = float(torch.tensor(scale, dtype=torch.float32))
    flat = t.view(-1)
    for s in range(0, flat.numel(), SLICE):
        n = min(SLICE, flat.numel() - s)
        z = direction(seed, name, n, s, device=flat.device)
        flat[s:s + n].add_(z.mul_(c).to(flat.dtype))


def perturb(params: Sequence[tuple[str, torch.Tensor]], seed: int, scale: float) -> None:
    """Every (name, tensor) moved by scale * its direction under `seed`."""
    with torch.no_grad():
        for name, t in params:
            add_direction(t, name, seed, scale)


def combined_step(params: Iterable[tuple[str, torch.Tensor]], steps: Sequence[tuple[int, float, int]],
                  moves: Callable[[str, int], bool] | None = None, scale: float = 1.0) -> None:
    """Scale every tensor by `scale` (weight decay), then add sum_k value_k * z(seed_k), accumulated per tensor
    in fp32 in the order given.

    A step is (seed, value, block); `moves(name, block)` says whether the
    step's block holds the tensor (None: every step moves every tensor).
    Server and devices call this with the same steps in the same order, so
    both end on the same bits (a product and a sum of fp32 numbers are
    correctly rounded on every backend).
    """
    with torch.no_grad():
        for name, t in params:
            if scale != 1.0:
                t.mul_(float(torch.tensor(scale, dtype=torch.float32)))
            mine = [(seed, value) for seed, value, block in steps if moves is None or moves(name, block)]
            if not mine:
                continue
            acc = torch.zeros(t.numel(), dtype=torch.float32)
            for seed, value in mine:
                add_direction(acc, name, seed, value)
            t.view(-1).add_(acc.to(t.dtype).to(t.device))


def checksum(seed: int, name: str, numel: int) -> str:
    """sha256 of a direction's bytes, for the pin in the tests."""
    import hashlib
    return hashlib.sha256(direction(seed, name, numel).numpy().tobytes()).hexdigest()

"""Tensors backed by one flat file, mapped into memory.

Both ends stage model-sized state here instead of in RAM: a partial download
on the device, the update it still has to send, a partial or finished upload
on the server. Writes into the returned tensors land in the page cache, so
they survive a killed process (kill -9), and the kernel pages them in and
out: memory stays bounded whatever the model size. Tensors sit at 64-byte
aligned offsets in the order given, so a layout plus the file is all it takes
to map them again after a restart.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

ALIGN = 64

Layout = tuple[str, torch.dtype, tuple[int, ...]]


def _offsets(layout: Iterable[Layout]) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
    out = []
    pos = 0
    for name, dtype, shape in layout:
        n = 1
        for s in shape:
            n *= int(s)
        out.append((name, dtype, tuple(int(s) for s in shape), pos))
        pos += -(-n * torch.empty((), dtype=dtype).element_size() // ALIGN) * ALIGN
    return out, pos


def map_tensors(path: Path, layout: Iterable[Layout], create: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of `layout` mapped from `path`; `create` makes (or resizes) a zero-filled file."""
    placed, size = _offsets(layout)
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
    elif path.stat().st_size != size:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, the layout needs {size}")
    if size == 0:
        return {name: torch.empty(shape, dtype=dtype) for name, dtype, shape, _ in placed}
    raw = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, off in placed:
        nbytes = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            nbytes *= s
        out[name] = raw[off:off + nbytes].view(dtype).view(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return out


def write_tensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write `state` (canonical tensors, in order) to `path` tensor by tensor, then fsync."""
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    dest = map_tensors(path, layout, create=True)
    for k, v in state.items():
        dest[k].copy_(v.detach())
    del dest
    with open(path, "rb+") as f:
        os.fsync(f.fileno())

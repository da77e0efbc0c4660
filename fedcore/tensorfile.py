"""Tensors backed by one flat file, mapped into memory.

Both ends stage model-sized state here instead of in RAM: a partial download
on the device, the update it still has to send, a partial or finished upload
on the server. Writes into the returned tensors land in the page cache, so
they survive a killed process (kill -9), and the kernel pages them in and
out: memory stays bounded whatever the model size. Tensors sit at 64-byte
aligned offsets in the order given, so a layout plus the file is all it takes
to map them again after a restart.

A new file's blocks are reserved before it is mapped: a sparse file on a full
disk would fail only when a page is first written, as SIGBUS in whoever
writes it (the server or a daemon dies). Reserving turns that into one
DiskFullError up front.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

ALIGN = 64

Layout = tuple[str, torch.dtype, tuple[int, ...]]
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# posix_fallocate cannot reserve on this file system (glibc emulates it where the kernel lacks it): stay sparse.
_CANNOT_RESERVE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class DiskFullError(OSError):
    """A write found no space: errno ENOSPC (or EDQUOT), the path, the bytes needed and the bytes free.

    The one full-disk error of the project: staging files here, checkpoints
    and logs in fedserver.storage, the device's state dir.
    """

    def __init__(self, path: Path, needed: int, free: int | None, err: int = errno.ENOSPC, detail: str = "") -> None:
        room = f", {human_bytes(free)} free" if free is not None else ""
        super().__init__(err, f"no space left to write {path}: it needs {human_bytes(needed)}{room}"
                              + (f" ({detail})" if detail else ""), str(path))
        self.path, self.needed, self.free = Path(path), needed, free

    def __str__(self) -> str:
        return str(self.strerror)  # without OSError's "[Errno 28]" prefix: the message says it


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


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
    """The tensors of `layout` mapped from `path`; `create` makes a new zero-filled file, its space reserved.

    Raises DiskFullError (an OSError, errno ENOSPC) when the file system cannot hold the file.
    """
    placed, size = _offsets(layout)
    path = Path(path)
    if create:
        _create(path, size)
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


def _create(path: Path, size: int) -> None:
    """A new file of `size` zero bytes with its blocks allocated, or DiskFullError and no file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A new inode, not the old one truncated: a mapping of the old file (a superseded upload
        # stream still writing) keeps its pages instead of faulting on a file cut to 0 bytes.
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            _reserve(f.fileno(), size)
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        path.unlink(missing_ok=True)
        raise DiskFullError(path, size, _free_bytes(path.parent)) from None


def _reserve(fd: int, size: int) -> None:
    if size == 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)  # unlike ftruncate, fails with ENOSPC now
            return
        except OSError as exc:
            if exc.errno not in _CANNOT_RESERVE:
                raise
    os.ftruncate(fd, size)


def _free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use under `directory` (0 if it cannot be asked)."""
    for d in (directory, *directory.parents):
        try:
            st = os.statvfs(d)
            return st.f_bavail * st.f_frsize
        except OSError:
            continue
    return 0


def write_tensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Write `state` (canonical tensors, in order) to `path` tensor by tensor, then fsync."""
    layout = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    dest = map_tensors(path, layout, create=True)
    for k, v in state.items():
        dest[k].copy_(v.detach())
    del dest
    with open(path, "rb+") as f:
        os.fsync(f.fileno())

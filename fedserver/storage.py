"""Durable server state on disk: checkpoints, the round log, summary files.

Every file is written atomically (temp file in the same directory, fsync,
``os.replace``, fsync of the directory), so after a crash a reader sees either
the old or the new version, never a mix. The round log is append-only JSONL
and each record is durable once ``append`` returns.

Checkpoints are standard safetensors files, written by our own streaming
writer: tensor by tensor straight to the file, so no serialized copy of the
whole model is built in memory whatever the installed safetensors version.
Reading uses the safetensors library. Tensors that share storage (T5's tied
embedding) are stored once; the alias is recorded in the file's metadata and
the tie is restored on load.

Every checkpoint carries a SHA-256 digest of the whole file (its header with
the digest field zeroed, then every tensor's bytes) in its metadata, checked
before anything in it is used: the model, the server optimizer's moments, the
broadcast residual, LoRA's base weights and the round records alike. A file
written before the digest existed still loads, with a warning that it is
unverified; stripping the field is no easier than recomputing it, so the
digest guards against accidents (torn writes, bit rot, a stray ``dd``), not
against someone who may write the run directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, BinaryIO, Mapping

import torch
from torch import Tensor

from fedcore.tensorfile import DiskFullError

from .errors import StateMismatch

__all__ = [
    "CheckpointError",
    "DiskFullError",
    "StateMismatch",
    "save_checkpoint",
    "load_checkpoint",
    "write_bytes_atomic",
    "write_json_atomic",
    "RoundLog",
    "CheckpointDir",
]

log = logging.getLogger(__name__)

# Metadata keys we own inside a checkpoint; user metadata may not use the prefix.
_RESERVED_PREFIX = "fedtune."
_ALIASES_KEY = "fedtune.aliases"
_ORDER_KEY = "fedtune.order"
_DIGEST_KEY = "fedtune.digest"
_DIGEST_PREFIX = "sha256:"
# Written first in the header so its place is known; the hex is filled in once the data is hashed.
_DIGEST_FIELD = f'"{_DIGEST_KEY}":"{_DIGEST_PREFIX}'.encode()
_DIGEST_HEX = 64
_HASH_BLOCK = 16 << 20

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _attr, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _attr):
        _DTYPES[getattr(torch, _attr)] = _code

# Bytes per write when streaming a tensor: bounds the temporary CPU copy.
_WRITE_BLOCK = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent."""


def _no_space(path: Path, needed: int, exc: OSError) -> DiskFullError:
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    return DiskFullError(path, needed, free, exc.errno or errno.ENOSPC, os.strerror(exc.errno or errno.ENOSPC))


def _is_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(directory: Path) -> None:
    # Without this the rename itself may be lost on power failure.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], size: int) -> None:
    """Write ``path`` (``size`` bytes) via a temp file in the same directory, fsync and rename.

    On any failure the temp file is removed and the old ``path`` is untouched;
    a full disk raises :class:`fedcore.tensorfile.DiskFullError` naming the file and the space needed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        if _is_full(exc):
            raise _no_space(path, size, exc) from exc
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and _is_full(exc):
            raise _no_space(path, size, exc) from exc
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync of the directory)."""
    _atomic_write(Path(path), lambda f: f.write(data), len(data))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _find_aliases(state: Mapping[str, Tensor]) -> tuple[dict[str, str], list[str]]:
    """Map alias -> canonical name for identical views of one storage.

    Returns the aliases and the names of tensors that overlap another tensor's
    storage without being the same view; those are stored as separate copies.
    """
    aliases: dict[str, str] = {}
    partial: list[str] = []
    by_storage: dict[tuple[str, int], list[str]] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue  # empty tensors have no data to share
        key = (str(t.device), t.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append(name)
    for names in by_storage.values():
        canon: list[str] = []
        for name in names:
            t = state[name]
            for c in canon:
                u = state[c]
                if (t.data_ptr(), t.dtype, t.shape, t.stride()) == (u.data_ptr(), u.dtype, u.shape, u.stride()):
                    aliases[name] = c
                    break
            else:
                canon.append(name)
        if len(canon) > 1:
            partial.extend(canon)
    return aliases, partial


def _tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _write_tensor(f: BinaryIO, t: Tensor) -> None:
    # Stream in blocks so a big GPU tensor is not copied to CPU at once.
    flat = t.detach().reshape(-1)
    per_block = max(1, _WRITE_BLOCK // max(1, t.element_size()))
    for start in range(0, flat.numel(), per_block):
        block = flat[start : start + per_block].to("cpu").contiguous()
        f.write(memoryview(block.view(torch.uint8).numpy()))


class _HashingWriter:
    """Passes writes to a file and hashes them on the way."""

    def __init__(self, f: BinaryIO, h: Any) -> None:
        self.f, self.h = f, h

    def write(self, data: Any) -> int:
        self.h.update(data)
        return self.f.write(data)


def save_checkpoint(path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``state`` and string ``metadata`` to a safetensors file atomically.

    Tensors that are the same view of one storage are stored once and tied
    again by :func:`load_checkpoint`; other overlapping views are stored as
    independent copies (with a warning). Metadata keys starting with
    ``fedtune.`` are reserved. The file's digest goes into its metadata.
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this writer does not byte-swap")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"checkpoint metadata must map str to str, got {k!r}: {type(v).__name__}")
        if k.startswith(_RESERVED_PREFIX):
            raise ValueError(f"checkpoint metadata key {k!r} uses the reserved prefix {_RESERVED_PREFIX!r}")
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"checkpoint entry {name!r} is {type(t).__name__}, not a tensor")
        if t.dtype not in _DTYPES:
            raise ValueError(f"checkpoint entry {name!r} has dtype {t.dtype}, which safetensors cannot store")
    aliases, partial = _find_aliases(state)
    if partial:
        log.warning("tensors %s overlap in memory but are different views; storing separate copies", partial[:5])

    # The digest field comes first, so its place in the header is fixed.
    meta: dict[str, str] = {_DIGEST_KEY: _DIGEST_PREFIX + "0" * _DIGEST_HEX, **metadata}
    meta[_ORDER_KEY] = json.dumps(list(state))
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases)
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    stored: list[str] = []
    for name, t in state.items():
        if name in aliases:
            continue
        n = _tensor_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        stored.append(name)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    hex_at = 8 + raw.index(_DIGEST_FIELD) + len(_DIGEST_FIELD)

    def write(f: BinaryIO) -> None:
        h = hashlib.sha256()
        out = _HashingWriter(f, h)
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for name in stored:
            _write_tensor(out, state[name])  # type: ignore[arg-type]
        f.seek(hex_at)
        f.write(h.hexdigest().encode("ascii"))
        f.seek(0, os.SEEK_END)

    _atomic_write(Path(path), write, 8 + len(raw) + offset)


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {why}")


def _file_digest(path: Path, hex_at: int) -> str:
    """SHA-256 of the file with the digest's hex read as zeros, as :func:`save_checkpoint` hashed it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = bytearray(f.read(hex_at + _DIGEST_HEX))
        head[hex_at:] = b"0" * (len(head) - hex_at)
        h.update(head)
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, meta: Mapping[str, str], header_len: int) -> None:
    """Check the file against the digest in its metadata; a file without one is loaded with a warning."""
    stored = meta.get(_DIGEST_KEY)
    if stored is None:
        log.warning("checkpoint %s has no content digest (written by an older fedtune): loading it UNVERIFIED",
                    path)
        return
    with open(path, "rb") as f:
        head = f.read(8 + header_len)
    at = head.find(_DIGEST_FIELD, 8)
    if not stored.startswith(_DIGEST_PREFIX) or at < 0:
        raise _damaged(path, f"its digest field {stored[:80]!r} is malformed")
    got = _file_digest(path, at + len(_DIGEST_FIELD))
    if got != stored[len(_DIGEST_PREFIX):]:
        raise _damaged(path, f"its content does not match its digest ({path.stat().st_size} bytes: "
                              f"truncated or overwritten)")


def _read_header(path: Path) -> tuple[int, dict[str, str]]:
    """(header length, metadata) of a safetensors file, checking only that the header is readable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            size = path.stat().st_size
            if not 2 <= n <= size - 8:
                raise _damaged(path, f"its header length {n} does not fit its {size} bytes")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise _damaged(path, f"its header is not JSON ({e})") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _damaged(path, "its metadata is not a map of strings")
    return n, dict(meta or {})


def read_metadata(path: Path) -> dict[str, str]:
    """The user metadata of a checkpoint, from its header alone (nothing verified)."""
    _, meta = _read_header(Path(path))
    return {k: v for k, v in meta.items() if not k.startswith(_RESERVED_PREFIX)}


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and verify a checkpoint: tensors in their saved order (ties restored) and user metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    header_len, raw_meta = _read_header(path)
    _verify(path, raw_meta, header_len)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            loaded = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    meta.pop(_DIGEST_KEY, None)
    try:
        aliases: dict[str, str] = json.loads(meta.pop(_ALIASES_KEY, "{}"))
        order: list[str] = json.loads(meta.pop(_ORDER_KEY, "null")) or list(loaded)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has corrupt fedtune metadata: {e}") from e
    for alias, canon in aliases.items():
        if canon not in loaded:
            raise CheckpointError(f"checkpoint {path}: alias {alias!r} points to missing {canon!r}")
        loaded[alias] = loaded[canon]  # the same tensor object: the tie is back
    if set(order) != set(loaded):
        raise CheckpointError(f"checkpoint {path}: stored tensors do not match its recorded names")
    return {k: loaded[k] for k in order}, meta


class RoundLog:
    """Append-only JSONL log of round records, durable once ``append`` returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._checked_tail = False

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any]:
        rec = json.loads(raw.decode("utf-8"))
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        return rec

    def _repair_tail(self) -> None:
        # A crash mid-append leaves a last line without "\n" (or, on some file
        # systems, zero-filled); appending after it would glue the next record
        # onto garbage, so cut it off first.
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "rb+") as f:
            # Find where the last line starts, reading backwards in blocks.
            tail, pos, start_of_last = b"", size, 0
            while pos > 0:
                pos = max(0, pos - 65536)
                f.seek(pos)
                tail = f.read(size - pos)
                i = tail.rfind(b"\n", 0, len(tail) - 1)
                if i >= 0:
                    start_of_last = pos + i + 1
                    break
            last = tail[start_of_last - pos :]
            try:
                if not last.endswith(b"\n"):
                    raise ValueError("no newline")
                self._parse(last)
                return
            except (ValueError, UnicodeDecodeError):
                pass
            log.warning(
                "round log %s: dropping a torn last line (%d bytes) left by a crash",
                self.path, size - start_of_last,
            )
            f.truncate(start_of_last)
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as a JSON line and fsync it."""
        line = json.dumps(dict(record), separators=(",", ":")) + "\n"
        if "\n" in line[:-1]:  # json.dumps escapes newlines; guard anyway
            raise ValueError("round log record serialised to more than one line")
        with self._lock:
            if not self._checked_tail:
                self._repair_tail()
                self._checked_tail = True
            created = not self.path.exists()
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            data = line.encode("utf-8")
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as exc:
                    # Take back whatever part of the line reached the file, so no torn record stays.
                    try:
                        f.truncate(start)
                    except OSError:
                        self._checked_tail = False  # the next append repairs the tail
                    if _is_full(exc):
                        raise _no_space(self.path, len(data), exc) from exc
                    raise
            if created:
                _fsync_dir(self.path.parent)

    def rewrite(self, records: list[Mapping[str, Any]]) -> None:
        """Replace the whole log atomically (crash recovery drops records of uncommitted rounds)."""
        data = "".join(json.dumps(dict(r), separators=(",", ":")) + "\n" for r in records).encode("utf-8")
        with self._lock:
            _atomic_write(self.path, lambda f: f.write(data), len(data))
            self._checked_tail = True

    def read(self) -> list[dict[str, Any]]:
        """All records; a torn last line is skipped with a warning, other bad lines raise.

        A line counts only once its newline is on disk, so a record is either
        complete or absent, the same rule ``append`` uses to repair the file.
        """
        records, bad = self._read(strict=True)
        return records

    def salvage(self) -> tuple[list[dict[str, Any]], list[int]]:
        """Every readable record, and the numbers of the corrupt lines skipped (a torn last line is not one)."""
        return self._read(strict=False)

    def _read(self, strict: bool) -> tuple[list[dict[str, Any]], list[int]]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], []
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        records: list[dict[str, Any]] = []
        bad: list[int] = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                records.append(self._parse(raw))
            except (ValueError, UnicodeDecodeError) as e:
                if i == len(lines) - 1 and not torn:
                    torn = raw  # e.g. zero-filled by the file system after a crash
                    break
                if strict:
                    raise ValueError(f"round log {self.path} line {i + 1} is corrupt: {e}") from e
                bad.append(i + 1)
        if torn:
            log.warning(
                "round log %s: ignoring a torn last line (%d bytes, crash mid-write?)", self.path, len(torn)
            )
        return records, bad

    def last(self, key: str = "round") -> dict[str, Any] | None:
        """The most recent record that has ``key``, or None."""
        for rec in reversed(self.read()):
            if key in rec:
                return rec
        return None


def set_aside(path: Path, copy: bool = False) -> Path:
    """Move (or copy) a damaged file to ``<name>.damaged`` (``.damaged-2``, ... if taken); never delete it."""
    path = Path(path)
    dest, n = path.with_name(path.name + ".damaged"), 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.damaged-{n}")
    if copy:
        shutil.copy2(path, dest)
    else:
        os.replace(path, dest)
    _fsync_dir(path.parent)
    return dest


_ROUND_FILE = re.compile(r"^round-(\d{6,})\.safetensors$")


class CheckpointDir:
    """Per-round checkpoints ``round-000005.safetensors`` plus a ``latest`` pointer.

    ``save`` writes the checkpoint, then the pointer (the commit point), then
    prunes all but the newest ``keep`` checkpoints (never the one ``latest``
    names). If the pointer is missing or dangling, ``latest`` falls back to
    the newest checkpoint file present and logs a warning.
    """

    POINTER = "latest"

    def __init__(self, root: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        # Temp files from a crash mid-save can be as big as the model.
        for stale in self.root.glob(".round-*.safetensors.*.tmp"):
            log.info("removing leftover partial checkpoint %s", stale)
            stale.unlink(missing_ok=True)

    def path_for(self, round: int) -> Path:
        """File name of the checkpoint for ``round``."""
        return self.root / f"round-{round:06d}.safetensors"

    def _rounds_on_disk(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.root.iterdir():
            m = _ROUND_FILE.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, round: int, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
        """Checkpoint ``round``; re-saving the latest round is allowed, going back is not."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an int >= 0, got {round!r}")
        current = self.latest()
        if current is not None and round < current[0]:
            raise ValueError(f"cannot checkpoint round {round}: {self.root} already has round {current[0]}")
        path = self.path_for(round)
        save_checkpoint(path, state, metadata)
        write_json_atomic(self.root / self.POINTER, {"round": round, "file": path.name})
        self._prune(path)
        return path

    def _prune(self, latest_path: Path) -> None:
        on_disk = self._rounds_on_disk()
        for _, p in on_disk[: max(0, len(on_disk) - self.keep)]:
            if p != latest_path:
                p.unlink(missing_ok=True)

    def latest(self) -> tuple[int, Path] | None:
        """``(round, path)`` of the newest committed checkpoint, or None."""
        pointer = self.root / self.POINTER
        try:
            info = json.loads(pointer.read_text("utf-8"))
            r, p = int(info["round"]), self.root / str(info["file"])
            if p.is_file() and Path(info["file"]).name == info["file"]:
                return r, p
            log.warning("checkpoint pointer %s names missing file %s; scanning %s", pointer, p, self.root)
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            log.warning("checkpoint pointer %s is unreadable (%s); scanning %s", pointer, e, self.root)
        on_disk = self._rounds_on_disk()
        return on_disk[-1] if on_disk else None

    def load_latest(self, prepare: Callable[[int, dict[str, Tensor], dict[str, str]], Any] | None = None
                    ) -> tuple[int, Any, dict[str, str]] | None:
        """``(round, state, metadata)`` of the newest intact checkpoint, or None if there is none.

        ``prepare(round, state, metadata)`` turns a loaded state into what the
        caller uses (its result replaces ``state``) and raises CheckpointError
        if the content is not what it claims. A damaged checkpoint is renamed
        to ``*.damaged`` with a warning and the one before it is tried; the
        pointer then names the one used. If none is intact, nothing is renamed
        and CheckpointError says so.
        """
        found = self.latest()
        if found is None:
            return None
        candidates = [found] + [(r, p) for r, p in reversed(self._rounds_on_disk()) if r < found[0]]
        damaged: list[tuple[Path, CheckpointError]] = []
        for r, p in candidates:
            try:
                state, meta = load_checkpoint(p)
                used = prepare(r, state, meta) if prepare is not None else state
            except CheckpointError as e:
                damaged.append((p, e))
                continue
            for bad, why in damaged:
                dest = set_aside(bad)
                log.warning("%s; set aside as %s, resuming from the checkpoint of round %d instead", why, dest.name, r)
            if damaged:
                write_json_atomic(self.root / self.POINTER, {"round": r, "file": p.name})
            return r, used, meta
        reasons = "; ".join(str(e) for _, e in damaged)
        raise CheckpointError(f"no intact checkpoint in {self.root} ({reasons}); nothing was changed: restore a "
                              f"copy, or move the directory away to start the run again")

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
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, BinaryIO, Mapping

import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "write_json_atomic",
    "RoundLog",
    "CheckpointDir",
]

log = logging.getLogger(__name__)

# Metadata keys we own inside a checkpoint; user metadata may not use the prefix.
_RESERVED_PREFIX = "fedtune."
_ALIASES_KEY = "fedtune.aliases"
_ORDER_KEY = "fedtune.order"

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


def _fsync_dir(directory: Path) -> None:
    # Without this the rename itself may be lost on power failure.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` via a temp file in the same directory, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    _atomic_write(Path(path), lambda f: f.write(data))


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


def save_checkpoint(path: Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``state`` and string ``metadata`` to a safetensors file atomically.

    Tensors that are the same view of one storage are stored once and tied
    again by :func:`load_checkpoint`; other overlapping views are stored as
    independent copies (with a warning). Metadata keys starting with
    ``fedtune.`` are reserved.
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

    header: dict[str, Any] = {}
    offset = 0
    stored: list[str] = []
    for name, t in state.items():
        if name in aliases:
            continue
        n = _tensor_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        stored.append(name)
    meta = dict(metadata)
    meta[_ORDER_KEY] = json.dumps(list(state))
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases)
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes

    def write(f: BinaryIO) -> None:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in stored:
            _write_tensor(f, state[name])

    _atomic_write(Path(path), write)


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a checkpoint: tensors in their saved order (ties restored) and user metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            loaded = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
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
            with open(self.path, "ab") as f:
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            if created:
                _fsync_dir(self.path.parent)

    def rewrite(self, records: list[Mapping[str, Any]]) -> None:
        """Replace the whole log atomically (crash recovery drops records of uncommitted rounds)."""
        data = "".join(json.dumps(dict(r), separators=(",", ":")) + "\n" for r in records).encode("utf-8")
        with self._lock:
            _atomic_write(self.path, lambda f: f.write(data))
            self._checked_tail = True

    def read(self) -> list[dict[str, Any]]:
        """All records; a torn last line is skipped with a warning, other bad lines raise.

        A line counts only once its newline is on disk, so a record is either
        complete or absent, the same rule ``append`` uses to repair the file.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        records: list[dict[str, Any]] = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                records.append(self._parse(raw))
            except (ValueError, UnicodeDecodeError) as e:
                if i == len(lines) - 1 and not torn:
                    torn = raw  # e.g. zero-filled by the file system after a crash
                    break
                raise ValueError(f"round log {self.path} line {i + 1} is corrupt: {e}") from e
        if torn:
            log.warning(
                "round log %s: ignoring a torn last line (%d bytes, crash mid-write?)", self.path, len(torn)
            )
        return records

    def last(self, key: str = "round") -> dict[str, Any] | None:
        """The most recent record that has ``key``, or None."""
        for rec in reversed(self.read()):
            if key in rec:
                return rec
        return None


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

    def load_latest(self) -> tuple[int, dict[str, Tensor], dict[str, str]] | None:
        """``(round, state, metadata)`` of the newest checkpoint, or None if there is none."""
        found = self.latest()
        if found is None:
            return None
        r, p = found
        state, meta = load_checkpoint(p)
        return r, state, meta

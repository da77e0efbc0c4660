"""What a device keeps on disk so that a restart loses no transfer: `state_dir`.

    download/<digest>/manifest.pb   the manifest of the model being received
    download/<digest>/tensors.bin   its tensors, written chunk by chunk as they verify
    download/<digest>/chunks.log    one "tensor chunk" line per verified chunk (append-only)
    download/<digest>/complete      present once every chunk verified and the digest matched;
                                    "exact" when the model is bit-exactly that version (a base for deltas)
    upload/tensors.bin, meta.json   the update still to send; meta.json is the commit point
    upload/error_feedback.safetensors  the residual this update leaves, committed once the server has it
    error_feedback.safetensors      the committed error-feedback residual (fedclient.feedback)
    link.json                       measured link rates, for transfer timeouts

Chunk data goes into a memory-mapped file before its log line is appended,
so after a kill -9 every logged chunk is really there (the page cache
outlives the process). After a power loss the log may name chunks whose
bytes did not reach the disk; the model digest check at the end catches it
and the download starts again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedcore.tensorfile import map_tensors, write_tensors
from fedcore.wire import WireError, check_manifest
from fedcore.wire.formats import dtype_from_name, dtype_name
from fedtune.v1 import fedtune_pb2 as pb

from .feedback import load_residual, save_residual

log = logging.getLogger("fedclient.statedir")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tie(tensors: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        out[name] = t
        for a in aliases.get(name, []):
            out[a] = t
    return out


class DownloadStore:
    """A model download persisted chunk by chunk, resumable after a restart."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir: Path | None = None
        self._log = None

    def _dir_for(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def prepare(self, manifest: pb.Manifest) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """Destination tensors for `manifest` and the chunks they already hold."""
        layouts = check_manifest(manifest)
        layout = [(lay.name, lay.dtype, lay.shape) for lay in layouts]
        d = self._dir_for(manifest.digest)
        held: list[tuple[int, int]] = []
        if (d / "manifest.pb").exists():
            old = pb.Manifest()
            try:
                old.ParseFromString((d / "manifest.pb").read_bytes())
                if old == manifest:
                    dest = map_tensors(d / "tensors.bin", layout)
                    held = self._read_log(d / "chunks.log")
                    self._open(d)
                    log.info("resuming download of %s from disk: %d chunks already verified", manifest.digest[7:19],
                             len(held))
                    return dest, held
            except (OSError, ValueError) as exc:
                log.warning("partial download in %s unusable (%s); starting again", d, exc)
        # One model at a time: a new version replaces whatever was staged before.
        if self.root.exists():
            shutil.rmtree(self.root)
        d.mkdir(parents=True)
        dest = map_tensors(d / "tensors.bin", layout, create=True)
        (d / "chunks.log").touch()
        _write_atomic(d / "manifest.pb", manifest.SerializeToString())
        self._open(d)
        return dest, held

    def _open(self, d: Path) -> None:
        self.close()
        self.dir = d
        self._log = open(d / "chunks.log", "a")

    @staticmethod
    def _read_log(path: Path) -> list[tuple[int, int]]:
        held = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and all(p.isdigit() for p in parts):  # a torn last line is skipped
                held.append((int(parts[0]), int(parts[1])))
        return held

    def record(self, tensor_index: int, chunk: int) -> None:
        assert self._log is not None
        self._log.write(f"{tensor_index} {chunk}\n")
        self._log.flush()

    def complete(self, exact: bool = False) -> None:
        assert self.dir is not None
        _write_atomic(self.dir / "complete", b"exact" if exact else b"lossy")
        self.close()

    def discard(self) -> None:
        self.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def cached(self) -> tuple[str, dict[str, torch.Tensor], bool] | None:
        """(version, state dict, bit-exact) of a completely downloaded model kept from before a restart."""
        if not self.root.is_dir():
            return None
        for d in self.root.iterdir():
            if (d / "complete").exists():
                m = pb.Manifest()
                m.ParseFromString((d / "manifest.pb").read_bytes())
                layouts = check_manifest(m)
                tensors = map_tensors(d / "tensors.bin", [(lay.name, lay.dtype, lay.shape) for lay in layouts])
                exact = (d / "complete").read_bytes() == b"exact"
                return m.digest, _tie(tensors, {lay.name: list(lay.aliases) for lay in layouts}), exact
        return None


@dataclass
class PendingUpload:
    """An update written to disk before its upload starts, with what is needed to send and report it."""
    task_id: str
    round: int
    base_version: str
    num_samples: int
    spec: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    entries: list[list[Any]] = field(default_factory=list)  # [name, dtype, shape, aliases] in stream order


class UploadStore:
    """The one update this device still has to deliver."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(self, pending: PendingUpload, entries: list[tuple[str, torch.Tensor, list[str]]],
             residual: dict[str, torch.Tensor] | None = None) -> None:
        self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        write_tensors(self.root / "tensors.bin", {name: t for name, t, _ in entries})
        if residual is not None:
            # The update was compensated with the old residual; only this one goes with it.
            save_residual(self.root, residual)
        pending.entries = [[name, dtype_name(t.dtype), list(t.shape), aliases] for name, t, aliases in entries]
        # meta.json last: its presence says the tensors are complete.
        _write_atomic(self.root / "meta.json", json.dumps(asdict(pending)).encode())

    def load(self) -> tuple[PendingUpload, dict[str, torch.Tensor]] | None:
        meta = self.root / "meta.json"
        if not meta.exists():
            return None
        try:
            pending = PendingUpload(**json.loads(meta.read_text()))
            layout = [(n, dtype_from_name(d), tuple(s)) for n, d, s, _ in pending.entries]
            tensors = map_tensors(self.root / "tensors.bin", layout)
        except (OSError, ValueError, TypeError, WireError) as exc:
            log.warning("pending upload in %s unusable (%s); dropping it", self.root, exc)
            self.clear()
            return None
        return pending, _tie(tensors, {n: list(a) for n, _, _, a in pending.entries})

    def residual(self) -> dict[str, torch.Tensor] | None:
        """The error-feedback residual that goes with the pending update (None: it has none)."""
        return load_residual(self.root)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class LinkRates:
    """This device's measured link rates (bytes/s), kept across restarts."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rates: dict[str, float] = {}
        if path is not None and path.exists():
            try:
                self.rates = {k: float(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                self.rates = {}

    def get(self, direction: str) -> float | None:
        return self.rates.get(direction)

    def update(self, direction: str, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        self.rates[direction] = nbytes / seconds
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path, json.dumps(self.rates).encode())


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.downloads = DownloadStore(self.root / "download")
        self.uploads = UploadStore(self.root / "upload")

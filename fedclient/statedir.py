"""What a device keeps on disk so that a restart loses no transfer: `state_dir`.

    download/<digest>/manifest.pb   the manifest of the model being received
    download/<digest>/tensors.bin   its tensors, written chunk by chunk as they verify
    download/<digest>/chunks.log    one "tensor chunk" line per verified chunk (append-only)
    download/<digest>/complete      present once every chunk verified and the digest matched: JSON with
                                    the digest of the tensors as kept and "exact" when the model is
                                    bit-exactly that version (a base for deltas)
    upload/tensors.bin, meta.json   the update still to send; meta.json is the commit point and holds the
                                    tensors' digest, and once the server acknowledged the update, the
                                    upload's measured figures (`sent`)
    upload/error_feedback.safetensors  the residual this update leaves, committed once the server has it
    error_feedback.safetensors      the committed error-feedback residual (fedclient.feedback)
    link.json                       measured link rates, for transfer timeouts

Chunk data goes into a memory-mapped file before its log line is appended,
so after a kill -9 every logged chunk is really there (the page cache
outlives the process). After a power loss the log may name chunks whose
bytes did not reach the disk; the model digest check at the end catches it
and the download starts again.

Nothing kept here is used without a check: a kept model and a pending
upload are hashed when loaded and compared with the digest written when they
were complete; a damaged one is discarded with one warning line (the model
is downloaded again; the update is dropped and the device asks for work).
A state dir that cannot hold a transfer (disk full, read-only) costs only
the restart-safety: one line says so and the transfer goes on in memory.
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
from google.protobuf.message import DecodeError

from fedcore.tensorfile import map_tensors, write_tensors
from fedcore.wire import WireError, check_manifest, state_digest
from fedcore.wire.manifest import Layout, TensorEntry
from fedcore.wire.formats import dtype_from_name, dtype_name
from fedtune.v1 import fedtune_pb2 as pb

from .feedback import load_residual, save_residual

log = logging.getLogger("fedclient.statedir")


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a full disk must not also fill up with temp files
        raise


def _tie(tensors: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        out[name] = t
        for a in aliases.get(name, []):
            out[a] = t
    return out


def _mb(layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> float:
    """Megabytes the tensors of `layout` take on disk (alignment padding left out)."""
    n = 0
    for _, dtype, shape in layout:
        k = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            k *= int(s)
        n += k
    return n / 1e6


def _kept_digest(layouts: list[Layout], tensors: dict[str, torch.Tensor]) -> str:
    """The digest of tensors kept on disk, over the same names, aliases, dtypes and shapes as the wire's."""
    return state_digest([TensorEntry(lay.name, tensors[lay.name], list(lay.aliases)) for lay in layouts])


# What reading a damaged file of the state dir can raise (a JSON or protobuf error, a short file, ...).
UNREADABLE = (OSError, ValueError, TypeError, KeyError, DecodeError)


class DownloadStore:
    """A model download persisted chunk by chunk, resumable after a restart."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir: Path | None = None
        self._log = None

    def _dir_for(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def prepare(self, manifest: pb.Manifest, fresh: bool = False
                ) -> tuple[dict[str, torch.Tensor] | None, list[tuple[int, int]]]:
        """Destination tensors for `manifest` and the chunks they already hold (`fresh`: hold none).

        None instead of tensors: the state dir cannot hold this model (logged); receive it in memory."""
        layouts = check_manifest(manifest)
        layout = [(lay.name, lay.dtype, lay.shape) for lay in layouts]
        d = self._dir_for(manifest.digest)
        if not fresh and (d / "manifest.pb").exists() and not (d / "complete").exists():
            try:
                old = pb.Manifest()
                old.ParseFromString((d / "manifest.pb").read_bytes())
                if old == manifest:
                    dest = map_tensors(d / "tensors.bin", layout)
                    held = self._read_log(d / "chunks.log")
                    self._open(d)
                    log.info("resuming download of %s from disk: %d chunks already verified", manifest.digest[7:19],
                             len(held))
                    return dest, held
            except UNREADABLE as exc:
                log.warning("partial download in %s unusable (%s); starting again", d, exc)
        # One model at a time: a new version replaces whatever was staged before.
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            d.mkdir(parents=True)
            dest = map_tensors(d / "tensors.bin", layout, create=True)
            (d / "chunks.log").touch()
            _write_atomic(d / "manifest.pb", manifest.SerializeToString())
            self._open(d)
        except OSError as exc:
            log.warning("state dir %s cannot hold the download (%.1f MB needed: %s); receiving it in memory, "
                        "a restart will download it again", self.root, _mb(layout), exc)
            self.discard()
            shutil.rmtree(d, ignore_errors=True)
            return None, []
        return dest, []

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
        if self._log is None:  # the log could not be written: the download goes on without it
            return
        try:
            self._log.write(f"{tensor_index} {chunk}\n")
            self._log.flush()
        except OSError as exc:
            log.warning("state dir %s cannot log verified chunks (%s); the download goes on, a restart will "
                        "start it again", self.root, exc)
            self.discard()

    def complete(self, digest: str, exact: bool = False) -> None:
        """Mark the model complete; `digest` is that of its tensors as kept (checked before reuse)."""
        if self.dir is None:
            return
        try:
            _write_atomic(self.dir / "complete", json.dumps({"digest": digest, "exact": exact}).encode())
        except OSError as exc:
            log.warning("state dir %s cannot mark the download complete (%s); a restart will download it again",
                        self.root, exc)
        self.close()

    def discard(self) -> None:
        self.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def close(self) -> None:
        if self._log is not None:
            try:
                self._log.close()
            except OSError:
                pass  # a full disk: the log was discarded or is re-read with its torn line skipped
            self._log = None

    def cached(self) -> tuple[str, dict[str, torch.Tensor], bool] | None:
        """(version, state dict, bit-exact) of a completely downloaded model kept from before a restart.

        Hashed first: a kept model that does not match the digest written when it was complete (damaged
        while the daemon was down) is discarded with a warning, and the model is downloaded again."""
        if not self.root.is_dir():
            return None
        for d in sorted(self.root.iterdir()):
            if not (d / "complete").exists():
                continue
            try:
                return self._load_kept(d)
            except UNREADABLE as exc:
                log.warning("model kept in %s is damaged (%s); discarding it, it will be downloaded again", d, exc)
                shutil.rmtree(d, ignore_errors=True)
        return None

    @staticmethod
    def _load_kept(d: Path) -> tuple[str, dict[str, torch.Tensor], bool]:
        m = pb.Manifest()
        m.ParseFromString((d / "manifest.pb").read_bytes())
        layouts = check_manifest(m)
        mark = json.loads((d / "complete").read_bytes())
        if not isinstance(mark, dict) or not isinstance(mark.get("digest"), str):
            raise ValueError("its completion mark names no digest")
        exact = mark.get("exact") is True
        if exact and mark["digest"] != m.digest:
            raise ValueError(f"marked bit-exact, but its digest is not the manifest's {m.digest[:19]}...")
        tensors = map_tensors(d / "tensors.bin", [(lay.name, lay.dtype, lay.shape) for lay in layouts])
        got = _kept_digest(layouts, tensors)
        if got != mark["digest"]:
            raise ValueError(f"digest {got[:19]}... is not the {mark['digest'][:19]}... it had when complete")
        return m.digest, _tie(tensors, {lay.name: list(lay.aliases) for lay in layouts}), exact


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
    deadline_unix: float = 0.0  # the task's: until then a busy server is waited for (0: unknown)
    digest: str = ""  # of the tensors as saved; checked when loaded
    # Once the server acknowledged the update: what the upload measured (UploadFigures), for the metrics report.
    sent: dict[str, float] | None = None
    form: str = "tensors"  # the method's update form: "tensors" stream in chunks, "seeds" go as one SeedUpdate


FIGURES = ("measured", "bytes", "seconds", "wait_s", "attempts", "bytes_resent")


def _figures_ok(sent: Any) -> bool:
    return isinstance(sent, dict) and all(isinstance(sent.get(k), (int, float)) and 0 <= sent[k] < 1e30
                                          for k in FIGURES)


class UploadStore:
    """The one update this device still has to deliver."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(self, pending: PendingUpload, entries: list[tuple[str, torch.Tensor, list[str]]],
             residual: dict[str, torch.Tensor] | None = None) -> bool:
        """Keep the update on disk before its upload starts; False (logged): the state dir cannot hold it."""
        self.clear()
        pending.entries = [[name, dtype_name(t.dtype), list(t.shape), aliases] for name, t, aliases in entries]
        pending.digest = state_digest([TensorEntry(name, t, list(aliases)) for name, t, aliases in entries])
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_tensors(self.root / "tensors.bin", {name: t for name, t, _ in entries})
            if residual is not None:
                # The update was compensated with the old residual; only this one goes with it.
                save_residual(self.root, residual)
            # meta.json last: its presence says the tensors are complete.
            self._write_meta(pending)
        except OSError as exc:
            layout = [(name, t.dtype, tuple(t.shape)) for name, t, _ in entries]
            log.warning("state dir %s cannot hold the pending upload (%.1f MB needed: %s); sending it from memory, "
                        "a restart before it is delivered trains the round again", self.root, _mb(layout), exc)
            self.clear()
            return False
        return True

    def _write_meta(self, pending: PendingUpload) -> None:
        _write_atomic(self.root / "meta.json", json.dumps(asdict(pending)).encode())

    def mark_sent(self, pending: PendingUpload) -> None:
        """Commit that the server acknowledged the update, with the figures in `pending.sent`."""
        if not (self.root / "meta.json").exists():
            return  # not kept on disk (the state dir could not hold it)
        try:
            self._write_meta(pending)
        except OSError as exc:
            log.warning("state dir %s cannot record the acknowledged upload's figures (%s); a restart before the "
                        "metrics report will report them as lost", self.root, exc)

    def load(self) -> tuple[PendingUpload, dict[str, torch.Tensor]] | None:
        """The pending update, hashed and checked against the digest saved with it; a damaged one is dropped."""
        meta = self.root / "meta.json"
        if not meta.exists():
            return None
        what = str(self.root)
        try:
            pending = PendingUpload(**json.loads(meta.read_text()))
            what = f"of task {str(pending.task_id)[:8]} (round {pending.round}) in {self.root}"
            if pending.sent is not None:
                if not _figures_ok(pending.sent):
                    log.warning("figures of the acknowledged upload %s unreadable; reported as lost", what)
                    pending.sent = {"measured": 0.0}
                return pending, {}  # the server holds it already: only the metrics report is left to do
            layout = [(n, dtype_from_name(d), tuple(s)) for n, d, s, _ in pending.entries]
            tensors = map_tensors(self.root / "tensors.bin", layout)
            if not pending.digest:
                raise ValueError("no digest was saved with it")
            got = state_digest([TensorEntry(n, tensors[n], list(a)) for n, _, _, a in pending.entries])
            if got != pending.digest:
                raise ValueError(f"its tensors hash to {got[:19]}..., not the {pending.digest[:19]}... saved")
        except (*UNREADABLE, WireError) as exc:
            log.warning("pending upload %s is damaged (%s); dropping it, the device asks for work again", what, exc)
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
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(self.path, json.dumps(self.rates).encode())
            except OSError as exc:  # a full disk: the rates are still used, only not kept across a restart
                log.warning("cannot keep link rates in %s (%s)", self.path, exc)


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.downloads = DownloadStore(self.root / "download")
        self.uploads = UploadStore(self.root / "upload")

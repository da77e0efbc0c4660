"""Devices known to the server, when each was last heard from, and what it measured.

The registry is durable so that after a server restart the devices' link and
compute estimates, which the round policies and deadlines use, are still
there. It is kept as an append-only journal, `registry.jsonl` in the run
directory: one JSON line per change, a `join` (the device's fields and
estimates) or an `estimates` update, so a join costs one short line whatever
the size of the fleet. Lines are flushed, not fsynced: a crash loses at most
the tail the OS had not written, and those devices rejoin anyway.

On load the registry reads `registry.json` (the whole-file format of earlier
versions) if there is one, then the journal; the last record of a device
wins. A torn last line (a crash mid-write) is skipped with a warning, as is
any other unreadable line (a copy of such a journal is set aside as
`registry.jsonl.damaged` first). The journal is then rewritten compacted, one
line per device, atomically, and the old `registry.json` removed; it is
compacted again whenever it holds more than four lines per device (and at
least `compact_floor`), so the file stays proportional to the fleet.

Sessions are not durable: every device must join again after a restart, and
does so on its own when the server answers that it does not know its session.
"""
from __future__ import annotations

import bisect
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fedcore.clock import SYSTEM, Clock

log = logging.getLogger("fedserver.registry")

COMPACT_FLOOR = 1000
COMPACT_FACTOR = 4


@dataclass
class Device:
    device_id: str
    session_id: str
    num_samples: int
    capabilities: dict[str, Any]
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    # Measured in earlier rounds: down_Bps, up_Bps, step_s, overhead_s, bytes_down, bytes_up.
    estimates: dict[str, float] = field(default_factory=dict)
    # Asked for work under this session: its poll is with the server, so a task reaches it at once.
    polled: bool = False


def journal_paths(path: Path) -> tuple[Path, Path]:
    """(journal, legacy whole-file registry) for a registry path given as `X`, `X.json` or `X.jsonl`."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".json", ".jsonl") else path
    return base.with_name(base.name + ".jsonl"), base.with_name(base.name + ".json")


def _estimates(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ValueError("estimates is not an object")
    out = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"estimate {k!r} is not a number")
        out[str(k)] = float(v)
    return out


def _device(rec: dict[str, Any]) -> Device:
    """A device from a journal join record or an old registry.json entry; ValueError when malformed."""
    did, num, caps = rec.get("device_id"), rec.get("num_samples", 0), rec.get("capabilities") or {}
    if not isinstance(did, str) or not did:
        raise ValueError("no device_id")
    if isinstance(num, bool) or not isinstance(num, int):
        raise ValueError("num_samples is not an integer")
    if not isinstance(caps, dict):
        raise ValueError("capabilities is not an object")
    joined = rec.get("joined_at", 0.0)
    if isinstance(joined, bool) or not isinstance(joined, (int, float)):
        raise ValueError("joined_at is not a number")
    # Sessions die with the process that issued them; monotonic clocks mean nothing to another process.
    return Device(did, "", num, caps, joined_at=float(joined), last_seen=float("-inf"),
                  estimates=_estimates(rec.get("estimates") or {}))


def _join_record(d: Device) -> dict[str, Any]:
    return {"op": "join", "device_id": d.device_id, "num_samples": d.num_samples,
            "capabilities": d.capabilities, "joined_at": d.joined_at, "estimates": d.estimates}


def _line(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode("utf-8")


class Registry:
    """Not thread-safe by itself: the coordinator calls it under its lock.

    `path` names the registry in the run directory: `out/registry.json`,
    `out/registry.jsonl` or `out/registry` all mean the journal
    `out/registry.jsonl` (and an old `out/registry.json` read once). None:
    in memory only.
    """

    def __init__(self, liveness_s: float, path: Path | None = None, clock: Clock = SYSTEM,
                 compact_floor: int = COMPACT_FLOOR) -> None:
        self.liveness_s = liveness_s
        self.clock = clock
        self.path = path
        self.compact_floor = compact_floor
        self.devices: dict[str, Device] = {}
        self._ids: list[str] = []  # sorted device ids: alive() and page() without sorting per call
        self._saved: dict[str, dict[str, float]] = {}  # estimates as last journaled, per device
        self._fh: BinaryIO | None = None
        self._lines = 0  # lines in the journal
        self._retry_at = 0  # after a failed compaction, the line count at which to try again
        self.bytes_written = 0  # journal bytes written by this process, compactions included
        self.journal, self.legacy = journal_paths(path) if path is not None else (None, None)
        if path is not None:
            self._load()

    # ------------------------------------------------------------------ load
    def _load(self) -> None:
        assert self.journal is not None and self.legacy is not None
        from_legacy = False
        if self.legacy.exists():
            try:
                entries = json.loads(self.legacy.read_text()).get("devices", [])
                for d in entries:
                    dev = _device(d)
                    self.devices[dev.device_id] = dev
                from_legacy = True
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                from .storage import set_aside
                self.devices.clear()
                moved = set_aside(self.legacy)
                log.warning("registry %s unreadable (%s); set aside as %s, devices rejoin on their own",
                            self.legacy, exc, moved.name)
        had_journal = self.journal.exists()
        if had_journal:
            self._read_journal()
        self._ids = sorted(self.devices)
        self._saved = {d: dict(dev.estimates) for d, dev in self.devices.items()}
        if self.devices or had_journal:
            self._compact()  # also drops a torn tail, so appends never follow garbage
        if from_legacy:
            self.legacy.unlink(missing_ok=True)  # everything it held is in the journal now
        if self.devices:
            log.info("registry: %d devices known from before a restart", len(self.devices))

    def _read_journal(self) -> None:
        assert self.journal is not None
        try:
            data = self.journal.read_bytes()
        except OSError as exc:
            log.warning("registry journal %s unreadable (%s); devices rejoin on their own", self.journal, exc)
            return
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        bad = 0
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                self._apply(rec)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                if i == len(lines) - 1 and not torn:
                    torn = raw  # a last line zero-filled by the file system after a crash
                    continue
                bad += 1
                log.debug("registry journal %s line %d: %s", self.journal, i + 1, exc)
        if torn:
            log.warning("registry journal %s: ignoring a torn last line (%d bytes, crash mid-write?)",
                        self.journal, len(torn))
        if bad:
            from .storage import set_aside
            kept = set_aside(self.journal, copy=True)
            log.warning("registry journal %s: skipped %d unreadable lines (original kept as %s); those devices "
                        "rejoin on their own", self.journal, bad, kept.name)

    def _apply(self, rec: dict[str, Any]) -> None:
        op = rec.get("op")
        if op == "join":
            dev = _device(rec)
            self.devices[dev.device_id] = dev
        elif op == "estimates":
            dev = self.devices.get(rec.get("device_id"))  # type: ignore[arg-type]
            if dev is not None:  # its join line was lost: it rejoins and measures again
                dev.estimates = _estimates(rec.get("estimates") or {})
        else:
            raise ValueError(f"unknown op {op!r}")

    # --------------------------------------------------------------- journal
    def _compact(self) -> None:
        """Rewrite the journal as one join line per device, atomically (tmp file, fsync, rename)."""
        from .storage import write_bytes_atomic
        assert self.journal is not None
        self.close()
        data = b"".join(_line(_join_record(self.devices[d])) for d in self._ids)
        write_bytes_atomic(self.journal, data)
        self.bytes_written += len(data)
        self._lines = len(self._ids)
        self._retry_at = 0

    def _append(self, rec: dict[str, Any]) -> None:
        if self.journal is None:
            return
        data = _line(rec)
        if self._fh is None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.journal, "ab")
        f = self._fh
        start = f.tell()
        try:
            f.write(data)
            f.flush()
        except OSError as exc:
            # Take back what reached the file, so no torn line stays for the next append to follow.
            self.close()
            try:
                with open(self.journal, "rb+") as g:
                    g.truncate(start)
            except OSError:
                pass  # a load skips it as a bad line
            from .storage import _is_full, _no_space
            if _is_full(exc):
                raise _no_space(self.journal, len(data), exc) from exc
            raise
        self.bytes_written += len(data)
        self._lines += 1
        if self._lines > max(COMPACT_FACTOR * len(self.devices), self.compact_floor, self._retry_at):
            try:
                self._compact()
            except OSError as exc:
                # The appended line is safe; the journal is only longer than it needs to be. Try again later.
                self._retry_at = self._lines + self.compact_floor
                log.warning("registry journal %s not compacted (%s); will try again", self.journal, exc)

    def close(self) -> None:
        """Close the journal (every line is flushed already); the next change reopens it."""
        fh: BinaryIO | None = getattr(self, "_fh", None)  # None too when __init__ did not get that far
        self._fh = None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()  # a coordinator is not told to close its registry: no ResourceWarning when it goes

    # ------------------------------------------------------------------- api
    def save(self, device_ids: list[str] | None = None) -> None:
        """Journal the estimates of devices whose estimates changed since they were last journaled.

        `device_ids` limits the look to those devices (O(len)); None looks at every device (O(N) compares,
        but writes only the changed ones).
        """
        for d in self._ids if device_ids is None else device_ids:
            dev = self.devices.get(d)
            if dev is None or dev.estimates == self._saved.get(d):
                continue
            est = dict(dev.estimates)
            self._append({"op": "estimates", "device_id": d, "estimates": est})
            self._saved[d] = est

    def join(self, device_id: str, num_samples: int, capabilities: dict[str, Any]) -> Device:
        # A rejoin (daemon or server restart) gets a new session; the old one stops working.
        old = self.devices.get(device_id)
        dev = Device(device_id, uuid.uuid4().hex, num_samples, capabilities, joined_at=self.clock.time(),
                     last_seen=self.clock.monotonic(), estimates=dict(old.estimates) if old else {})
        self.devices[device_id] = dev
        if old is None:
            bisect.insort(self._ids, device_id)
        try:
            self._append(_join_record(dev))
        except BaseException:
            # Not durable, so not joined: the device retries, and the registry stays as the file says.
            if old is None:
                del self.devices[device_id]
                self._ids.pop(bisect.bisect_left(self._ids, device_id))
            else:
                self.devices[device_id] = old
            raise
        self._saved[device_id] = dict(dev.estimates)
        return dev

    def touch(self, device_id: str, session_id: str) -> Device | None:
        dev = self.devices.get(device_id)
        if dev is None or not session_id or dev.session_id != session_id:
            return None
        dev.last_seen = self.clock.monotonic()
        return dev

    def is_alive(self, dev: Device, now: float | None = None) -> bool:
        """Heard from within liveness_s (`now`: the clock's monotonic time, read once by a caller in a loop)."""
        return (self.clock.monotonic() if now is None else now) - dev.last_seen <= self.liveness_s

    def alive(self) -> list[str]:
        """Ids of the devices heard from within liveness_s, sorted: O(N), no sort per call."""
        now, devs, live = self.clock.monotonic(), self.devices, self.liveness_s
        return [d for d in self._ids if now - devs[d].last_seen <= live]

    def page(self, after: str, limit: int) -> tuple[list[Device], str]:
        """Up to `limit` devices whose ids sort strictly after `after` ("" from the first), in id order,
        and the cursor for the next page ("" when this is the last). O(limit + log N)."""
        if limit < 0:
            raise ValueError(f"page size must be at least 0, got {limit}")
        start = bisect.bisect_right(self._ids, after) if after else 0
        ids = self._ids[start:start + limit]
        more = start + limit < len(self._ids)
        return [self.devices[d] for d in ids], (ids[-1] if ids and more else "")


"""Clock and power-limit knobs the daemon may turn, and the journal that undoes every turn.

Knobs (``find_knob`` tries them in this order):

- ``jetson-gpu``: the Jetson GPU's devfreq directory (``available_frequencies``,
  ``min_freq``, ``max_freq``, ``cur_freq``, ``governor``, all in Hz). Its place
  differs by module and JetPack, so it is found through ``/sys/class/devfreq``,
  whose entries link to it: ``17000000.ga10b`` (AGX Orin, JetPack 5:
  /sys/devices/17000000.ga10b/devfreq/17000000.ga10b), ``17000000.gpu`` (Orin,
  JetPack 6: /sys/devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu),
  ``17000000.gv11b`` (Xavier), ``17000000.gp10b`` (TX2), ``57000000.gpu``
  (Nano, TX1, GM20B). Layouts as jetson_stats (jtop/core/gpu.py, ``find_igpu``:
  scans /sys/class/devfreq, the GPU by ``device/of_node/name`` in gv11b, gp10b,
  ga10b, gpu) and public Jetson scripts use them; Thor (JetPack 7) goes through
  NVML instead, as jtop does there.
- ``nvml-gpu``: an NVIDIA data-center GPU through NVML (``pynvml``, imported
  only when asked for; not a dependency): locked graphics clocks
  (nvmlDeviceSetGpuLockedClocks / nvmlDeviceResetGpuLockedClocks, Volta or newer,
  root). ``PowerLimit`` sets its board power limit the same way.
- ``cpufreq``: every ``/sys/devices/system/cpu/cpufreq/policy*`` together
  (``scaling_available_frequencies``, ``scaling_min_freq``, ``scaling_max_freq``,
  ``scaling_cur_freq``, in kHz: Documentation/admin-guide/pm/cpufreq.rst).

A knob is locked by writing min = max = f. The devfreq and cpufreq cores clamp
whatever their governor picks to [min, max], so this pins the clock under every
governor; the governor is read and reported but never changed (one setting
fewer to get wrong or to restore, and jetson_clocks pins clocks the same way).

Every original value goes into a ``ClockJournal`` (a JSON file in the state
dir) before the first change; a clean exit writes them back and removes the
file, and ``recover`` at the next start undoes what a killed daemon left.
Everything that touches the machine is injectable (sysfs root, NVML module,
the write and writability checks, the nvpmodel runner) so tests use fake trees.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from fedcore.power import import_nvml

from .statedir import _write_atomic

log = logging.getLogger("fedclient.clocks")

KNOBS = ("jetson-gpu", "nvml-gpu", "cpufreq")
GPU_DEVFREQ_NAMES = ("ga10b", "gv11b", "gp10b", "gm20b", "gpu")  # the part after the unit address

Access = Callable[[Path], bool]
Write = Callable[[Path, str], None]
Run = Callable[[list[str]], str]


class ClockError(RuntimeError):
    """A clock or power limit that cannot be read or changed; the message says what is missing."""


class FrequencyKnob(Protocol):
    name: str
    detail: str

    def frequencies(self) -> list[int]: ...

    def current(self) -> int: ...

    def lock(self, hz: int) -> None: ...

    def restore(self) -> None: ...


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _int(path: Path) -> int:
    return int(path.read_text().strip())


def _text(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# ------------------------------------------------------------------- undoing
def _set_range(min_path: Path, max_path: Path, lo: int, hi: int, write: Write) -> None:
    """Make the pair [lo, hi] without min ever above max: raising past the current max moves max first."""
    try:
        order = [(max_path, hi), (min_path, lo)] if lo > _int(max_path) else [(min_path, lo), (max_path, hi)]
        for path, value in order:
            write(path, str(value))
    except (OSError, ValueError) as exc:
        raise ClockError(f"cannot set {min_path.parent} to [{lo}, {hi}]: {getattr(exc, 'strerror', None) or exc}"
                         ) from exc


def _nvml_error(nvml: Any, exc: Exception, doing: str) -> ClockError:
    code = getattr(exc, "value", None)
    if code == getattr(nvml, "NVML_ERROR_NO_PERMISSION", 4):
        why = "NVML denies permission (run fedclient as root: NVML clock and power-limit changes need root/admin)"
    elif code == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
        why = "this GPU does not support it (locked clocks need a Volta or newer GPU)"
    else:
        why = f"NVML error: {exc}"
    return ClockError(f"cannot {doing}: {why}")


def _nvml_call(nvml: Any, doing: str, fn: str, *args: Any) -> Any:
    try:
        return getattr(nvml, fn)(*args)
    except getattr(nvml, "NVMLError", Exception) as exc:
        raise _nvml_error(nvml, exc, doing) from exc


def _undo(entry: dict[str, Any], nvml: Any, write: Write) -> None:
    """Write one journal entry's original values back."""
    kind = entry["kind"]
    if kind == "sysfs-range":
        _set_range(Path(entry["min"]), Path(entry["max"]), int(entry["lo"]), int(entry["hi"]), write)
        return
    if kind not in ("nvml-clocks", "nvml-power"):
        raise ClockError(f"unknown clock setting {kind!r} in the journal")
    if nvml is None:
        raise ClockError("cannot restore NVML settings: pynvml is not importable (pip install nvidia-ml-py) "
                         "or NVML did not start")
    index = int(entry["index"])
    handle = _nvml_call(nvml, f"open NVML GPU {index}", "nvmlDeviceGetHandleByIndex", index)
    if kind == "nvml-clocks":
        # NVML has no query for a lock set before ours, so "original" is the driver's default: unlocked.
        _nvml_call(nvml, f"unlock the clock of NVML GPU {index}", "nvmlDeviceResetGpuLockedClocks", handle)
    else:
        _nvml_call(nvml, f"restore the power limit of NVML GPU {index}", "nvmlDeviceSetPowerManagementLimit",
                   handle, int(entry["mw"]))


# ------------------------------------------------------------------- journal
class ClockJournal:
    """Original values of every changed setting, in a JSON file written atomically before each first change.

    The file exists only while something is changed: finding it at start means
    the daemon was killed, and ``restore_all`` (or ``recover``) writes the
    values back. A journal from before a reboot is dropped unapplied: the
    reboot already reset the clocks, and nvpmodel may have changed since.
    """

    def __init__(self, path: Path, boot_id: str | None = None) -> None:
        self.path = Path(path)
        self.boot_id = _boot_id() if boot_id is None else boot_id
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("no entries")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("clock journal %s is unreadable (%s); check the clocks by hand (a reboot resets them)",
                        self.path, exc)
            self.path.unlink(missing_ok=True)
            return
        if data.get("boot_id") and self.boot_id and data["boot_id"] != self.boot_id:
            log.info("clock journal %s is from before a reboot, which reset what it held; dropping it", self.path)
            self.path.unlink(missing_ok=True)
            return
        self.entries = entries

    def _save(self) -> None:
        if not self.entries:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps({"boot_id": self.boot_id, "entries": self.entries}, indent=1).encode())

    def record(self, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Keep `entry` under `key` unless one is kept already (the older holds the true originals); the kept one."""
        if key not in self.entries:
            self.entries[key] = entry
            try:
                self._save()
            except OSError as exc:
                del self.entries[key]
                raise ClockError(f"cannot record the clock settings in {self.path} before changing them "
                                 f"({exc.strerror or exc}); nothing was changed") from exc
        return self.entries[key]

    def forget(self, key: str) -> None:
        if self.entries.pop(key, None) is None:
            return
        try:
            self._save()
        except OSError as exc:  # the values are back; a stale entry only rewrites them at the next start
            log.warning("cannot update clock journal %s (%s)", self.path, exc)

    def restore_all(self, nvml_module: Any = None, write: Write = _write) -> list[str]:
        """Write every original back, newest first; the keys restored. Failures stay for the next start."""
        nvml = None
        if any(str(e.get("kind", "")).startswith("nvml") for e in self.entries.values()):
            nvml = import_nvml(nvml_module)
        restored = []
        for key in reversed(list(self.entries)):
            try:
                _undo(self.entries[key], nvml, write)
            except (ClockError, KeyError, TypeError, ValueError) as exc:
                log.warning("cannot restore %s from %s: %s", key, self.path, exc)
                continue
            del self.entries[key]
            restored.append(key)
        try:
            self._save()
        except OSError as exc:
            log.warning("cannot update clock journal %s (%s)", self.path, exc)
        return restored


def recover(path: Path, nvml_module: Any = None, write: Write = _write, boot_id: str | None = None) -> list[str]:
    """At daemon start: undo what a killed daemon left changed (its journal exists); the keys restored."""
    journal = ClockJournal(path, boot_id)
    if not journal.entries:
        return []
    restored = journal.restore_all(nvml_module, write)
    if restored:
        log.warning("restored clock settings a killed daemon left changed: %s", ", ".join(restored))
    return restored


class _Undoable:
    """Originals kept (and journaled) before the first change, written back by restore(); a context manager."""

    def __init__(self, journal: ClockJournal | None, nvml: Any = None, write: Write = _write) -> None:
        self.journal = journal
        self._nvml = nvml
        self._write = write
        self._kept: dict[str, dict[str, Any]] = {}

    def _keep(self, key: str, entry: dict[str, Any]) -> bool:
        """Journal `entry` unless kept already; True when this is the first change of `key`."""
        if key in self._kept:
            return False
        self._kept[key] = self.journal.record(key, entry) if self.journal is not None else entry
        return True

    def _forget(self, key: str) -> None:
        self._kept.pop(key, None)
        if self.journal is not None:
            self.journal.forget(key)

    def restore(self) -> None:
        """Back to the values found before the first change; a no-op when nothing is changed."""
        problems = []
        for key in reversed(list(self._kept)):
            try:
                _undo(self._kept[key], self._nvml, self._write)
            except ClockError as exc:
                problems.append(str(exc))
                continue
            self._forget(key)
        if problems:
            raise ClockError("; ".join(problems))

    def _rollback(self) -> None:
        try:
            self.restore()
        except ClockError as exc:
            log.warning("could not undo a partial change: %s", exc)

    def __enter__(self) -> "_Undoable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# --------------------------------------------------------------------- sysfs
@dataclass(frozen=True)
class Span:
    """One min/max pair: a devfreq device or a cpufreq policy."""

    dir: Path
    min: Path
    max: Path
    cur: Path


class SysfsKnob(_Undoable):
    """Clocks locked by writing min = max in sysfs, all spans together; values in the files' unit (`scale` Hz)."""

    def __init__(self, name: str, what: str, spans: list[Span], freqs_hz: list[int], scale: int = 1,
                 governor: str | None = None, journal: ClockJournal | None = None,
                 access: Access = _writable, write: Write = _write) -> None:
        super().__init__(journal, write=write)
        self.name, self.what, self.spans, self.scale, self.governor = name, what, spans, scale, governor
        self._freqs = sorted(set(freqs_hz))
        self._access = access
        self.detail = str(spans[0].dir) if len(spans) == 1 else \
            f"{spans[0].dir.parent} ({', '.join(s.dir.name for s in spans)})"
        self.nvpmodel: NvpModel | None = None  # the Jetson power mode, where there is one

    def frequencies(self) -> list[int]:
        return list(self._freqs)

    def current(self) -> int:
        return _int(self.spans[0].cur) * self.scale

    def check(self) -> None:
        """ClockError naming the first file this process may not write."""
        for span in self.spans:
            for path in (span.min, span.max):
                if not self._access(path):
                    raise ClockError(f"cannot lock the {self.what} clock: {path} is not writable by uid "
                                     f"{os.geteuid()} (run fedclient as root or grant write access with a udev rule)")

    def lock(self, hz: int) -> None:
        if hz not in self._freqs:
            raise ValueError(f"{hz} Hz is not a frequency {self.name} can lock to "
                             f"({len(self._freqs)} from {self._freqs[0]} to {self._freqs[-1]} Hz)")
        self.check()  # before anything is written: no half-changed clocks
        try:
            for span in self.spans:
                self._keep(f"sysfs:{span.dir}", {"kind": "sysfs-range", "min": str(span.min),
                                                 "max": str(span.max), "lo": _int(span.min), "hi": _int(span.max)})
            for span in self.spans:
                _set_range(span.min, span.max, hz // self.scale, hz // self.scale, self._write)
        except (ClockError, OSError, ValueError) as exc:
            self._rollback()
            raise exc if isinstance(exc, ClockError) else ClockError(f"cannot read {self.detail}: {exc}") from exc


def _freq_list(path: Path, scale: int) -> list[int]:
    return [int(v) * scale for v in path.read_text().split()]


def find_jetson_gpu(root: Path = Path("/"), journal: ClockJournal | None = None, access: Access = _writable,
                    write: Write = _write, run: Run | None = None) -> SysfsKnob | None:
    """The Jetson GPU's devfreq knob, with the nvpmodel mode; None when there is no GPU devfreq entry."""
    cls = Path(root) / "sys/class/devfreq"
    for entry in sorted(cls.glob("*")) if cls.is_dir() else []:
        of_name = entry / "device/of_node/name"
        kind = entry.name.rsplit(".", 1)[-1]
        if kind not in GPU_DEVFREQ_NAMES and not (
                of_name.is_file() and of_name.read_text().strip("\0\n ") in GPU_DEVFREQ_NAMES):
            continue
        d = entry.resolve()
        try:
            freqs = _freq_list(d / "available_frequencies", 1)
            governor = _text(d / "governor")
            _int(d / "cur_freq")
        except (OSError, ValueError) as exc:
            log.debug("GPU devfreq %s not usable: %s", d, exc)
            continue
        if not freqs:
            continue
        knob = SysfsKnob("jetson-gpu", "GPU", [Span(d, d / "min_freq", d / "max_freq", d / "cur_freq")], freqs,
                         governor=governor, journal=journal, access=access, write=write)
        knob.nvpmodel = nvpmodel_mode(root, run)
        return knob
    return None


def find_cpufreq(root: Path = Path("/"), journal: ClockJournal | None = None, access: Access = _writable,
                 write: Write = _write) -> SysfsKnob | None:
    """All cpufreq policies as one knob (kHz in the files, Hz outside); the frequencies every policy offers.

    None without policies offering a list (intel_pstate, amd-pstate, CPPC: no discrete steps to lock to)."""
    spans, common, governor = [], None, None
    policies = (Path(root) / "sys/devices/system/cpu/cpufreq").glob("policy*")
    for d in sorted(policies, key=lambda p: int(p.name[6:]) if p.name[6:].isdigit() else -1):
        try:
            freqs = set(_freq_list(d / "scaling_available_frequencies", 1000))
            _int(d / "scaling_cur_freq")
            governor = governor or _text(d / "scaling_governor")
        except (OSError, ValueError) as exc:  # an inactive policy (all its CPUs offline), no list
            log.debug("cpufreq %s not usable: %s", d, exc)
            continue
        spans.append(Span(d, d / "scaling_min_freq", d / "scaling_max_freq", d / "scaling_cur_freq"))
        common = freqs if common is None else common & freqs
    if not spans or not common:
        return None
    return SysfsKnob("cpufreq", "CPU", spans, sorted(common), scale=1000, governor=governor, journal=journal,
                     access=access, write=write)


# ------------------------------------------------------------------ nvpmodel
@dataclass(frozen=True)
class NvpModel:
    """A Jetson power mode (nvpmodel): part of what a device profile was measured under."""

    id: int
    name: str

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout


def nvpmodel_mode(root: Path = Path("/"), run: Run | None = None) -> NvpModel | None:
    """The active power mode: ``nvpmodel -q`` ("NV Power Mode: MAXN" then the id), else the files it keeps.

    Files: /var/lib/nvpmodel/status ("pmode:0002", what nvpmodel last set) or
    else the ``< PM_CONFIG DEFAULT=n >`` of /etc/nvpmodel.conf, named by its
    ``< POWER_MODEL ID=n NAME=... >`` line. `run` defaults to the real command
    only on the real root (a fake tree has no nvpmodel of its own)."""
    if run is None and Path(root) == Path("/"):
        run = _run
    if run is not None:
        try:
            m = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)", run(["nvpmodel", "-q"]))
            if m:
                return NvpModel(int(m.group(2)), m.group(1))
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("nvpmodel -q failed: %s", exc)
    try:
        conf = (Path(root) / "etc/nvpmodel.conf").read_text()
    except OSError:
        return None
    mode = None
    status = Path(root) / "var/lib/nvpmodel/status"
    if status.is_file():
        m = re.search(r"pmode:(\d+)", status.read_text())
        mode = int(m.group(1)) if m else None
    if mode is None:
        m = re.search(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)\s*>", conf)
        if not m:
            return None
        mode = int(m.group(1))
    m = re.search(rf"<\s*POWER_MODEL\s+ID={mode}\s+NAME=(\S+?)\s*>", conf)
    return NvpModel(mode, m.group(1) if m else f"mode {mode}")


# ---------------------------------------------------------------------- NVML
class NvmlKnob(_Undoable):
    """A data-center GPU's graphics clock through NVML, locked with nvmlDeviceSetGpuLockedClocks (MHz)."""

    name = "nvml-gpu"

    def __init__(self, nvml: Any, index: int = 0, journal: ClockJournal | None = None) -> None:
        super().__init__(journal, nvml=nvml)
        self.index = index
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpu = nvml.nvmlDeviceGetName(self.handle)
        self.detail = f"NVML GPU {index} ({gpu.decode() if isinstance(gpu, bytes) else gpu})"
        # The graphics clocks offered depend on the memory clock; a locked graphics clock leaves memory at its
        # default, the highest, so its list is the one that applies.
        mem = max(nvml.nvmlDeviceGetSupportedMemoryClocks(self.handle))
        self._freqs = sorted({int(m) * 1_000_000 for m in nvml.nvmlDeviceGetSupportedGraphicsClocks(self.handle, mem)})

    def frequencies(self) -> list[int]:
        return list(self._freqs)

    def current(self) -> int:
        graphics = getattr(self._nvml, "NVML_CLOCK_GRAPHICS", 0)
        return int(_nvml_call(self._nvml, f"read the clock of NVML GPU {self.index}", "nvmlDeviceGetClockInfo",
                              self.handle, graphics)) * 1_000_000

    def check(self) -> None:
        """NVML cannot tell permission before trying: lock() names what is missing."""

    def lock(self, hz: int) -> None:
        if hz not in self._freqs:
            raise ValueError(f"{hz} Hz is not a graphics clock {self.detail} supports "
                             f"({len(self._freqs)} from {self._freqs[0]} to {self._freqs[-1]} Hz)")
        key = f"nvml-clocks:{self.index}"
        first = self._keep(key, {"kind": "nvml-clocks", "index": self.index})
        mhz = hz // 1_000_000
        try:
            _nvml_call(self._nvml, f"lock the clock of {self.detail} to {mhz} MHz", "nvmlDeviceSetGpuLockedClocks",
                       self.handle, mhz, mhz)
        except ClockError:
            if first:  # refused: nothing changed, nothing to restore
                self._forget(key)
            raise


class PowerLimit(_Undoable):
    """A data-center GPU's board power limit through NVML, in watts (NVML counts milliwatts)."""

    def __init__(self, nvml: Any, index: int = 0, journal: ClockJournal | None = None) -> None:
        super().__init__(journal, nvml=nvml)
        self.index = index
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.detail = f"NVML GPU {index} power limit"

    def limits(self) -> tuple[float, float]:
        """(lowest, highest) watts the limit may be set to."""
        lo, hi = _nvml_call(self._nvml, f"read the {self.detail} range",
                            "nvmlDeviceGetPowerManagementLimitConstraints", self.handle)
        return lo / 1e3, hi / 1e3

    def _mw(self) -> int:
        return int(_nvml_call(self._nvml, f"read the {self.detail}", "nvmlDeviceGetPowerManagementLimit",
                              self.handle))

    def get(self) -> float:
        return self._mw() / 1e3

    def set(self, watts: float) -> None:
        lo, hi = self.limits()
        if not lo <= watts <= hi:
            raise ValueError(f"{watts:g} W is outside the {lo:g}-{hi:g} W the {self.detail} allows")
        key = f"nvml-power:{self.index}"
        first = self._keep(key, {"kind": "nvml-power", "index": self.index, "mw": self._mw()})
        try:
            _nvml_call(self._nvml, f"set the {self.detail} to {watts:g} W", "nvmlDeviceSetPowerManagementLimit",
                       self.handle, round(watts * 1e3))
        except ClockError:
            if first:
                self._forget(key)
            raise


def find_nvml(nvml_module: Any = None, index: int = 0, journal: ClockJournal | None = None) -> NvmlKnob | None:
    """GPU `index`'s clock knob; None without pynvml, a driver, that GPU or a list of supported clocks."""
    nvml = import_nvml(nvml_module)
    if nvml is None:
        return None
    try:
        knob = NvmlKnob(nvml, index, journal)
    except Exception as exc:  # NVMLError subclasses: no such GPU, clocks not reported
        log.debug("NVML GPU %d has no clock knob: %s", index, exc)
        return None
    return knob if knob.frequencies() else None


def find_power_limit(nvml_module: Any = None, index: int = 0,
                     journal: ClockJournal | None = None) -> PowerLimit | None:
    """GPU `index`'s power limit; None where NVML is missing or the GPU reports no settable range."""
    nvml = import_nvml(nvml_module)
    if nvml is None:
        return None
    try:
        limit = PowerLimit(nvml, index, journal)
        limit.limits()
        limit.get()
    except Exception as exc:  # NVMLError (not supported) or ClockError wrapping it
        log.debug("NVML GPU %d has no power limit: %s", index, exc)
        return None
    return limit


# -------------------------------------------------------------------- choice
def find_knob(prefer: str = "auto", root: Path = Path("/"), nvml_module: Any = None,
              journal: ClockJournal | None = None, access: Access = _writable, write: Write = _write,
              run: Run | None = None) -> FrequencyKnob | None:
    """The first knob of ``KNOBS`` (or just `prefer`) this process can turn; None: nothing controllable.

    Auto skips a knob it may not write, with one warning line naming the file;
    a named one that is missing or not writable raises ClockError instead."""
    if prefer == "none":
        return None
    if prefer not in ("auto", *KNOBS):
        raise ValueError(f"unknown clock {prefer!r}; choose auto, none or one of {', '.join(KNOBS)}")
    finders: dict[str, Callable[[], Any]] = {
        "jetson-gpu": lambda: find_jetson_gpu(root, journal, access, write, run),
        "nvml-gpu": lambda: find_nvml(nvml_module, journal=journal),
        "cpufreq": lambda: find_cpufreq(root, journal, access, write),
    }
    missing = {
        "jetson-gpu": f"no GPU devfreq entry ({', '.join(GPU_DEVFREQ_NAMES)}) in {Path(root) / 'sys/class/devfreq'}",
        "nvml-gpu": "no NVIDIA GPU through NVML (is pynvml installed: pip install nvidia-ml-py; is the driver up?)",
        "cpufreq": f"no cpufreq policy with scaling_available_frequencies in "
                   f"{Path(root) / 'sys/devices/system/cpu/cpufreq'}",
    }
    for name in (KNOBS if prefer == "auto" else (prefer,)):
        knob = finders[name]()
        if knob is None:
            if prefer != "auto":
                raise ClockError(f"cannot use the {name} clock: {missing[name]}")
            continue
        try:
            knob.check()
        except ClockError as exc:
            if prefer != "auto":
                raise
            log.warning("%s; trying the next clock", exc)
            continue
        return knob
    return None

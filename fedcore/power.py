"""Average power and energy during local training, from what the device has.

Sources, tried in this order (the first one that reads wins):

- ``ina3221``: the Jetson's INA3221 power monitors through sysfs: the hwmon
  driver (``/sys/class/hwmon/hwmon*/`` named ``ina3221``: ``inN_label``,
  ``inN_input`` mV, ``currN_input`` mA; JetPack 5/6) or the older iio driver
  (``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/``: ``rail_name_N``,
  ``in_powerN_input`` mW; JetPack 4). A rail named VDD_IN (or POM_5V_IN) is
  the module's input and already contains the others, so it is used alone;
  otherwise the connected rails are summed (the AGX Orin has no input rail).
- ``nvml``: an NVIDIA GPU's board power through NVML (``pynvml``, used when
  importable; not a dependency). GPU board only, not the host.
- ``rapl``: the CPU packages' RAPL energy counters through powercap
  (``/sys/class/powercap/intel-rapl:N/energy_uj``, wrapping at
  ``max_energy_range_uj``; also AMD's on recent kernels). Packages only (or
  the platform ``psys`` domain where present), not the rest of the machine.

Where none reads, power is unknown (None), never a guess. Everything that
touches the machine is injectable (the sysfs root, the NVML module) so
tests use fake trees.
"""
from __future__ import annotations

import importlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

log = logging.getLogger("fedcore.power")

SOURCES = ("ina3221", "nvml", "rapl")
_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")  # module input rails (Orin NX/Nano; Xavier, TX2, Nano)


class PowerSource(Protocol):
    """Something that reads power (watts now) or energy (joules since it was opened)."""

    name: str
    kind: str  # "power" or "energy"
    detail: str

    def read(self) -> float: ...


def _num(path: Path) -> float:
    return float(path.read_text().strip())


# ------------------------------------------------------------------- INA3221
@dataclass
class Rail:
    label: str
    power_mw: Path | None = None  # old iio layout: power directly
    volt_mv: Path | None = None  # hwmon layout: voltage x current
    curr_ma: Path | None = None

    def read(self) -> float:
        """Watts now."""
        if self.power_mw is not None:
            return _num(self.power_mw) / 1e3
        assert self.volt_mv is not None and self.curr_ma is not None
        return _num(self.volt_mv) * _num(self.curr_ma) / 1e6


@dataclass
class SummedSource:
    """A reading summed over parts: INA3221 rails (watts) or RAPL domains (joules)."""

    name: str
    kind: str
    parts: list[Any]  # each with .label and .read()

    @property
    def detail(self) -> str:
        return "+".join(p.label for p in self.parts)

    def read(self) -> float:
        return sum(p.read() for p in self.parts)


def _hwmon_rails(sysfs: Path) -> list[Rail]:
    rails = []
    for dev in sorted((sysfs / "class/hwmon").glob("hwmon*")):
        name = dev / "name"
        if not name.is_file() or name.read_text().strip() != "ina3221":
            continue
        for label_file in sorted(dev.glob("in*_label")):
            n = label_file.name[2:-len("_label")]
            enable = dev / f"in{n}_enable"
            if enable.is_file() and enable.read_text().strip() == "0":
                continue
            volt, curr = dev / f"in{n}_input", dev / f"curr{n}_input"
            if volt.is_file() and curr.is_file():
                rails.append(Rail(label_file.read_text().strip(), volt_mv=volt, curr_ma=curr))
    return rails


def _iio_rails(sysfs: Path) -> list[Rail]:
    rails = []
    for dev in sorted((sysfs / "bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
        for name_file in sorted(dev.glob("rail_name_*")):
            n = name_file.name[len("rail_name_"):]
            power = dev / f"in_power{n}_input"
            if power.is_file():
                rails.append(Rail(name_file.read_text().strip(), power_mw=power))
    return rails


def find_ina3221(sysfs: Path = Path("/sys")) -> SummedSource | None:
    rails = [r for r in _hwmon_rails(sysfs) or _iio_rails(sysfs) if r.label and r.label.upper() != "NC"]
    inputs = [r for r in rails if r.label.upper() in _INPUT_RAILS]
    chosen = inputs[:1] or rails
    return SummedSource("ina3221", "power", chosen) if chosen else None


# ---------------------------------------------------------------------- NVML
@dataclass
class NvmlSource:
    nvml: Any  # the pynvml module (or a fake with the same functions)
    handle: Any
    index: int = 0
    name: str = "nvml"
    kind: str = "power"

    @property
    def detail(self) -> str:
        return f"GPU {self.index} board power"

    def read(self) -> float:
        return float(self.nvml.nvmlDeviceGetPowerUsage(self.handle)) / 1e3  # mW


def import_nvml(module: Any = None) -> Any:
    """The NVML module (pynvml unless given), initialised; None when it is not installed or NVML does not start."""
    if module is None:
        try:
            module = importlib.import_module("pynvml")
        except ImportError:
            return None
    try:
        module.nvmlInit()  # reference-counted by NVML: calling it again is harmless
    except Exception as exc:  # pynvml raises NVMLError subclasses: no driver, no GPU
        log.debug("NVML not usable: %s", exc)
        return None
    return module


def find_nvml(module: Any = None, index: int = 0) -> NvmlSource | None:
    module = import_nvml(module)
    if module is None:
        return None
    try:
        return NvmlSource(module, module.nvmlDeviceGetHandleByIndex(index), index)
    except Exception as exc:  # no such GPU, no permission
        log.debug("NVML not usable: %s", exc)
        return None


# ---------------------------------------------------------------------- RAPL
@dataclass
class RaplDomain:
    label: str
    energy_uj: Path
    max_range_uj: float
    last_raw: float | None = None
    total_uj: float = 0.0

    def read(self) -> float:
        """Read the counter; joules counted since the first read, across wraparounds."""
        raw = _num(self.energy_uj)
        if self.last_raw is not None:
            delta = raw - self.last_raw
            if delta < 0:  # the counter wrapped at max_energy_range_uj
                delta += self.max_range_uj
            self.total_uj += delta
        self.last_raw = raw
        return self.total_uj / 1e6


_TOP_DOMAIN = re.compile(r"^intel-rapl:\d+$")  # packages; intel-rapl:0:0 etc. are parts of them


def find_rapl(sysfs: Path = Path("/sys")) -> SummedSource | None:
    domains = []
    for d in sorted((sysfs / "class/powercap").glob("intel-rapl:*")):
        if not _TOP_DOMAIN.match(d.name):
            continue
        try:
            label = (d / "name").read_text().strip() if (d / "name").is_file() else d.name
            dom = RaplDomain(label, d / "energy_uj", _num(d / "max_energy_range_uj"))
            dom.read()  # unreadable (e.g. not root on a patched kernel) -> skip
        except (OSError, ValueError) as exc:
            log.debug("RAPL domain %s not usable: %s", d, exc)
            continue
        domains.append(dom)
    psys = [d for d in domains if d.label == "psys"]  # the platform domain contains the packages
    chosen = psys or domains
    return SummedSource("rapl", "energy", chosen) if chosen else None


# -------------------------------------------------------------------- choice
def find_source(prefer: str = "auto", sysfs: Path = Path("/sys"), nvml_module: Any = None,
                gpu_index: int = 0) -> PowerSource | None:
    """The first source of ``SOURCES`` (or just ``prefer``) that gives a reading; None: unknown."""
    if prefer == "none":
        return None
    if prefer not in ("auto", *SOURCES):
        raise ValueError(f"unknown power source {prefer!r}; choose auto, none or one of {', '.join(SOURCES)}")
    finders: dict[str, Callable[[], PowerSource | None]] = {
        "ina3221": lambda: find_ina3221(sysfs),
        "nvml": lambda: find_nvml(nvml_module, gpu_index),
        "rapl": lambda: find_rapl(sysfs),
    }
    for name in (SOURCES if prefer == "auto" else (prefer,)):
        src = finders[name]()
        if src is None:
            continue
        try:
            src.read()
        except (OSError, ValueError) as exc:
            log.debug("power source %s found but unreadable: %s", name, exc)
            continue
        except Exception as exc:  # NVML errors
            log.debug("power source %s failed: %s", name, exc)
            continue
        return src
    return None


# ------------------------------------------------------------------ sampling
@dataclass
class PowerReading:
    """Average power and energy over one measured interval."""

    source: str
    mean_w: float
    energy_j: float
    seconds: float
    samples: int


@dataclass
class PowerMeter:
    """Samples a source at ``hz`` in a background thread between start() and stop().

    Power sources are integrated over time (trapezoids); energy counters are
    differenced. The first and last samples are taken at start and stop, so
    the interval is covered whatever the rate.
    """

    source: PowerSource | None
    hz: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _errors: int = 0

    def __post_init__(self) -> None:
        if self.hz <= 0:
            raise ValueError(f"power sampling rate must be positive, got {self.hz} Hz")

    def sample(self) -> None:
        """Take one reading now (the thread calls this; tests may too)."""
        if self.source is None:
            return
        try:
            value = self.source.read()
        except Exception as exc:  # a rail that vanished, an NVML hiccup: skip the sample, keep going
            self._errors += 1
            if self._errors == 1:
                log.warning("power source %s: reading failed (%s); skipping samples", self.source.name, exc)
            return
        self._samples.append((self.clock(), value))

    def _loop(self) -> None:
        period = 1.0 / self.hz
        while not self._stop.wait(period):
            self.sample()

    def start(self) -> "PowerMeter":
        self._samples.clear()
        self._stop.clear()
        self.sample()
        if self.source is not None:
            self._thread = threading.Thread(target=self._loop, name="power-meter", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> PowerReading | None:
        """End the interval; None when power is unknown (no source, or under two readings)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.sample()
        return self.reading()

    def reading(self) -> PowerReading | None:
        if self.source is None or len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        seconds = t1 - t0
        if seconds <= 0:
            return None
        if self.source.kind == "energy":
            energy = v1 - v0
        else:
            energy = sum((tb - ta) * (va + vb) / 2
                         for (ta, va), (tb, vb) in zip(self._samples, self._samples[1:]))
        return PowerReading(self.source.name, energy / seconds, energy, seconds, len(self._samples))


def efficiency(tokens_per_s: float, watts: float | None) -> float | None:
    """Energy efficiency ηe = tokens/s per watt (the study's TPS / W); None when power is unknown."""
    if watts is None or watts <= 0:
        return None
    return tokens_per_s / watts

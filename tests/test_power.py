"""Power sources against fake sysfs trees and a fake NVML, and the sampler's arithmetic."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fedcore.power import (PowerMeter, efficiency, find_ina3221, find_nvml, find_rapl, find_source)


def _write(path: Path, text: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


def _hwmon_ina(sysfs: Path, dev: str, rails: dict[int, tuple[str, float, float]]) -> None:
    d = sysfs / "class/hwmon" / dev
    _write(d / "name", "ina3221")
    for n, (label, mv, ma) in rails.items():
        _write(d / f"in{n}_label", label)
        _write(d / f"in{n}_input", mv)
        _write(d / f"curr{n}_input", ma)


def test_ina3221_hwmon_sums_the_agx_orins_rails(tmp_path: Path) -> None:
    # AGX Orin (JetPack 6): no input rail; two INA3221 chips, one channel not connected.
    _hwmon_ina(tmp_path, "hwmon1", {1: ("VDD_GPU_SOC", 5000, 2000), 2: ("VDD_CPU_CV", 5000, 800),
                                    3: ("VIN_SYS_5V0", 5000, 1000)})
    _hwmon_ina(tmp_path, "hwmon2", {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 5000, 200)})
    _write(tmp_path / "class/hwmon/hwmon0/name", "thermal")  # another hwmon device, ignored
    src = find_ina3221(tmp_path)
    assert src is not None and src.kind == "power"
    assert src.detail == "VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO"
    assert src.read() == pytest.approx(10.0 + 4.0 + 5.0 + 1.0)


def test_ina3221_uses_the_input_rail_alone_when_there_is_one(tmp_path: Path) -> None:
    # Orin NX / Nano: VDD_IN is the module input and already contains the other two rails.
    _hwmon_ina(tmp_path, "hwmon3", {1: ("VDD_IN", 5080, 1500), 2: ("VDD_CPU_GPU_CV", 5080, 600),
                                    3: ("VDD_SOC", 5080, 400)})
    src = find_ina3221(tmp_path)
    assert src is not None and src.detail == "VDD_IN"
    assert src.read() == pytest.approx(5.08 * 1.5)
    _write(tmp_path / "class/hwmon/hwmon3/in1_enable", 0)  # a disabled channel is skipped
    assert find_ina3221(tmp_path).detail == "VDD_CPU_GPU_CV+VDD_SOC"


def test_ina3221_old_iio_layout(tmp_path: Path) -> None:
    # Xavier / TX2 (JetPack 4): power in mW per rail.
    d = tmp_path / "bus/i2c/drivers/ina3221x/1-0040/iio:device0"
    for n, (name, mw) in enumerate([("GPU", 3500), ("CPU", 1200), ("SOC", 800)]):
        _write(d / f"rail_name_{n}", name)
        _write(d / f"in_power{n}_input", mw)
    src = find_ina3221(tmp_path)
    assert src is not None and src.read() == pytest.approx(5.5)
    _write(d / "in_power0_input", 7000)  # values are re-read on every sample
    assert src.read() == pytest.approx(9.0)


def _rapl(sysfs: Path, n: int | str, energy_uj: object, max_uj: int, name: str = "package-0") -> Path:
    d = sysfs / "class/powercap" / f"intel-rapl:{n}"
    _write(d / "name", name)
    _write(d / "energy_uj", energy_uj)
    _write(d / "max_energy_range_uj", max_uj)
    return d / "energy_uj"


def test_rapl_counts_energy_across_a_counter_wraparound(tmp_path: Path) -> None:
    pkg0 = _rapl(tmp_path, 0, 999_000_000, 1_000_000_000)
    pkg1 = _rapl(tmp_path, 1, 5_000_000, 1_000_000_000, "package-1")
    _rapl(tmp_path, "0:0", 7, 1_000_000_000, "core")  # a part of package 0: not counted again
    src = find_rapl(tmp_path)
    assert src is not None and src.kind == "energy" and src.detail == "package-0+package-1"
    assert src.read() == 0.0  # joules since the source was opened
    _write(pkg0, 1_500_000)  # wrapped: 1,000,000 uJ to the top, then 1,500,000 more
    _write(pkg1, 7_000_000)  # 2,000,000 uJ
    assert src.read() == pytest.approx(2.5 + 2.0)
    _write(pkg0, 3_500_000)
    assert src.read() == pytest.approx(6.5)


def test_rapl_psys_domain_alone_and_unreadable_counters(tmp_path: Path) -> None:
    _rapl(tmp_path, 0, 10, 1000)
    _rapl(tmp_path, 1, 10, 1000, "psys")
    assert find_rapl(tmp_path).detail == "psys"
    assert find_rapl(tmp_path / "nothing") is None
    bad = tmp_path / "bad"
    _rapl(bad, 0, "not-a-number", 1000)
    assert find_rapl(bad) is None


class FakeNvml:
    """The four pynvml calls we use; readings in mW as NVML gives them."""

    def __init__(self, readings_mw: list[int], fail_init: bool = False) -> None:
        self.readings = list(readings_mw)
        self.fail_init = fail_init
        self.index = None

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.index = index
        return f"handle-{index}"

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        assert handle == f"handle-{self.index}"
        return self.readings.pop(0)


def test_nvml_reads_board_power_in_watts() -> None:
    fake = FakeNvml([75_800, 103_170])
    src = find_nvml(fake, index=1)
    assert src is not None and src.kind == "power" and fake.index == 1
    assert src.read() == pytest.approx(75.8)
    assert src.read() == pytest.approx(103.17)
    assert find_nvml(FakeNvml([], fail_init=True)) is None


def test_source_order_and_unknown(tmp_path: Path) -> None:
    _rapl(tmp_path, 0, 10, 1000)
    assert find_source("auto", tmp_path, nvml_module=FakeNvml([50_000])).name == "nvml"  # NVML before RAPL
    assert find_source("auto", tmp_path, nvml_module=FakeNvml([], fail_init=True)).name == "rapl"
    _hwmon_ina(tmp_path, "hwmon0", {1: ("VDD_IN", 5000, 1000)})
    assert find_source("auto", tmp_path, nvml_module=FakeNvml([50_000])).name == "ina3221"
    assert find_source("rapl", tmp_path).name == "rapl"
    assert find_source("none", tmp_path) is None
    # Nothing at all: unknown, not zero.
    assert find_source("auto", tmp_path / "empty", nvml_module=FakeNvml([], fail_init=True)) is None
    with pytest.raises(ValueError, match="unknown power source"):
        find_source("tegrastats", tmp_path)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_meter_integrates_power_and_differences_energy() -> None:
    clock = Clock()
    fake = FakeNvml([10_000, 30_000, 30_000])
    meter = PowerMeter(find_nvml(fake), hz=5, clock=clock)
    meter.sample()  # 10 W at t=0
    clock.t = 1.0
    meter.sample()  # 30 W at t=1: 20 J by trapezoid
    clock.t = 3.0
    meter.sample()  # 30 W until t=3: 60 J more
    r = meter.reading()
    assert r is not None and r.source == "nvml" and r.samples == 3
    assert r.energy_j == pytest.approx(80.0) and r.seconds == 3.0 and r.mean_w == pytest.approx(80 / 3)
    assert efficiency(8000.0, r.mean_w) == pytest.approx(300.0)
    assert efficiency(8000.0, None) is None


def test_meter_with_rapl_counts_joules_over_the_interval(tmp_path: Path) -> None:
    pkg = _rapl(tmp_path, 0, 262_143_000_000, 262_143_328_850)
    clock = Clock()
    meter = PowerMeter(find_rapl(tmp_path), clock=clock)
    meter.sample()
    _write(pkg, 2_000_000)  # wrapped: 328,850 + 2,000,000 uJ
    clock.t = 0.5
    meter.sample()
    r = meter.reading()
    assert r.energy_j == pytest.approx(2.32885) and r.mean_w == pytest.approx(4.6577)


def test_meter_thread_samples_in_the_background_and_unknown_stays_none() -> None:
    enough = threading.Event()

    class Counting:
        name, kind, detail = "fake", "power", "counting"
        reads = 0

        def read(self) -> float:
            Counting.reads += 1
            if Counting.reads >= 4:
                enough.set()
            return 12.0

    meter = PowerMeter(Counting(), hz=200).start()
    assert enough.wait(30), "the background thread never sampled"
    r = meter.stop()
    assert r is not None and r.samples >= 4 and r.mean_w == pytest.approx(12.0)
    assert r.energy_j == pytest.approx(12.0 * r.seconds)
    assert PowerMeter(None).start().stop() is None
    with pytest.raises(ValueError):
        PowerMeter(None, hz=0)

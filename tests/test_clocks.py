"""Clock and power-limit knobs against fake sysfs trees and a fake NVML: found, locked in a valid order, restored."""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest

from fedclient.clocks import (ClockError, ClockJournal, NvpModel, PowerLimit, find_cpufreq, find_jetson_gpu,
                              find_knob, find_nvml, find_power_limit, nvpmodel_mode, recover)

BOOT = "boot-1"
# AGX Orin GPU steps (Hz) as its available_frequencies lists them.
ORIN_GPU = [306000000, 408000000, 510000000, 612000000, 714000000, 816000000, 918000000, 1020000000,
            1122000000, 1224000000, 1300500000]
ORIN_CPU_KHZ = [115200, 729600, 1113600, 1497600, 1881600, 2201600]


def _write(path: Path, text: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}\n")


def _devfreq(root: Path, device: str, name: str, freqs: list[int] = ORIN_GPU, governor: str = "nvhost_podgov",
             lo: int | None = None, hi: int | None = None) -> Path:
    """A devfreq device at /sys/<device>/devfreq/<name>, linked from /sys/class/devfreq/<name> as the kernel does."""
    d = root / "sys" / device / "devfreq" / name
    _write(d / "available_frequencies", " ".join(map(str, freqs)))
    lo, hi = min(freqs) if lo is None else lo, max(freqs) if hi is None else hi
    _write(d / "min_freq", lo)
    _write(d / "max_freq", hi)
    _write(d / "cur_freq", hi)
    _write(d / "governor", governor)
    link = root / "sys/class/devfreq" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(d, link.parent))
    return d


def _cpufreq(root: Path, policy: int, khz: list[int] = ORIN_CPU_KHZ, governor: str = "schedutil") -> Path:
    d = root / "sys/devices/system/cpu/cpufreq" / f"policy{policy}"
    _write(d / "scaling_available_frequencies", " ".join(map(str, khz)) + " ")  # the kernel leaves a trailing space
    _write(d / "scaling_min_freq", khz[0])
    _write(d / "scaling_max_freq", khz[-1])
    _write(d / "scaling_cur_freq", khz[-1])
    _write(d / "scaling_governor", governor)
    return d


class StrictKernel:
    """Writes like the kernel: refuses (EINVAL) any write leaving min above max; records every write."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int]] = []

    def __call__(self, path: Path, text: str) -> None:
        is_min = "min" in path.name
        other = path.parent / (path.name.replace("min", "max") if is_min else path.name.replace("max", "min"))
        value, partner = int(text), int(other.read_text())
        lo, hi = (value, partner) if is_min else (partner, value)
        if lo > hi:
            raise OSError(errno.EINVAL, f"min {lo} above max {hi}")
        path.write_text(text + "\n")
        self.writes.append((f"{path.parent.name}/{path.name}", value))


def _values(d: Path, *names: str) -> list[int]:
    return [int((d / n).read_text()) for n in names]


@pytest.mark.parametrize("device,name", [
    ("devices/17000000.ga10b", "17000000.ga10b"),  # AGX Orin, JetPack 5
    ("devices/platform/bus@0/17000000.gpu", "17000000.gpu"),  # Orin, JetPack 6
    ("devices/17000000.gv11b", "17000000.gv11b"),  # Xavier
    ("devices/57000000.gpu", "57000000.gpu"),  # Nano
])
def test_the_jetson_gpu_is_found_where_the_module_and_jetpack_put_it(tmp_path: Path, device: str, name: str) -> None:
    _devfreq(tmp_path, "devices/15340000.vic", "15340000.vic", [115200000, 729600000])  # another engine: not it
    _devfreq(tmp_path, "devices/platform/bwmgr", "bwmgr", [204000000, 3199000000])  # memory (EMC): not it
    d = _devfreq(tmp_path, device, name, list(reversed(ORIN_GPU)))
    knob = find_jetson_gpu(tmp_path)
    assert knob is not None and knob.name == "jetson-gpu"
    assert knob.detail == str(d.resolve())
    assert knob.frequencies() == ORIN_GPU  # ascending, whatever the file's order
    assert knob.current() == ORIN_GPU[-1]
    assert knob.governor == "nvhost_podgov"


def test_a_gpu_named_only_by_its_device_tree_node_is_found(tmp_path: Path) -> None:
    d = _devfreq(tmp_path, "devices/gpu.0", "gpu.0")
    _write(d / "device/of_node/name", "gp10b\0")  # TX2: the devfreq name says nothing, the node does
    assert find_jetson_gpu(tmp_path).detail == str(d.resolve())
    assert find_jetson_gpu(tmp_path / "elsewhere") is None


def test_gpu_locks_in_a_valid_order_up_and_down_and_restores(tmp_path: Path) -> None:
    d = _devfreq(tmp_path, "devices/17000000.ga10b", "17000000.ga10b", lo=ORIN_GPU[0], hi=ORIN_GPU[-2])
    kernel = StrictKernel()
    knob = find_jetson_gpu(tmp_path, write=kernel)
    low, high = ORIN_GPU[2], ORIN_GPU[-1]
    knob.lock(low)  # below the current max: min first
    assert kernel.writes == [("17000000.ga10b/min_freq", low), ("17000000.ga10b/max_freq", low)]
    assert _values(d, "min_freq", "max_freq") == [low, low]
    kernel.writes.clear()
    knob.lock(high)  # above the current max: max first
    assert kernel.writes == [("17000000.ga10b/max_freq", high), ("17000000.ga10b/min_freq", high)]
    kernel.writes.clear()
    knob.lock(low)
    assert kernel.writes == [("17000000.ga10b/min_freq", low), ("17000000.ga10b/max_freq", low)]
    knob.restore()
    assert _values(d, "min_freq", "max_freq") == [ORIN_GPU[0], ORIN_GPU[-2]]
    assert not any("governor" in name for name, _ in kernel.writes)  # min = max pins it under any governor
    kernel.writes.clear()
    knob.restore()  # idempotent
    assert kernel.writes == []
    with pytest.raises(ValueError, match="not a frequency"):
        knob.lock(1_000_000_000)


def test_restoring_from_a_high_lock_raises_max_before_min(tmp_path: Path) -> None:
    # Originals [612 MHz, 1300.5 MHz]; locked at the lowest step, restoring must raise max before min.
    d = _devfreq(tmp_path, "devices/17000000.ga10b", "17000000.ga10b", lo=ORIN_GPU[3])
    kernel = StrictKernel()
    with find_jetson_gpu(tmp_path, write=kernel) as knob:
        knob.lock(ORIN_GPU[0])
        kernel.writes.clear()
    assert kernel.writes == [("17000000.ga10b/max_freq", ORIN_GPU[-1]), ("17000000.ga10b/min_freq", ORIN_GPU[3])]
    assert _values(d, "min_freq", "max_freq") == [ORIN_GPU[3], ORIN_GPU[-1]]


def test_a_killed_daemons_clocks_are_restored_at_the_next_start(tmp_path: Path) -> None:
    d = _devfreq(tmp_path, "devices/platform/bus@0/17000000.gpu", "17000000.gpu", lo=ORIN_GPU[3])
    journal_path = tmp_path / "state/clocks.json"
    knob = find_jetson_gpu(tmp_path, journal=ClockJournal(journal_path, BOOT), write=StrictKernel())
    knob.lock(ORIN_GPU[1])
    del knob  # SIGKILL: no restore, the journal stays
    assert _values(d, "min_freq", "max_freq") == [ORIN_GPU[1], ORIN_GPU[1]]
    kept = json.loads(journal_path.read_text())["entries"]
    assert list(kept.values())[0]["lo"] == ORIN_GPU[3] and list(kept.values())[0]["hi"] == ORIN_GPU[-1]
    kernel = StrictKernel()
    assert recover(journal_path, write=kernel, boot_id=BOOT) == [f"sysfs:{d.resolve()}"]
    assert _values(d, "min_freq", "max_freq") == [ORIN_GPU[3], ORIN_GPU[-1]]
    assert kernel.writes[0] == ("17000000.gpu/max_freq", ORIN_GPU[-1])  # min goes above the locked max: max first
    assert not journal_path.exists()
    assert recover(journal_path, boot_id=BOOT) == []  # nothing left: a clean start


def test_a_restart_that_locks_again_still_restores_the_first_originals(tmp_path: Path) -> None:
    d = _devfreq(tmp_path, "devices/17000000.ga10b", "17000000.ga10b")
    path = tmp_path / "clocks.json"
    find_jetson_gpu(tmp_path, journal=ClockJournal(path, BOOT)).lock(ORIN_GPU[4])  # then killed
    journal = ClockJournal(path, BOOT)  # restarted without recover(): the journal still holds the originals
    knob = find_jetson_gpu(tmp_path, journal=journal)
    knob.lock(ORIN_GPU[6])
    journal.restore_all()
    assert _values(d, "min_freq", "max_freq") == [ORIN_GPU[0], ORIN_GPU[-1]]
    assert not path.exists()


def test_a_journal_from_before_a_reboot_is_dropped_unapplied(tmp_path: Path) -> None:
    d = _devfreq(tmp_path, "devices/17000000.ga10b", "17000000.ga10b")
    path = tmp_path / "clocks.json"
    find_jetson_gpu(tmp_path, journal=ClockJournal(path, BOOT)).lock(ORIN_GPU[4])
    _write(d / "max_freq", ORIN_GPU[5])  # after the reboot nvpmodel set its own limits
    _write(d / "min_freq", ORIN_GPU[0])
    kernel = StrictKernel()
    assert recover(path, write=kernel, boot_id="boot-2") == []
    assert kernel.writes == [] and not path.exists()


def test_without_write_rights_one_line_names_the_file_and_nothing_changes(tmp_path: Path) -> None:
    d = _devfreq(tmp_path, "devices/17000000.ga10b", "17000000.ga10b")
    (d / "min_freq").chmod(0o444)
    (d / "max_freq").chmod(0o444)

    def by_mode(path: Path) -> bool:  # what os.access says for a non-root user (tests may run as root)
        return bool(path.stat().st_mode & 0o200)

    journal = ClockJournal(tmp_path / "clocks.json", BOOT)
    kernel = StrictKernel()
    knob = find_jetson_gpu(tmp_path, journal=journal, access=by_mode, write=kernel)
    with pytest.raises(ClockError) as err:
        knob.lock(ORIN_GPU[2])
    msg = str(err.value)
    assert "\n" not in msg and f"{d.resolve()}/min_freq is not writable by uid {os.geteuid()}" in msg
    assert "run fedclient as root" in msg
    assert kernel.writes == [] and not (tmp_path / "clocks.json").exists()
    assert _values(d, "min_freq", "max_freq") == [ORIN_GPU[0], ORIN_GPU[-1]]


def test_a_write_the_kernel_refuses_rolls_back_and_says_where(tmp_path: Path) -> None:
    d0, d1 = _cpufreq(tmp_path, 0), _cpufreq(tmp_path, 4)
    kernel = StrictKernel()

    def flaky(path: Path, text: str) -> None:  # policy4 refuses the lock once
        if path.parent == d1 and text == str(ORIN_CPU_KHZ[1]):
            raise OSError(errno.EBUSY, "Device or resource busy")
        kernel(path, text)

    journal = ClockJournal(tmp_path / "clocks.json", BOOT)
    knob = find_cpufreq(tmp_path, journal=journal, write=flaky)
    with pytest.raises(ClockError, match=f"cannot set {re.escape(str(d1))}.*Device or resource busy"):
        knob.lock(ORIN_CPU_KHZ[1] * 1000)
    for d in (d0, d1):  # policy0 was locked already: put back
        assert _values(d, "scaling_min_freq", "scaling_max_freq") == [ORIN_CPU_KHZ[0], ORIN_CPU_KHZ[-1]]
    assert journal.entries == {} and not journal.path.exists()


def test_cpufreq_locks_every_policy_in_khz_and_speaks_hz(tmp_path: Path) -> None:
    d0 = _cpufreq(tmp_path, 0)
    d4 = _cpufreq(tmp_path, 4, ORIN_CPU_KHZ[:-1] + [2035200])  # a cluster with another top step
    _write(tmp_path / "sys/devices/system/cpu/cpufreq/policy8/scaling_governor", "schedutil")  # inactive policy
    kernel = StrictKernel()
    knob = find_cpufreq(tmp_path, write=kernel)
    assert knob is not None and knob.name == "cpufreq" and knob.governor == "schedutil"
    assert knob.frequencies() == [k * 1000 for k in ORIN_CPU_KHZ[:-1]]  # what every policy offers
    assert knob.current() == ORIN_CPU_KHZ[-1] * 1000
    knob.lock(1_497_600_000)
    for d in (d0, d4):
        assert _values(d, "scaling_min_freq", "scaling_max_freq") == [1_497_600, 1_497_600]
    knob.restore()
    assert _values(d0, "scaling_min_freq", "scaling_max_freq") == [ORIN_CPU_KHZ[0], ORIN_CPU_KHZ[-1]]
    assert _values(d4, "scaling_min_freq", "scaling_max_freq") == [ORIN_CPU_KHZ[0], 2035200]
    with pytest.raises(ValueError):
        knob.lock(1_497_600)  # kHz where Hz is meant


def test_cpufreq_without_discrete_steps_is_no_knob(tmp_path: Path) -> None:
    d = _cpufreq(tmp_path, 0)
    (d / "scaling_available_frequencies").unlink()  # intel_pstate, amd-pstate: only a range
    assert find_cpufreq(tmp_path) is None


def test_nvpmodel_mode_from_the_command_or_its_files(tmp_path: Path) -> None:
    assert nvpmodel_mode(tmp_path, run=lambda cmd: "NV Power Mode: MAXN\n0\n") == NvpModel(0, "MAXN")

    def missing(cmd: list[str]) -> str:
        raise FileNotFoundError(cmd[0])

    assert nvpmodel_mode(tmp_path, run=missing) is None
    _write(tmp_path / "etc/nvpmodel.conf", "< POWER_MODEL ID=0 NAME=15W >\n< POWER_MODEL ID=1 NAME=25W >\n"
                                           "< POWER_MODEL ID=2 NAME=MAXN_SUPER >\n< PM_CONFIG DEFAULT=1 >\n")
    assert nvpmodel_mode(tmp_path, run=missing) == NvpModel(1, "25W")  # the boot default
    _write(tmp_path / "var/lib/nvpmodel/status", "pmode:0002 fmode:quiet")
    assert nvpmodel_mode(tmp_path, run=missing) == NvpModel(2, "MAXN_SUPER")  # what nvpmodel last set
    _devfreq(tmp_path, "devices/17000000.ga10b", "17000000.ga10b")
    assert str(find_jetson_gpu(tmp_path, run=missing).nvpmodel) == "MAXN_SUPER (2)"


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """pynvml's functions used here, for one A100-like GPU; `root=False` refuses every change as NVML does."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_CLOCK_GRAPHICS = 0
    GRAPHICS_MHZ = {1215: [1410, 1395, 1380, 1200, 1005, 810, 210], 405: [405, 210]}

    def __init__(self, root: bool = True) -> None:
        self.root = root
        self.locked: tuple[int, int] | None = None
        self.limit_mw = 400_000
        self.calls: list[tuple[str, ...]] = []

    def _change(self, *call: object) -> None:
        if not self.root:
            raise NVMLError(self.NVML_ERROR_NO_PERMISSION)
        self.calls.append(tuple(map(str, call)))

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index != 0:
            raise NVMLError(2)
        return "gpu0"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA A100-SXM4-40GB"

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: str) -> list[int]:
        return list(self.GRAPHICS_MHZ)

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: str, mem_mhz: int) -> list[int]:
        return self.GRAPHICS_MHZ[mem_mhz]

    def nvmlDeviceGetClockInfo(self, handle: str, kind: int) -> int:
        assert kind == self.NVML_CLOCK_GRAPHICS
        return self.locked[0] if self.locked else 1410

    def nvmlDeviceSetGpuLockedClocks(self, handle: str, lo: int, hi: int) -> None:
        self._change("lock", lo, hi)
        self.locked = (lo, hi)

    def nvmlDeviceResetGpuLockedClocks(self, handle: str) -> None:
        self._change("reset")
        self.locked = None

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: str) -> list[int]:
        return [100_000, 400_000]

    def nvmlDeviceGetPowerManagementLimit(self, handle: str) -> int:
        return self.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle: str, mw: int) -> None:
        self._change("limit", mw)
        self.limit_mw = mw


def test_nvml_locks_the_graphics_clock_in_mhz_and_resets_it(tmp_path: Path) -> None:
    nvml = FakeNvml()
    knob = find_nvml(nvml, journal=ClockJournal(tmp_path / "clocks.json", BOOT))
    assert knob is not None and knob.detail == "NVML GPU 0 (NVIDIA A100-SXM4-40GB)"
    assert knob.frequencies() == [m * 1_000_000 for m in sorted(FakeNvml.GRAPHICS_MHZ[1215])]  # at the top memory clock
    knob.lock(1_005_000_000)
    assert nvml.calls == [("lock", "1005", "1005")] and knob.current() == 1_005_000_000
    with pytest.raises(ValueError):
        knob.lock(1_000_000_000)
    knob.restore()
    assert nvml.calls[-1] == ("reset",) and nvml.locked is None
    assert not (tmp_path / "clocks.json").exists()
    assert find_nvml(nvml, index=1) is None


def test_nvml_without_permission_says_to_run_as_root_and_records_nothing(tmp_path: Path) -> None:
    journal = ClockJournal(tmp_path / "clocks.json", BOOT)
    knob = find_knob("nvml-gpu", tmp_path, FakeNvml(root=False), journal)
    with pytest.raises(ClockError, match=r"cannot lock the clock of NVML GPU 0 .* to 1410 MHz: NVML denies "
                                         r"permission \(run fedclient as root"):
        knob.lock(1_410_000_000)
    assert journal.entries == {} and not journal.path.exists()
    limit = find_power_limit(FakeNvml(root=False), journal=journal)
    with pytest.raises(ClockError, match="denies permission"):
        limit.set(250)
    assert not journal.path.exists()


def test_power_limit_in_watts_within_its_range_restored_after_a_kill(tmp_path: Path) -> None:
    nvml = FakeNvml()
    path = tmp_path / "clocks.json"
    limit = find_power_limit(nvml, journal=ClockJournal(path, BOOT))
    assert limit.limits() == (100.0, 400.0) and limit.get() == 400.0
    with pytest.raises(ValueError, match="outside the 100-400 W"):
        limit.set(450)
    limit.set(250)
    limit.set(200)
    assert nvml.limit_mw == 200_000
    clocks = find_nvml(nvml, journal=limit.journal)
    clocks.lock(810_000_000)
    del limit, clocks  # killed
    assert recover(path, nvml_module=nvml, boot_id=BOOT) == ["nvml-clocks:0", "nvml-power:0"]  # newest first
    assert nvml.limit_mw == 400_000 and nvml.locked is None and not path.exists()
    with PowerLimit(nvml) as limit:  # a normal exit
        limit.set(150.5)
    assert nvml.calls[-1] == ("limit", "400000")


class NoDriver(FakeNvml):
    def nvmlInit(self) -> None:
        raise NVMLError(9)  # NVML_ERROR_DRIVER_NOT_LOADED


def test_a_journal_naming_nvml_without_nvml_is_kept_for_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "clocks.json"
    find_nvml(FakeNvml(), journal=ClockJournal(path, BOOT)).lock(1_410_000_000)
    assert recover(path, nvml_module=NoDriver(), boot_id=BOOT) == []
    assert path.exists()


def test_find_knob_order_and_errors(tmp_path: Path) -> None:
    assert find_knob("auto", tmp_path, NoDriver()) is None  # nothing controllable
    _cpufreq(tmp_path, 0)
    assert find_knob("auto", tmp_path, NoDriver()).name == "cpufreq"
    assert find_knob("auto", tmp_path, FakeNvml(), run=lambda cmd: "").name == "nvml-gpu"
    d = _devfreq(tmp_path, "devices/17000000.ga10b", "17000000.ga10b")
    assert find_knob("auto", tmp_path, FakeNvml(), run=lambda cmd: "").name == "jetson-gpu"

    def gpu_locked_down(path: Path) -> bool:
        return d.name not in str(path)

    knob = find_knob("auto", tmp_path, FakeNvml(), access=gpu_locked_down, run=lambda cmd: "")
    assert knob.name == "nvml-gpu"  # the GPU devfreq is not writable: skipped with a warning
    with pytest.raises(ClockError, match="min_freq is not writable"):
        find_knob("jetson-gpu", tmp_path, access=gpu_locked_down, run=lambda cmd: "")
    with pytest.raises(ClockError, match="no GPU devfreq entry"):
        find_knob("jetson-gpu", tmp_path / "bare")
    with pytest.raises(ValueError, match="unknown clock"):
        find_knob("turbo", tmp_path)
    assert find_knob("none", tmp_path) is None
    assert find_knob("auto", tmp_path / "bare", FakeNvml(root=True), access=lambda p: False).name == "nvml-gpu"
    assert find_knob("cpufreq", tmp_path).name == "cpufreq"

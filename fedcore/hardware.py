"""Peak FLOP/s of the devices we run on, and which device this is.

GPU peaks are dense 16-bit tensor-core figures (no sparsity), the scale the
study's MFU uses. A CPU's peak is an estimate from its flags: cores x clock
x fp32 FLOPs per cycle. A device we cannot identify has an unknown peak
(MFU is then reported as unknown) unless the config names the hardware or
gives ``peak_tflops``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    """A device and its peak compute; ``peak_flops`` None means unknown."""

    name: str
    peak_flops: float | None
    source: str  # where the peak comes from, for reports


# Ampere tensor cores do 256 dense FP16 FMA = 512 FLOPs per clock each; the
# study's 42.5 TFLOP/s for the AGX Orin 64GB is exactly 64 TCs x 1.3 GHz x 512.
# The other Orin modules are scaled the same way from NVIDIA's Jetson Orin
# module data sheets (tensor cores, max GPU clock); "super" modes not included.
_ORIN_TC_FLOPS = 512


def _orin(tensor_cores: int, ghz: float) -> float:
    return tensor_cores * ghz * 1e9 * _ORIN_TC_FLOPS


# key -> (display name, peak FLOP/s, source)
PEAKS: dict[str, tuple[str, float, str]] = {
    # NVIDIA A100 data sheet: BF16/FP16 tensor 312 TFLOP/s dense (624 sparse); the study's figure.
    "a100": ("NVIDIA A100", 312e12, "A100 data sheet, BF16 dense (study)"),
    # NVIDIA H100 data sheet: BF16 dense = half the sparse figures 1,979 (SXM), 1,513 (PCIe), 1,671 (NVL).
    "h100-sxm": ("NVIDIA H100 SXM", 989.4e12, "H100 data sheet, BF16 dense"),
    "h100-pcie": ("NVIDIA H100 PCIe", 756.5e12, "H100 data sheet, BF16 dense"),
    "h100-nvl": ("NVIDIA H100 NVL", 835.5e12, "H100 data sheet, BF16 dense"),
    # The study's figure for its clients; = 64 TCs x 1.3 GHz x 512.
    "agx-orin-64gb": ("Jetson AGX Orin 64GB", 42.5e12, "study (64 TC x 1.3 GHz, FP16 dense)"),
    "agx-orin-32gb": ("Jetson AGX Orin 32GB", _orin(56, 0.930), "Orin data sheet: 56 TC x 930 MHz, FP16 dense"),
    "orin-nx-16gb": ("Jetson Orin NX 16GB", _orin(32, 0.918), "Orin data sheet: 32 TC x 918 MHz, FP16 dense"),
    "orin-nx-8gb": ("Jetson Orin NX 8GB", _orin(32, 0.765), "Orin data sheet: 32 TC x 765 MHz, FP16 dense"),
    "orin-nano-8gb": ("Jetson Orin Nano 8GB", _orin(32, 0.625), "Orin data sheet: 32 TC x 625 MHz, FP16 dense"),
    "orin-nano-4gb": ("Jetson Orin Nano 4GB", _orin(16, 0.625), "Orin data sheet: 16 TC x 625 MHz, FP16 dense"),
}


def from_table(key: str) -> Hardware:
    """A device from :data:`PEAKS` by key (case-insensitive)."""
    k = key.strip().lower()
    if k not in PEAKS:
        raise ValueError(f"unknown hardware {key!r}; known: {', '.join(PEAKS)} (or set peak_tflops)")
    name, peak, source = PEAKS[k]
    return Hardware(name, peak, source)


def jetson_key(model: str, mem_bytes: int) -> str | None:
    """The table key for /proc/device-tree/model text; memory tells the module variants apart."""
    m = model.lower()
    gb = mem_bytes / 2**30
    if "orin" not in m:
        return None
    if "agx" in m:
        return "agx-orin-64gb" if gb > 40 else "agx-orin-32gb"
    if "nx" in m:
        return "orin-nx-16gb" if gb > 10 else "orin-nx-8gb"
    if "nano" in m:
        return "orin-nano-8gb" if gb > 5 else "orin-nano-4gb"
    return None


def cuda_key(device_name: str) -> str | None:
    """The table key for a CUDA device name such as 'NVIDIA A100-SXM4-80GB'."""
    n = device_name.lower()
    if "a100" in n:
        return "a100"
    if "h100" in n:
        if "nvl" in n:
            return "h100-nvl"
        return "h100-pcie" if "pcie" in n else "h100-sxm"
    return None


def cpu_flops_per_cycle(flags: set[str]) -> tuple[int, str]:
    """fp32 FLOPs per cycle and core from CPU flags, assuming two FMA pipes of the widest vector unit.

    An upper bound: some cores have one 512-bit pipe or split AVX-512 into two
    256-bit halves.
    """
    if "avx512f" in flags:
        return 64, "avx512f"  # 2 x 16 lanes x FMA
    if "avx2" in flags and "fma" in flags:
        return 32, "avx2+fma"
    if "avx" in flags:
        return 16, "avx"  # separate 8-lane add and multiply
    if "asimd" in flags:
        return 16, "asimd"  # aarch64 NEON, 2 x 4 lanes x FMA (Orin's Cortex-A78AE)
    if "sse2" in flags:
        return 8, "sse2"
    return 2, "scalar"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def cpu_hardware(cores: int, root: Path = Path("/")) -> Hardware:
    """Estimated peak of ``cores`` CPU cores from /proc/cpuinfo and cpufreq under ``root``."""
    info = _read(root / "proc/cpuinfo") or ""
    flags: set[str] = set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            flags.update(value.split())
    name_m = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", info, re.M)
    name = name_m.group(1).strip() if name_m else "CPU"
    ghz = None
    max_khz = _read(root / "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_khz and max_khz.strip().isdigit():
        ghz = int(max_khz) / 1e6
    else:
        mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", info, re.M)
        ghz = float(mhz.group(1)) / 1e3 if mhz else None
    per_cycle, isa = cpu_flops_per_cycle(flags)
    label = f"{name} ({cores} core{'s' if cores != 1 else ''})"
    if ghz is None:
        return Hardware(label, None, "CPU clock unknown")
    return Hardware(label, cores * ghz * 1e9 * per_cycle,
                    f"estimate: {cores} core(s) x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({isa})")


def cpu_cores_in_use(threads: int = 0) -> int:
    """Physical cores a process with ``threads`` torch threads can keep busy (0: all it may use)."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or usable
    cores = min(usable, physical)
    return min(cores, threads) if threads > 0 else cores


def detect(device_type: str, cuda_name: str = "", cpu_threads: int = 0, root: Path = Path("/"),
           mem_bytes: int | None = None) -> Hardware:
    """This machine: a Jetson by its device tree, a CUDA GPU by name, else the CPU estimate."""
    if device_type == "cuda":
        model = (_read(root / "proc/device-tree/model") or "").strip("\x00 \n")
        if model:
            if mem_bytes is None:
                import psutil

                mem_bytes = psutil.virtual_memory().total
            key = jetson_key(model, mem_bytes)
            if key:
                return from_table(key)
        key = cuda_key(cuda_name)
        if key:
            return from_table(key)
        return Hardware(cuda_name or model or "CUDA device", None, "not in the peak table; set peak_tflops")
    return cpu_hardware(cpu_cores_in_use(cpu_threads), root)


def resolve(hardware: str = "", peak_tflops: float = 0.0, *, detected: Hardware | None = None) -> Hardware:
    """Config first (``hardware`` key, then ``peak_tflops`` override), else what was detected."""
    hw = from_table(hardware) if hardware else (detected or Hardware("unknown", None, "not detected"))
    if peak_tflops > 0:
        hw = Hardware(hw.name, peak_tflops * 1e12, "config peak_tflops")
    return hw

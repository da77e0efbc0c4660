"""Peak FLOP/s: the table, device detection from fake /proc and /sys trees, the config override."""
from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.hardware import PEAKS, cpu_flops_per_cycle, cpu_hardware, cuda_key, detect, from_table, resolve

GB = 2**30


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_table_holds_the_studys_peaks_and_the_orin_family() -> None:
    assert from_table("a100").peak_flops == 312e12
    assert from_table("AGX-Orin-64GB").peak_flops == 42.5e12
    # The other Orin modules scale by tensor cores x GPU clock from the 64GB's 64 x 1.3 GHz.
    assert from_table("agx-orin-32gb").peak_flops == pytest.approx(42.5e12 * 56 / 64 * 930 / 1300, rel=0.01)
    assert from_table("orin-nano-4gb").peak_flops == pytest.approx(42.5e12 * 16 / 64 * 625 / 1300, rel=0.01)
    assert all(peak > 0 for _, peak, _ in PEAKS.values())
    with pytest.raises(ValueError, match="known: a100"):
        from_table("tpu-v5")


def test_jetson_detected_from_the_device_tree_and_memory(tmp_path: Path) -> None:
    _write(tmp_path / "proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert detect("cuda", "Orin", root=tmp_path, mem_bytes=61 * GB).name == "Jetson AGX Orin 64GB"
    assert detect("cuda", "Orin", root=tmp_path, mem_bytes=30 * GB).name == "Jetson AGX Orin 32GB"
    _write(tmp_path / "proc/device-tree/model", "NVIDIA Jetson Orin NX Engineering Reference Developer Kit")
    assert detect("cuda", "Orin", root=tmp_path, mem_bytes=15 * GB).name == "Jetson Orin NX 16GB"
    _write(tmp_path / "proc/device-tree/model", "NVIDIA Jetson Orin Nano Developer Kit")
    assert detect("cuda", "Orin", root=tmp_path, mem_bytes=7 * GB).name == "Jetson Orin Nano 8GB"


def test_cuda_names_and_unknown_gpus(tmp_path: Path) -> None:
    assert cuda_key("NVIDIA A100-SXM4-80GB") == "a100"
    assert cuda_key("NVIDIA H100 PCIe") == "h100-pcie" and cuda_key("NVIDIA H100 NVL") == "h100-nvl"
    assert cuda_key("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert detect("cuda", "NVIDIA A100-PCIE-40GB", root=tmp_path).peak_flops == 312e12
    unknown = detect("cuda", "NVIDIA GeForce RTX 4090", root=tmp_path)
    assert unknown.peak_flops is None and "peak_tflops" in unknown.source  # unknown, not guessed


def test_cpu_estimate_from_flags_and_clock(tmp_path: Path) -> None:
    _write(tmp_path / "proc/cpuinfo", "model name\t: Test CPU\ncpu MHz\t\t: 2500.000\nflags\t\t: fpu sse2 avx fma avx2\n")
    hw = cpu_hardware(4, tmp_path)
    assert hw.peak_flops == pytest.approx(4 * 2.5e9 * 32) and "avx2+fma" in hw.source
    _write(tmp_path / "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", "3000000\n")  # kHz wins over MHz
    assert cpu_hardware(1, tmp_path).peak_flops == pytest.approx(3e9 * 32)
    assert cpu_flops_per_cycle({"avx512f", "avx2", "fma"}) == (64, "avx512f")
    assert cpu_flops_per_cycle({"avx"}) == (16, "avx")
    assert cpu_flops_per_cycle({"fp", "asimd"}) == (16, "asimd")  # aarch64 "Features"
    empty = tmp_path / "empty"
    assert cpu_hardware(2, empty).peak_flops is None  # no clock known: unknown


def test_config_overrides_detection() -> None:
    detected = detect("cpu")
    assert resolve("", 0.0, detected=detected) == detected
    assert resolve("a100", 0.0, detected=detected).peak_flops == 312e12
    over = resolve("agx-orin-64gb", 40.0, detected=detected)
    assert over.peak_flops == 40e12 and over.name == "Jetson AGX Orin 64GB" and over.source == "config peak_tflops"

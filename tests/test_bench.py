"""`fedclient bench`: the Table 4 layout, the study's rows beside ours, out-of-memory handling."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedclient import bench
from fedclient.bench import BenchRow, render, training_bytes
from fedclient.cli import main
from fedclient.config import BenchConfig
from fedclient.trainer import StepTimes
from fedcore.flops import T5Shape
from fedcore.hardware import Hardware

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bench_runs_the_tiny_preset_and_prints_table4(capsys) -> None:
    code = main(["bench", "--preset", "tiny", "--batch-sizes", "2,1", "--steps", "2", "--warmup", "0",
                 "--input-tokens", "32", "--target-tokens", "8", "--threads", "1", "--power-source", "none"])
    out = capsys.readouterr().out
    assert code == 0, out
    table = out[out.index("model  batch"):].splitlines()
    rows = [line.split() for line in table[2:4]]
    assert [r[:3] for r in rows] == [["tiny", "1", "this"], ["tiny", "2", "this"]]  # sorted by batch
    for r in rows:
        load, fwd, loss, bwd, opt, total, tps = map(float, r[4:11])
        # Cells are printed to 3 decimals: allow their rounding (up to 0.0005 s each).
        assert total == pytest.approx(load + fwd + loss + bwd + opt, abs=0.0031)
        assert tps == pytest.approx(int(r[1]) * 32 / total, rel=0.0006 / total + 0.01)
        assert r[11:13] == ["-", "-"]  # power none: W and ηe unknown, not 0
        assert float(r[13]) > 0 and float(r[14]) > 0  # MFU against this CPU's estimated peak
    assert "(study)" not in out  # the study did not measure tiny


def test_cpu_configuration_that_does_not_fit_is_reported_not_run(monkeypatch) -> None:
    monkeypatch.setattr(bench.psutil, "virtual_memory", lambda: SimpleNamespace(available=1 << 30))
    monkeypatch.setattr(bench.psutil, "Process", lambda: SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=0)))
    import torch

    shape = T5Shape.from_preset("small")
    row = bench.bench_one(torch.nn.Linear(1, 1), shape, "small", 64, BenchConfig(), torch.device("cpu"), None)
    assert row.times is None
    needed = training_bytes(shape, 64, 512, 95) / 2**30
    assert row.oom == f"out of memory (needs ~{needed:.1f} GB, 1.0 GB available)"
    assert needed > 20  # small at 64 x 512 tokens does not fit this 24 GB machine


def test_render_puts_the_studys_rows_beside_ours() -> None:
    cfg = BenchConfig(preset=["small", "base"], batch_sizes=[8, 64])
    ours = BenchRow("small", 8, StepTimes(0.01, 1.0, 0.01, 2.0, 0.5, 1), power_w=None,
                    flops_per_step=8 * 1e11, study_flops_per_step=8 * 512 * 5e8)
    lines = render([ours, BenchRow("base", 64, oom="out of memory (needs ~30.0 GB, 20.0 GB available)")],
                   Hardware("cpu", 1e12, "test"), cfg)
    text = "\n".join(lines)
    orin = next(line for line in lines if line.startswith("small      8  Orin (study)"))
    assert "5665.54" in orin and "28.10" in orin and "200.75" in orin and orin.split()[-1] == "6.50"
    # Our MFU at the study's TPS: 1e11 FLOPs per item x 5665.54/512 items/s over 42.5 TFLOP/s.
    assert float(orin.split()[-2]) == pytest.approx(100 * 1e11 * 5665.54 / 512 / 42.5e12, abs=0.01)
    mine = lines[2].split()
    assert mine[:4] == ["small", "8", "this", "device"] and float(mine[10]) == pytest.approx(8 * 512 / 3.52, rel=1e-3)
    assert float(mine[-2]) == pytest.approx(8e11 / 3.52 / 1e12 * 100, abs=0.01)
    assert "base      64  this device   out of memory (needs ~30.0 GB" in text
    assert "base      64  Orin (study)  out of memory" in text and "base      64  A100 (study)" in text

"""Power-capped training on the EMULATED Orin: the fit, profiling and its cache, the controller, the watchdog,
the gradient noise scale, and `fedclient bench --power-cap`. No sleeping: emulated time is a fake clock."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from fedclient import powercap as pc
from fedclient.emulated import ORIN_GPU_HZ, EmulatedOrin, fit_orin
from fedcore.clock import manual_clock
from fedcore.power import PowerMeter

# The study's Table 2, FLAN-T5-Small on the AGX Orin: batch -> (average W, TPS), as printed.
TABLE2_SMALL_ORIN = {1: (16.7, 923.04), 8: (28.1, 5641.15), 16: (35.8, 7099.35), 32: (38.84, 7633.56),
                     64: (38.82, 7903.25), 128: (41.08, 8040.93)}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
SAMPLES, REF = 3200, 32


def _key(**changes: object) -> pc.ProfileKey:
    key = pc.ProfileKey("EMULATED agx-orin-64gb", "small", 512, 95, "emulated-gpu", ORIN_GPU_HZ, BATCHES)
    return replace(key, **changes)


def _profile(dev: EmulatedOrin, key: pc.ProfileKey | None = None, echo=lambda _: None) -> pc.Profile:
    return pc.profile_grid(dev.step, dev.gpu, dev.power, dev.clock, key or _key(), warmup=1, steps=3, echo=echo)


@pytest.fixture(scope="module")
def orin_profile() -> pc.Profile:
    return _profile(EmulatedOrin())


def _steps(batch: int, noise: float) -> int:  # McCandlish et al.: S(B) = S_min (1 + B_noise/B)
    return math.ceil(SAMPLES / (REF + noise) * (1 + noise / batch))


# ------------------------------------------------------------------ emulation
def test_emulation_reproduces_the_studys_orin_table_at_the_top_clock() -> None:
    m = fit_orin("small")
    for batch, (watts, tps) in TABLE2_SMALL_ORIN.items():
        step = m.step_s(batch, ORIN_GPU_HZ[-1])
        assert batch * 512 / step == pytest.approx(tps, rel=0.005), batch  # the docstring's 0.5%
        assert m.watts(batch, ORIN_GPU_HZ[-1]) == pytest.approx(watts, rel=0.03), batch  # and 3%
    assert max(abs(e[1]) for e in m.fit_errors()) < 0.005 and max(abs(e[2]) for e in m.fit_errors()) < 0.03
    assert m.max_batch == 128 and 0 < m.memory_per_item_s < m.compute_per_item_s
    with pytest.raises(ValueError, match="needs 5"):
        fit_orin("large")  # two rows: nothing to fit


def test_emulated_gpu_is_a_frequency_knob_and_steps_move_only_the_fake_clock() -> None:
    dev = EmulatedOrin()
    hz = dev.gpu.frequencies()
    assert hz == sorted(hz) and len(hz) == 13 and hz[-1] == 1_300_500_000 and dev.gpu.current() == hz[-1]
    with pytest.raises(ValueError):
        dev.gpu.lock(1_000_000_000)
    dev.gpu.lock(hz[0])
    t0 = dev.clock.monotonic()
    dev.step(8)
    assert dev.clock.monotonic() - t0 == pytest.approx(dev.model.step_s(8, hz[0]))
    assert dev.power.read() == pytest.approx(dev.model.watts(8, hz[0]))
    dev.gpu.restore()
    assert dev.gpu.current() == hz[-1] and dev.power.read() == dev.model.static_w  # idle until the next step
    assert "EMULATED" in dev.gpu.detail and "EMULATED" in dev.power.detail and "EMULATED" in dev.hardware
    times = [dev.model.step_s(64, f) for f in hz]
    assert times == sorted(times, reverse=True) and times[0] > 5 * times[-1]  # compute-bound: the clock matters
    with pytest.raises(pc.StepOOM):
        dev.step(256)


# ------------------------------------------------------------------ profiling
def test_profile_measures_every_point_stops_at_the_largest_batch_and_restores_the_clock() -> None:
    dev, lines = EmulatedOrin(), []
    key = _key(frequencies=ORIN_GPU_HZ[::6], batches=(32, 64, 128, 256))
    profile = _profile(dev, key, lines.append)
    assert [(r.batch, r.hz) for r in profile.rows] == [(b, f) for b in (32, 64, 128) for f in ORIN_GPU_HZ[::6]]
    for r in profile.rows:
        assert r.step_s == pytest.approx(dev.model.step_s(r.batch, r.hz), rel=1e-9)
        assert r.watts == pytest.approx(dev.model.watts(r.batch, r.hz), rel=1e-9)
    assert profile.max_batch == 128 and dev.gpu.locked is None
    assert len([x for x in lines if "profiling" in x]) == 9 and "batch 256 does not fit" in lines[-1]
    with pytest.raises(ValueError, match="needs a power reading"):
        pc.profile_grid(dev.step, dev.gpu, None, dev.clock, key)


def test_profile_cache_hits_on_the_same_key_and_misses_on_any_change(tmp_path: Path) -> None:
    made: list[pc.ProfileKey] = []

    def make(key: pc.ProfileKey):
        def run() -> pc.Profile:
            made.append(key)
            return pc.Profile(key, [pc.ProfileRow(1, key.frequencies[0], 0.5, 17.0)])
        return run

    key = _key()
    first, hit = pc.cached_profile(tmp_path, key, make(key))
    assert not hit and len(made) == 1
    again, hit = pc.cached_profile(tmp_path, key, make(key))
    assert hit and len(made) == 1 and again == first
    for change in ({"hardware": "Jetson AGX Orin 64GB"}, {"model": "base"}, {"input_tokens": 256},
                   {"target_tokens": 64}, {"knob": "nvml-gpu"}, {"frequencies": ORIN_GPU_HZ[1:]},
                   {"batches": BATCHES[:-1]}):
        other = _key(**change)
        _, hit = pc.cached_profile(tmp_path, other, make(other))
        assert not hit and made[-1] == other, change
        assert pc.cached_profile(tmp_path, other, make(other))[1]  # and now stored
    (tmp_path / f"power-profile-{key.digest()}.json").write_text("{not json")
    _, hit = pc.cached_profile(tmp_path, key, make(key))
    assert not hit  # a damaged file is re-profiled
    assert pc.cached_profile(None, key, make(key))[1] is False


# ------------------------------------------------------------------ controller
def _caps(profile: pc.Profile, n: int = 40) -> list[float]:
    lo, hi = min(r.watts for r in profile.rows), max(r.watts for r in profile.rows)
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


@pytest.mark.parametrize("noise", [1.0, 50.0, 200.0])
def test_controller_choice_is_the_brute_force_optimum_of_the_emulated_grid(orin_profile, noise: float) -> None:
    m, eff = fit_orin("small"), pc.BatchEfficiency(noise)
    for cap in _caps(orin_profile):
        # Brute force over the emulation's own functions, not the profile the controller read.
        under = [(_steps(b, noise) * m.step_s(b, f), b, f) for b in BATCHES for f in ORIN_GPU_HZ
                 if m.watts(b, f) <= cap]
        best = min(under)
        got = pc.choose(orin_profile, cap, eff, SAMPLES, REF)
        assert got is not None and got.watts <= cap
        assert got.predicted_s == pytest.approx(best[0], rel=1e-9), cap
        base = pc.frequency_only(orin_profile, cap, eff, SAMPLES, REF)
        top = [f for f in ORIN_GPU_HZ if m.watts(128, f) <= cap]
        assert (base is None) == (not top) and (base is None or (base.batch, base.hz) == (128, max(top)))


@pytest.mark.parametrize("noise", [1.0, 50.0, 200.0])
def test_controller_beats_frequency_capping_and_never_exceeds_the_cap(orin_profile, noise: float) -> None:
    dev, eff = EmulatedOrin(), pc.BatchEfficiency(noise)
    ratios = []
    for cap in _caps(orin_profile, 12)[1:]:
        chosen = pc.choose(orin_profile, cap, eff, SAMPLES, REF)
        base = pc.frequency_only(orin_profile, cap, eff, SAMPLES, REF)
        assert chosen is not None
        run = pc.run_setting(dev.step, dev.gpu, dev.power, dev.clock, chosen)
        assert run.seconds == pytest.approx(chosen.predicted_s) and run.mean_w <= cap
        assert run.watchdog.peak_mean_w <= cap and not run.steps_down  # the watchdog saw nothing to do
        if base is None:
            ratios.append((cap, math.inf))
            continue
        base_run = pc.run_setting(dev.step, dev.gpu, dev.power, dev.clock, base)
        assert base_run.watchdog.peak_mean_w <= cap and base_run.seconds > run.seconds, cap
        ratios.append((cap, base_run.seconds / run.seconds))
    print(f"B_noise {noise:g}: frequency-only / chosen, EMULATED:",
          ", ".join(f"{c:.1f} W {r:.2f}x" for c, r in ratios))
    assert all(r > 1 for _, r in ratios)


def test_batch_efficiency_spends_the_rounds_samples() -> None:
    eff = pc.BatchEfficiency(50.0)
    assert eff.steps(32, 3200, 32) == 100  # at the planned batch: the planned steps
    assert eff.steps(8, 3200, 32) * 8 < 3200 < eff.steps(128, 3200, 32) * 128  # small batches need fewer samples
    assert pc.BatchEfficiency(math.inf).steps(8, 3200, 32) == 400


# ------------------------------------------------------------------ watchdog
@dataclass
class FakeKnob:
    hz: list[int] = field(default_factory=lambda: [100, 200, 300])
    now: int = 300
    name: str = "fake"
    detail: str = "fake knob"

    def frequencies(self) -> list[int]:
        return self.hz

    def current(self) -> int:
        return self.now

    def lock(self, hz: int) -> None:
        if hz not in self.hz:
            raise ValueError(hz)
        self.now = hz

    def restore(self) -> None:
        self.now = self.hz[-1]


def test_watchdog_steps_down_one_step_on_the_running_mean_and_never_below_the_lowest() -> None:
    knob = FakeKnob()
    dog = pc.Watchdog(knob, cap_w=20.0, window_s=1.0)
    assert dog.feed(0.0, 25.0) is None and knob.now == 300  # one reading over the cap: not a full window yet
    assert dog.feed(0.5, 15.0) is None and dog.feed(1.0, 19.0) is None  # full at 1.0: mean 19.67, under
    event = dog.feed(1.4, 27.0)  # the window (0.5, 1.0, 1.4]: mean 20.33
    assert event == pc.StepDown(1.4, 300, 200, pytest.approx(61 / 3)) and knob.now == 200
    assert dog.feed(1.5, 30.0) is None and knob.now == 200  # the window started afresh at 200: a spike waits
    assert dog.feed(2.4, 21.0) is not None and knob.now == 100  # a full window at 200 over the cap
    assert dog.feed(3.4, 25.0) is None and knob.now == 100 and dog.over_at_floor == 1
    assert dog.feed(5.0, 10.0) is None  # old readings have left the window
    assert len(dog.steps_down) == 2 and dog.peak_mean_w == 25.5


def test_watchdog_reads_through_a_power_meter_and_differences_energy_counters() -> None:
    clock, knob = manual_clock(), FakeKnob()

    @dataclass
    class Counter:  # a RAPL-like source: joules since opened, 30 W
        name: str = "counter"
        kind: str = "energy"
        detail: str = "fake"

        def read(self) -> float:
            return 30.0 * clock.monotonic()

    dog = pc.Watchdog(knob, cap_w=25.0, window_s=2.0)
    meter = PowerMeter(dog.tap(Counter(), clock), hz=5.0, clock=clock.monotonic).start()
    for _ in range(6):  # 3 s: the 2 s window fills
        clock.advance(0.5)
        meter.sample()
    reading = meter.stop()
    assert reading is not None and reading.mean_w == pytest.approx(30.0)
    assert knob.now == 200 and dog.steps_down[0].mean_w == pytest.approx(30.0)


def test_watchdog_steps_down_when_the_profile_under_predicts_power(orin_profile) -> None:
    cap = 26.0
    chosen = pc.choose(orin_profile, cap, pc.BatchEfficiency(50.0), SAMPLES, REF)
    assert chosen is not None and chosen.watts <= cap
    dev = EmulatedOrin(power_bias=1.12)  # a warmer chip than the one profiled: 12% more power
    assert dev.model.watts(chosen.batch, chosen.hz) * 1.12 > cap
    run = pc.run_setting(dev.step, dev.gpu, dev.power, dev.clock, chosen, window_s=1.0)
    safe = [f for f in ORIN_GPU_HZ if f <= chosen.hz and dev.model.watts(chosen.batch, f) * 1.12 <= cap]
    assert run.watchdog.final_hz == max(safe)  # stopped at the first frequency under the cap, not lower
    assert len(run.steps_down) == ORIN_GPU_HZ.index(chosen.hz) - ORIN_GPU_HZ.index(max(safe))
    assert all(e.to_hz == ORIN_GPU_HZ[ORIN_GPU_HZ.index(e.from_hz) - 1] for e in run.steps_down)  # one at a time
    assert run.seconds > chosen.predicted_s and dev.gpu.locked is None
    print(f"under-predicted by 12%: {len(run.steps_down)} step(s) down, {chosen.hz / 1e6:g} -> "
          f"{run.watchdog.final_hz / 1e6:g} MHz, {run.seconds:.0f} s instead of {chosen.predicted_s:.0f} s (EMULATED)")


# ------------------------------------------------------------------ gradient noise scale
def test_noise_scale_estimators_solve_the_expected_norms_exactly() -> None:
    g2, trace = 0.3, 6.0  # E|G_B|² = |G|² + tr(Σ)/B
    est = pc.NoiseEstimate.from_norms(2, g2 + trace / 2, 32, g2 + trace / 32)
    assert est.g2 == pytest.approx(g2) and est.trace == pytest.approx(trace) and est.b_simple == pytest.approx(20)
    with pytest.raises(ValueError):
        pc.NoiseEstimate.from_norms(8, 1.0, 8, 1.0)


def test_noise_scale_of_linear_regression_with_known_noise() -> None:
    import torch

    torch.manual_seed(0)
    d, sigma, n = 10, 0.5, 4000
    x = torch.randn(n, d)
    w_star = torch.randn(d)
    y = x @ w_star + sigma * torch.randn(n)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star + 0.3 * torch.randn(d))
    delta = float(((model.weight.detach()[0] - w_star) ** 2).sum())
    # Per-example gradient x(x·δ - ε) with x ~ N(0, I): G = δ, tr(Σ) = (d+1)|δ|² + d·σ².
    truth = ((d + 1) * delta + d * sigma ** 2) / delta

    def loss(m: torch.nn.Module, chunk) -> torch.Tensor:
        xs, ys = torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk])
        return 0.5 * ((m(xs).squeeze(-1) - ys) ** 2).mean()

    est = pc.gradient_noise_scale(model, loss, list(zip(x, y)), b_small=1, b_big=64, repeats=30, seed=1)
    assert est.g2 == pytest.approx(delta, rel=0.2) and est.b_simple == pytest.approx(truth, rel=0.2)
    est4 = pc.gradient_noise_scale(model, loss, list(zip(x, y)), b_small=4, b_big=64, repeats=30, seed=2)
    assert est4.b_simple == pytest.approx(truth, rel=0.25)
    with pytest.raises(ValueError):
        pc.gradient_noise_scale(model, loss, list(zip(x, y)), b_small=3, b_big=64)


def test_noise_scale_runs_on_the_tiny_t5(tok, one_torch_thread) -> None:
    from fedcore.batching import encode_examples
    from fedcore.data import synthetic_corpus
    from fedcore.models import build_model

    items = encode_examples(tok, synthetic_corpus(16, 0), 64, 16)
    model = build_model("tiny", seed=0)
    est = pc.gradient_noise_scale(model, pc.t5_chunk_loss, items, b_small=1, b_big=4, repeats=1)
    assert est.g2 > 0 and est.trace > 0 and 0 < est.b_simple < math.inf
    assert model.training and all(p.grad is None for p in model.parameters())  # left as found


# ------------------------------------------------------------------ the bench
def test_bench_power_cap_on_the_emulated_orin(capsys, tmp_path: Path) -> None:
    from fedclient.cli import main

    args = ["bench", "--power-cap", "25", "--emulate", "agx-orin-64gb", "--noise-scale", "50",
            "--profile-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("EMULATED Jetson AGX Orin 64GB") and "cache stored" in out
    grid = out[out.index("batch        114.75"):].splitlines()
    assert [int(line.split()[0]) for line in grid[2:10]] == list(BATCHES)
    chosen = next(line for line in out.splitlines() if line.startswith("chosen (B, f)")).split()
    base = next(line for line in out.splitlines() if line.startswith("frequency-only")).split()
    assert base[1] == "128" and float(chosen[6]) <= 25 and float(base[4]) <= 25
    assert float(chosen[9]) < float(base[8]) and "speed-up" in out and "2.4x" in out
    assert main(args) == 0 and "cache hit" in capsys.readouterr().out
    assert main(args[:2] + ["10"] + args[3:]) == 1
    assert "no profiled point is under 10 W" in capsys.readouterr().out


def test_bench_power_cap_says_when_this_device_has_no_clock(capsys, monkeypatch) -> None:
    from fedclient import bench
    from fedclient.cli import main

    monkeypatch.setattr(bench, "_real_device", lambda *a: "no controllable clock on this device (test)")
    assert main(["bench", "--power-cap", "25", "--power-source", "none", "--device", "cpu"]) == 2
    assert "cannot run on this device: no controllable clock" in capsys.readouterr().out


def test_real_step_runner_profiles_a_tiny_t5_and_stops_where_memory_ends(monkeypatch, one_torch_thread) -> None:
    import torch

    from fedclient import bench
    from fedclient.config import BenchConfig
    from fedcore.clock import SYSTEM
    from fedcore.flops import T5Shape
    from fedcore.models import build_model

    @dataclass
    class Steady:
        name: str = "steady"
        kind: str = "power"
        detail: str = "fake 20 W"

        def read(self) -> float:
            return 20.0

    model = build_model("tiny", seed=0)
    cfg = BenchConfig(preset=["tiny"], input_tokens=16, target_tokens=8)
    runner = bench.TorchStepRunner(model, T5Shape.from_config(model.config), cfg, torch.device("cpu"))
    fits = bench.training_bytes(T5Shape.from_config(model.config), 2, 16, 8)  # batch 2 fits, 4 does not
    monkeypatch.setattr(bench, "_cpu_shortfall", lambda needed: "out of memory (test)" if needed > fits else "")
    knob = FakeKnob()
    key = _key(model="tiny", frequencies=(100, 300), batches=(1, 2, 4))
    profile = pc.profile_grid(runner, knob, Steady(), SYSTEM, key, warmup=0, steps=1, echo=lambda _: None)
    assert [(r.batch, r.hz) for r in profile.rows] == [(1, 100), (1, 300), (2, 100), (2, 300)]
    assert all(r.step_s > 0 and r.watts == 20.0 for r in profile.rows) and knob.now == 300

"""`fedclient`: the device daemon's command line."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fedcore import config as cfgmod
from fedcore import logs

from .config import BenchConfig, ClientConfig


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    ap = argparse.ArgumentParser(prog="fedclient", description="Federated fine-tuning device daemon.")
    ap.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: INFO or $FEDTUNE_LOG)")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="join a server and serve rounds until the run ends")
    run.add_argument("--config", type=Path, default=None, help="TOML file with ClientConfig settings")
    cfgmod.add_arguments(run, ClientConfig)
    bench = sub.add_parser("bench", help="the study's step micro-benchmark (Table 4 layout) on this device; with "
                           "--power-cap W, batch size and GPU frequency chosen together under a power cap")
    bench.add_argument("--config", type=Path, default=None, help="TOML file with bench settings")
    cfgmod.add_arguments(bench, BenchConfig)
    hw = sub.add_parser("hardware", help="this device's peak FLOP/s and power source, with a short power reading")
    for name in ("device", "threads", "hardware", "peak_tflops", "power_source", "power_hz"):
        hw.add_argument("--" + name.replace("_", "-"), dest=name, default=None)
    hw.add_argument("--seconds", type=float, default=2.0, help="how long to read power (default: 2)")
    return ap, sub


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon  # torch import is slow; keep --help fast

    cfg = cfgmod.resolve(ClientConfig, args, args.config)
    logs.setup(args.log_level, cfg.device_id)
    daemon = Daemon(cfg)

    def _stop(signum: int, _frame: object) -> None:
        daemon.stop()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        return daemon.run()
    except KeyboardInterrupt:
        return 130 if not daemon._stop else 0


def _probe(device: str, threads: int, hardware: str, peak_tflops: float, power_source: str):
    import torch

    from fedcore.models import pick_device

    from .daemon import probe_hardware

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = ClientConfig(device=device, threads=threads, hardware=hardware, peak_tflops=peak_tflops,
                       power_source=power_source)
    cfg.validate()
    return probe_hardware(cfg, pick_device(device))


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import render, run_bench

    cfg = cfgmod.resolve(BenchConfig, args, args.config)
    logs.setup(args.log_level or "WARNING", "bench")
    if cfg.power_cap:
        from .bench import run_power_cap

        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        return run_power_cap(cfg, lambda: _probe(cfg.device, cfg.threads, cfg.hardware, cfg.peak_tflops,
                                                 cfg.power_source))
    hw, source = _probe(cfg.device, cfg.threads, cfg.hardware, cfg.peak_tflops, cfg.power_source)
    peak = f"{hw.peak_flops / 1e12:.3g} TFLOP/s [{hw.source}]" if hw.peak_flops else "unknown"
    power = f"{source.name} ({source.detail})" if source else "unknown (no INA3221, NVML or RAPL readable)"
    print(f"fedclient bench: {', '.join(cfg.preset)}, RANDOM init (a step's time and FLOPs do not depend on the "
          f"weights); items of {cfg.input_tokens} input + {cfg.target_tokens} target tokens; {cfg.steps} timed "
          f"steps after {cfg.warmup} warm-up; AdamW, fp32")
    print(f"device: {hw.name}, peak {peak}; torch {torch.__version__} on {torch.get_num_threads()} thread(s); "
          f"power: {power}")
    rows = run_bench(cfg, hw, source)
    print()
    print("\n".join(render(rows, hw, cfg)))
    print(f"""
seconds per step (mean over the timed steps); TPS = input tokens/s (batch x {cfg.input_tokens} / total), as the study counts;
W = average power over the timed steps, ηe = TPS / W; '-' = unknown.
MFU = our encoder-decoder FLOPs count (fedcore.flops; {rows[0].flops_per_step / rows[0].batch:.4g} per item and step for {rows[0].preset}) / peak;
MFU* = the study's convention (TPS x (6N + 12·L·d·{cfg.input_tokens})) / peak. Study rows: MFU* is its published Table 3
figure, MFU our count at its TPS; W and ηe from its Table 2.""")
    return 0


def cmd_hardware(args: argparse.Namespace) -> int:
    import time

    from fedcore.power import PowerMeter

    logs.setup(args.log_level or "WARNING", "hardware")
    hw, source = _probe(args.device or "auto", int(args.threads or 0), args.hardware or "",
                        float(args.peak_tflops or 0.0), args.power_source or "auto")
    print(f"hardware: {hw.name}")
    print(f"peak: {f'{hw.peak_flops / 1e12:.4g} TFLOP/s' if hw.peak_flops else 'unknown'} [{hw.source}]")
    if source is None:
        print("power: unknown (no INA3221 under /sys/class/hwmon or /sys/bus/i2c/drivers/ina3221x, no NVML, "
              "no RAPL under /sys/class/powercap)")
        return 0
    meter = PowerMeter(source, hz=float(args.power_hz or 5.0)).start()
    time.sleep(args.seconds)
    r = meter.stop()
    print(f"power: {source.name} ({source.detail}): " + (
        f"{r.mean_w:.2f} W average over {r.seconds:.1f} s, {r.energy_j:.1f} J, {r.samples} samples"
        if r else "no reading"))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap, _ = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "hardware":
            return cmd_hardware(args)
    except (cfgmod.ConfigError, ValueError) as exc:
        print(f"fedclient: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from .clocks import ClockError  # a clock or power limit it may not change: one line, not a traceback

        if not isinstance(exc, ClockError):
            raise
        print(f"fedclient: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())

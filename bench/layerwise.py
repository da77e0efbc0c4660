"""Layer-wise training (the last k units, CAFF): measured peak memory and step time beside fedcore.memory's model.

    python -m bench.layerwise [--preset tiny,small] [--batch N] [--input-tokens 256] [--target-tokens 48]
                              [--units 1,2,4] [--steps 3] [--threads 0] [--json]

For each preset and each number k of trained units (fedcore.layers order,
output side first; default: the head, 2, a quarter, half, every decoder
unit, all), a FRESH subprocess builds the model (random init: memory and
time do not depend on the values), trains only those units' tensors with
AdamW for 1 warm-up step and --steps timed steps (fedclient.trainer.timed_step,
a random token batch each step), and reports:
- peak RSS over those steps minus RSS after building the model and one tiny
  forward/backward (so the runtime's one-time allocations are not counted): the kernel's
  high-water mark (VmHWM) reset just before the steps via /proc/self/clear_refs
  (Linux >= 4.0; else ru_maxrss, which also sees the build's own peak);
- mean step time (forward + loss + backward + optimizer step);
- the model's prediction of what training adds to the resident weights
  (grads + AdamW moments + saved activations) and measured / predicted.
The prediction leaves out transient workspace (activation gradients, the
logits' gradient, AdamW temporaries, allocator slack), so a ratio above 1
is that workspace. Figures only: nothing here passes or fails on a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BATCH = {"tiny": 16, "small": 8}
MB = 1e6


def default_units(num_units: int, decoder_layers: int) -> list[int]:
    """The head, 2, a quarter, half, every decoder unit (head + decoder blocks), all."""
    ks = {1, 2, num_units // 4, num_units // 2, 1 + decoder_layers, num_units}
    return sorted(k for k in ks if 1 <= k <= num_units)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _peak() -> tuple[int, str]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"  # KiB on Linux


def _warm_runtime(model) -> None:
    """A forward and backward at batch 1 that grads one norm weight only: the runtime's one-time allocations
    (kernel caches, autograd's threads, the optimizer's imports) land before the baseline, while no large tensor is allocated and freed
    (glibc could keep such memory in its heap and hide it from the measurement)."""
    import torch

    for n, p in model.named_parameters():
        p.requires_grad_(n == "decoder.final_layer_norm.weight")
    ids = torch.full((1, 8), 5)
    opt = torch.optim.AdamW([model.decoder.final_layer_norm.weight], lr=0.0)  # lr 0: the weights stay as built
    model(input_ids=ids, decoder_input_ids=ids[:, :4], use_cache=False).logits.float().square().mean().backward()
    opt.step()  # its first step imports and initialises what every later optimizer reuses
    model.zero_grad(set_to_none=True)


def child(preset: str, batch: int, s: int, t: int, k: int, steps: int, threads: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from fedclient.trainer import StepTimes, timed_step
    from fedcore.batching import Batch
    from fedcore.flops import T5Shape
    from fedcore.layers import canonical_names, layer_units, trained_names
    from fedcore.memory import training_memory
    from fedcore.models import init_model

    if threads:
        torch.set_num_threads(threads)
    model = init_model(preset)
    cfg = model.config
    state = model.state_dict()
    names = canonical_names(state)
    units = layer_units(names, cfg.num_layers, cfg.num_decoder_layers)
    trained = set(trained_names(units, k))
    model.train()
    _warm_runtime(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps + 1):
        ids = torch.randint(3, cfg.vocab_size, (batch, s), generator=g)
        labels = torch.randint(3, cfg.vocab_size, (batch, t), generator=g)
        batches.append(Batch(ids, torch.ones_like(ids), labels, batch * (s + t), batch))
    est = training_memory(T5Shape.from_config(cfg), {n: state[n].numel() for n in names}, trained, batch, s, t,
                          dropout_rate=cfg.dropout_rate, mask_bytes=4)  # CPU dropout keeps float masks
    del state
    base = _rss()
    reset = _reset_peak()
    times = StepTimes()
    it = iter(batches)
    timed_step(model, opt, it, torch.device("cpu"), StepTimes())  # warm-up: AdamW allocates its moments here
    t0 = time.perf_counter()
    for _ in range(steps):
        timed_step(model, opt, it, torch.device("cpu"), times)
    step_s = (time.perf_counter() - t0) / max(steps, 1)
    peak, how = _peak()
    return {"preset": preset, "k": k, "units": len(units), "deepest": units[k - 1].name if k else "-",
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "measured_bytes": peak - base, "peak_source": how if reset else how + " (not reset)",
            "predicted_bytes": est.training, "grads": est.grads, "optimizer": est.optimizer,
            "activations": est.activations, "weights": est.weights, "step_s": step_s,
            "threads": torch.get_num_threads(), "dropout": cfg.dropout_rate}


def run_one(preset: str, batch: int, s: int, t: int, k: int, steps: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.layerwise", "--child", f"{preset},{batch},{s},{t},{k},{steps},{threads}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def header(argv: list[str]) -> str:
    import torch

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
        return r.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = " (uncommitted changes)" if git("status", "--porcelain") else ""
    return (f"bench.layerwise {datetime.datetime.now().isoformat(timespec='seconds')}; commit {commit}{dirty}; "
            f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPU(s), torch {torch.__version__}\n"
            f"command: python -m bench.layerwise {' '.join(argv)}")


def print_table(rows: list[dict], batch: int, s: int, t: int, steps: int) -> None:
    r0 = rows[0]
    print(f"\n{r0['preset']}: batch {batch} x {s} input + {t} target tokens, {r0['units']} units, dropout "
          f"{r0['dropout']}, {r0['threads']} threads, {steps} timed step(s) after 1 warm-up; weights "
          f"{r0['weights'] / MB:.1f} MB resident before; peak from {r0['peak_source']}")
    print(f"{'k':>3} {'deepest unit':16} {'trained':>11} {'s/step':>8} {'meas MB':>9} {'pred MB':>9} {'ratio':>6}"
          f" {'grads':>8} {'adam':>8} {'activ':>8}")
    for r in rows:
        print(f"{r['k']:3d} {r['deepest']:16} {r['trained_params']:11,d} {r['step_s']:8.3f} "
              f"{r['measured_bytes'] / MB:9.1f} {r['predicted_bytes'] / MB:9.1f} "
              f"{r['measured_bytes'] / r['predicted_bytes']:6.2f} {r['grads'] / MB:8.1f} "
              f"{r['optimizer'] / MB:8.1f} {r['activations'] / MB:8.1f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny,small", help="comma-separated presets")
    ap.add_argument("--batch", type=int, default=0, help=f"0: per preset {DEFAULT_BATCH} (else 8)")
    ap.add_argument("--input-tokens", type=int, default=256)
    ap.add_argument("--target-tokens", type=int, default=48)
    ap.add_argument("--units", default="", help="comma-separated k (trained units); default: see the docstring")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        preset, *nums = a.child.split(",")
        print(json.dumps(child(preset, *map(int, nums))))
        return 0
    from fedcore.models import get_preset

    everything = []
    if not a.json:
        print(header(argv))
    for preset in [p.strip() for p in a.preset.split(",") if p.strip()]:
        p = get_preset(preset)
        batch = a.batch or DEFAULT_BATCH.get(p.name, 8)
        n_units = 2 * p.num_layers + 2
        ks = [int(k) for k in a.units.split(",")] if a.units else default_units(n_units, p.num_layers)
        rows = [run_one(p.name, batch, a.input_tokens, a.target_tokens, k, a.steps, a.threads) for k in ks]
        everything += rows
        if not a.json:
            print_table(rows, batch, a.input_tokens, a.target_tokens, a.steps)
    if a.json:
        print(json.dumps(everything, indent=1))
    else:
        print("\nmeas MB: peak RSS during the steps minus RSS after the build (10^6 B); pred MB: fedcore.memory's"
              " grads + AdamW + saved activations (weights excluded: resident before); ratio = meas / pred.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

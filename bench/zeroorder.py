"""Zero-order step figures for a FLAN-T5 preset: one step's time and FLOPs, MeZO and FedSPZO, next to backprop.

    python -m bench.zeroorder --preset small [--batch 32] [--input-tokens 256] [--target-tokens 48]
                              [--steps 3] [--p2 4] [--json]

Prints, each measured over --steps steps after one warm-up step on the same
synthetic batch:
- a backprop step (AdamW, fedclient.trainer.timed_step), the reference;
- a MeZO step with 1 direction, and with 1 + P2 directions (the same number
  of directions as the FedSPZO step);
- a FedSPZO step, P1 = 1 direction of the encoder block and P2 of the decoder
  block, the decoder's all scored on one encoder pass;
with the model FLOPs of each (fedcore.flops: forward passes only for the
zero-order steps) and the split of a zero-order step's time into forward
passes and perturbing (regenerating directions and adding them). Also the
cost of one direction over the whole model (generate + add), which is what
a device pays per direction when it replays missed rounds. Figures only:
nothing here passes or fails on a time.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch

from bench._models import load_model, preset_names
from fedclient.trainer import StepTimes, TrainSettings, batch_flops, batch_forward_flops, make_optimizer, timed_step
from fedcore import directions
from fedcore.batching import Batch
from fedcore.flops import T5Shape
from fedcore.methods import FedSPZO, MeZO
from fedcore.methods.zeroorder import T5_SECOND_BLOCK, ZeroOrderSpec, perturbed


@dataclass
class Row:
    step: str
    seconds: float       # per step, median over the measured steps
    forward_s: float     # of which forward passes (backprop: forward + loss + backward)
    perturb_s: float     # of which regenerating and adding directions (backprop: the optimizer step)
    gflops: float        # model FLOPs of one step
    directions: int


def synthetic_batch(batch: int, s: int, t: int, vocab: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, s), generator=g)
    labels = torch.randint(3, vocab, (batch, t), generator=g)
    return Batch(ids, torch.ones_like(ids), labels, batch * (s + t), batch)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def backprop_row(model: torch.nn.Module, batch: Batch, steps: int, shape: T5Shape) -> Row:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = make_optimizer(model, TrainSettings())
    secs, fwd, optim = [], [], []
    for i in range(steps + 1):
        times = StepTimes()
        t0 = time.perf_counter()
        timed_step(model, opt, iter([batch]), torch.device("cpu"), times)
        if i:
            secs.append(time.perf_counter() - t0)
            fwd.append(times.forward_s + times.loss_s + times.backward_s)
            optim.append(times.optimizer_step_s)
    del opt
    model.eval()
    return Row("backprop (AdamW)", median(secs), median(fwd), median(optim), batch_flops(shape, batch) / 1e9, 0)


def zero_order_row(label: str, method, model: torch.nn.Module, batch: Batch, steps: int, shape: T5Shape) -> Row:
    trainee = method.bind(model)
    est = trainee.start(7)
    params = perturbed(model)
    model.eval()
    secs, fwd, pert, flops = [], [], [], 0.0
    with torch.no_grad():
        for i in range(steps + 1):
            t0 = time.perf_counter()
            _, cost = est.step(model, params, batch, lambda: None)
            if i:
                secs.append(time.perf_counter() - t0)
                fwd.append(cost.forward_s)
                pert.append(cost.perturb_s)
                flops = batch_forward_flops(shape, batch, cost.first_forwards, cost.second_forwards)
    n = method.directions_per_step()
    return Row(label, median(secs), median(fwd), median(pert), flops / 1e9, n)


def direction_cost(model: torch.nn.Module, reps: int = 3) -> tuple[float, int]:
    """Seconds to generate and add one direction over every weight, and the weights' count."""
    params = perturbed(model)
    out = []
    with torch.no_grad():
        for i in range(reps):
            t0 = time.perf_counter()
            directions.perturb(params, 1000 + i, 1e-3)
            out.append(time.perf_counter() - t0)
    return median(out), sum(t.numel() for _, t in params)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=preset_names())
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-tokens", type=int, default=256)
    ap.add_argument("--target-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--p2", type=int, default=4, help="FedSPZO's directions of the decoder block per step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, origin = load_model(a.preset)
    origin = origin.split(":")[0]  # "RANDOM init (seed 0)": the weights do not change a step's cost
    shape = T5Shape.from_config(model.config)
    batch = synthetic_batch(a.batch, a.input_tokens, a.target_tokens, model.config.vocab_size)
    spec = ZeroOrderSpec(learning_rate=1e-6, eps=1e-3)
    one_dir, numel = direction_cost(model)
    rows = [backprop_row(model, batch, a.steps, shape),
            zero_order_row("MeZO, 1 direction", MeZO(spec), model, batch, a.steps, shape),
            zero_order_row(f"MeZO, {1 + a.p2} directions", MeZO(ZeroOrderSpec(1e-6, 1e-3, perturbations=1 + a.p2)),
                           model, batch, a.steps, shape),
            zero_order_row(f"FedSPZO, P1 1 / P2 {a.p2}",
                           FedSPZO(ZeroOrderSpec(1e-6, 1e-3, perturbations=1, second_perturbations=a.p2,
                                                 second_block=T5_SECOND_BLOCK)), model, batch, a.steps, shape)]
    info = {"preset": a.preset, "parameters": numel, "weights": origin, "batch": a.batch,
            "input_tokens": a.input_tokens, "target_tokens": a.target_tokens, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "direction_s": one_dir, "direction_ns_per_weight": one_dir / numel * 1e9}
    if a.json:
        print(json.dumps({**info, "rows": [asdict(r) for r in rows]}, indent=1))
        return 0
    print(f"bench.zeroorder: {a.preset} ({numel:,} weights, {origin}); batch {a.batch} x {a.input_tokens} input + "
          f"{a.target_tokens} target tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one direction over every weight (generate + add): {one_dir:.3f} s, {info['direction_ns_per_weight']:.2f} "
          f"ns a weight: a device replays a missed round at this cost per direction")
    ref = rows[1]
    print(f"{'step':28} {'s/step':>8} {'forward s':>10} {'perturb s':>10} {'GFLOPs':>9} {'dirs':>5} "
          f"{'s vs MeZO-1':>11} {'FLOPs vs MeZO-1':>15}")
    for r in rows:
        print(f"{r.step:28} {r.seconds:8.3f} {r.forward_s:10.3f} {r.perturb_s:10.3f} {r.gflops:9.1f} "
              f"{r.directions:5d} {r.seconds / ref.seconds:11.2f} {r.gflops / ref.gflops:15.2f}")
    spzo, mezo_same = rows[3], rows[2]
    print(f"FedSPZO against MeZO at the same {spzo.directions} directions a step: {spzo.gflops / mezo_same.gflops:.2f}x "
          f"the FLOPs, {spzo.seconds / mezo_same.seconds:.2f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

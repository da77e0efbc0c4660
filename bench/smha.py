"""Selective multi-head attention (SMHA) step figures: training a fraction of the heads against full fine-tuning.

    python -m bench.smha [--preset tiny,small] [--batch 8] [--input-tokens 256] [--target-tokens 48]
                         [--steps 3] [--threads 0] [--json]

For each preset, on one random token batch with the model in train mode,
times a training step (forward + loss + backward + AdamW step,
fedclient.trainer.timed_step) after one warm-up step, for (each its own
copy of the model and optimizer, taking turns step by step, so that for
Small about 6 GB of memory is in use):
- full fine-tuning (every weight trains), the reference;
- the first 1/4, 1/2 and all of the heads of every attention module training
  (fedcore.heads.slice_heads for a share below 1), once with every other
  weight training too ("rest trains") and once with everything else frozen,
  embeddings and lm_head included ("heads only").
Prints each step's mean and fastest time (the fastest is the steadier figure
on a shared machine), their change against full fine-tuning (the "rest
trains, all heads" row is the same work as full fine-tuning: a check of the
noise), the trained parameters, and the poster's figures (Szablewski, Sani,
Lane: 1/4 of the heads -21.89% time, 1/2 -15.37%) beside them.
Figures only: nothing here passes or fails on a time.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from bench._models import load_model, preset_names
from bench.zeroorder import synthetic_batch
from fedclient.trainer import StepTimes, TrainSettings, make_optimizer, timed_step
from fedcore.batching import Batch
from fedcore.heads import head_axis, slice_heads

#: the poster's wall-time change and perplexity change against training every head
POSTER = {0.25: (-21.89, 2.3), 0.5: (-15.37, 1.1)}
FRACTIONS = (0.25, 0.5, 1.0)


@dataclass
class Row:
    preset: str
    setting: str          # "full", "rest trains" or "heads only"
    fraction: float       # share of the heads asked for (1.0 for full)
    heads: str            # heads trained per attention module, "k/n"
    trained_params: int
    mean_s: float         # per step, over the timed steps
    min_s: float
    forward_s: float      # mean of forward + loss
    backward_s: float
    optimizer_s: float


def head_count(n_heads: int, fraction: float) -> int:
    """Heads a share trains: as fedcore.methods.smha rounds it, at least one."""
    return max(1, round(fraction * n_heads))


def prepare(model: torch.nn.Module, fraction: float, rest_trains: bool) -> str:
    """Set what trains (slicing the attention Linears for a share below 1); returns "k/n" heads."""
    cfg = model.config
    n = head_count(cfg.num_heads, fraction)
    for name, p in model.named_parameters():
        p.requires_grad_(rest_trains or head_axis(name) is not None)
    if n < cfg.num_heads:
        heads = tuple(range(n))
        slice_heads(model, {name: (head_axis(name), cfg.d_kv, heads)
                            for name, _ in model.named_parameters() if head_axis(name) is not None})
    return f"{n}/{cfg.num_heads}"


@dataclass
class Run:
    """One setting's own model copy and optimizer, and what its timed steps took."""

    setting: str
    fraction: float
    model: torch.nn.Module
    heads: str
    optimizer: torch.optim.Optimizer
    trained: int
    secs: list[float] = field(default_factory=list)
    times: StepTimes = field(default_factory=StepTimes)


def measure(preset: str, model: torch.nn.Module, batch: Batch, steps: int) -> list[Row]:
    """Every setting's step times. The settings take turns, one step each (round 0 is the warm-up): run one
    after the other, a burst of load from another process or the process's own warm-up landed on one
    setting only (full fine-tuning measured 8-13% slower than the identical "rest trains, all heads")."""
    model.train()
    runs = []
    for setting, fraction, rest in [("full", 1.0, True)] + [(s, f, s == "rest trains")
                                                            for s in ("rest trains", "heads only") for f in FRACTIONS]:
        m = copy.deepcopy(model)  # each setting keeps its own AdamW state: no first-step state allocation timed
        heads = prepare(m, fraction, rest)
        opt = make_optimizer(m, TrainSettings(weight_decay=0.01))
        runs.append(Run(setting, fraction, m, heads, opt, sum(p.numel() for p in m.parameters() if p.requires_grad)))
    for i in range(steps + 1):
        for r in runs:
            t = StepTimes() if i == 0 else r.times  # the warm-up's phases are not counted
            t0 = time.perf_counter()
            timed_step(r.model, r.optimizer, iter([batch]), torch.device("cpu"), t)
            if i:
                r.secs.append(time.perf_counter() - t0)
    rows = []
    for r in runs:
        k, t = len(r.secs), r.times
        rows.append(Row(preset, r.setting, r.fraction, r.heads, r.trained, sum(r.secs) / k, min(r.secs),
                        (t.forward_s + t.loss_s) / k, t.backward_s / k, t.optimizer_step_s / k))
    return rows


def print_table(rows: list[Row]) -> None:
    full = rows[0]
    print(f"{'setting':12} {'share':>5} {'heads':>5} {'trained':>12} {'mean s':>8} {'min s':>8} {'fwd s':>7} "
          f"{'bwd s':>7} {'opt s':>7} {'mean vs full':>12} {'min vs full':>11} {'poster time':>11} {'poster ppl':>10}")
    for r in rows:
        change, min_change = 100 * (r.mean_s / full.mean_s - 1), 100 * (r.min_s / full.min_s - 1)
        poster = POSTER.get(r.fraction) if r.setting != "full" else None
        p_time, p_ppl = (f"{poster[0]:+.2f}%", f"{poster[1]:+.1f}%") if poster else ("", "")
        print(f"{r.setting:12} {r.fraction:5.2f} {r.heads:>5} {r.trained_params:12,} {r.mean_s:8.3f} {r.min_s:8.3f} "
              f"{r.forward_s:7.3f} {r.backward_s:7.3f} {r.optimizer_s:7.3f} {change:+11.2f}% {min_change:+10.2f}% "
              f"{p_time:>11} {p_ppl:>10}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help=f"comma-separated, of {', '.join(preset_names())}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-tokens", type=int, default=256)
    ap.add_argument("--target-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting, after one warm-up step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    presets = [p.strip() for p in a.preset.split(",") if p.strip()]
    unknown = [p for p in presets if p not in preset_names()]
    if unknown or not presets or a.steps < 1:
        ap.error(f"presets must be of {', '.join(preset_names())} (got {a.preset!r}) and --steps >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    info = {"batch": a.batch, "input_tokens": a.input_tokens, "target_tokens": a.target_tokens, "steps": a.steps,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    out = []
    for preset in presets:
        model, origin = load_model(preset)
        origin = origin.split(":")[0]  # random weights do not change a step's cost
        batch = synthetic_batch(a.batch, a.input_tokens, a.target_tokens, model.config.vocab_size)
        rows = measure(preset, model, batch, a.steps)
        out.extend(rows)
        if not a.json:
            print(f"bench.smha: {preset} ({origin}, {model.config.num_heads} heads of {model.config.d_kv}); batch "
                  f"{a.batch} x {a.input_tokens} input + {a.target_tokens} target tokens; {a.steps} timed steps "
                  f"after 1 warm-up; AdamW; torch {torch.__version__}, {torch.get_num_threads()} threads")
            print_table(rows)
            print()
        del model
    if a.json:
        print(json.dumps({**info, "rows": [asdict(r) for r in out]}, indent=1))
    else:
        print("share: of the heads asked for; heads: trained per attention module (the first ones, rounded as "
              "fedcore.methods.smha does). 'rest trains': every other weight trains too; 'heads only': only the "
              "heads train. Poster figures: wall time and perplexity change against training all heads.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

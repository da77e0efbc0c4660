"""Round policies side by side: wall time per round and idle ratio (Szablewski, Sani, Lane).

`netem policies hetero` runs one scenario once per policy (`steps`, `samples`,
`time`) and prints one row per policy from the runs' summary.json and
rounds.jsonl. Round 1 of policy `time` has no measurements yet and falls back
to `steps`, so the table also shows rounds 2+ alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from fedcore.records import known

from .table1 import read_run

POLICIES = ("steps", "samples", "time")

# The poster's table (policy, training wall time s, average idle ratio per client %).
STUDY = [("1 same steps", 2078, 20.11), ("2a same samples, grad. accumulation", 2344, 26.85),
         ("2b same samples", 3376, 37.10), ("3 minimal idle time", 1876, 2.62), ("homogeneous", 1318, 1.64)]


@dataclass
class PolicyRow:
    run: str
    policy: str
    rounds: int
    wall_s: float  # mean per round, all rounds
    wall_later_s: float | None  # mean per round, rounds 2+
    idle: float  # mean over device-rounds, all rounds
    idle_later: float | None
    samples: float  # mean samples processed per round, summed over devices
    steps: str  # steps per device in the last round


def load(run_dir: Path) -> PolicyRow:
    run_dir = Path(run_dir)
    summary, records = read_run(run_dir)
    rounds = [s for s in summary["rounds"] if s["round"] >= 1]
    got = [r for r in records if r.aggregated and known(r.idle_ratio) is not None]
    if not rounds or not got:
        raise ValueError(f"{run_dir}: no completed rounds with idle ratios")
    later = [s for s in rounds if s["round"] >= 2]
    later_recs = [r for r in got if r.round >= 2]
    last = max(r.round for r in got)
    steps = ", ".join(f"{r.client} {int(r.extra_value('steps', 0))}"
                      for r in sorted(got, key=lambda r: r.client) if r.round == last)
    return PolicyRow(
        run=run_dir.name, policy=str(summary.get("config", {}).get("round_policy", rounds[0].get("policy", "?"))),
        rounds=len(rounds), wall_s=mean(s["wall_s"] for s in rounds),
        wall_later_s=mean(s["wall_s"] for s in later) if later else None,
        idle=mean(r.idle_ratio for r in got),
        idle_later=mean(r.idle_ratio for r in later_recs) if later_recs else None,
        samples=sum(r.num_samples for r in got) / len(rounds), steps=steps)


def render(rows: list[PolicyRow]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)
    head = ("policy", "rounds", "wall s/round", "rounds 2+", "idle % mean", "rounds 2+", "samples/round",
            "steps per device (last round)")
    body = [(r.policy, str(r.rounds), f(r.wall_s, ".1f"), f(r.wall_later_s, ".1f"), f(100 * r.idle, ".1f"),
             f(r.idle_later * 100 if r.idle_later is not None else None, ".1f"), f(r.samples, ".0f"), r.steps)
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.rjust(w) if i and i < 7 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in (head, *body)]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("wall s/round: from dispatch to the last update (server clock); idle %: per device and round, "
                 "time waiting for the slowest device / round wall time")
    lines.append("study (Szablewski, Sani, Lane; their fleet and budget): " + "; ".join(
        f"{name}: {wall} s, idle {idle}%" for name, wall, idle in STUDY))
    return "\n".join(lines)

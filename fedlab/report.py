"""`fedserver report RUN_DIR`: per-round and per-device tables (markdown) and PNG plots of a run.

Reads what every run writes: summary.json (per round), rounds.jsonl (per
device and round) and, behind emulated links, links.json (each device's
profile). Plots need matplotlib (`pip install 'fedtune[plots]'`) and use the
Agg backend, so no display is needed.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from fedcore.metrics import DEVICE_FIGURES
from fedcore.records import DeviceRound, known

from fedserver.storage import RoundLog

LOOPBACK = "loopback"
UNKNOWN_LINK = "not emulated"
PHASES = (("download", "t_down_s", "#4C72B0"), ("compute", "t_comp_s", "#55A868"),
          ("upload", "t_up_s+t_wait_s", "#C44E52"), ("idle", None, "#DDDDDD"))
# Optional per-device figures shown when any record has them: key -> column title.
OPTIONAL_COLUMNS = {"tokens_per_s": "tokens/s", "mfu": "MFU", "power_w": "power W", "energy_j": "energy J",
                    "eta_e": "eta_e"}
assert set(OPTIONAL_COLUMNS) <= set(DEVICE_FIGURES)


@dataclass
class Run:
    path: Path
    summaries: list[dict[str, Any]]  # round 0 (initial evaluation) first
    records: list[DeviceRound]       # the last attempt of each round only
    profiles: dict[str, str]         # device -> link profile

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return [s for s in self.summaries if s.get("round", 0) > 0]

    def profile(self, device: str) -> str:
        return self.profiles.get(device, self.profiles.get("*", UNKNOWN_LINK))


def load_run(path: Path) -> Run:
    path = Path(path)
    summary_file = path / "summary.json"
    if not summary_file.exists():
        raise ValueError(f"{path} has no summary.json: not a run directory (fedserver simulate/run --out, netem run)")
    summaries = json.loads(summary_file.read_text()).get("rounds", [])
    records = [DeviceRound.from_json(d) for d in RoundLog(path / "rounds.jsonl").read()]
    # A round that failed and was retried leaves records of its failed attempts; keep the last one.
    last_attempt: dict[int, int] = {}
    for r in records:
        last_attempt[r.round] = max(last_attempt.get(r.round, 0), known(r.attempt) or 1)
    records = [r for r in records if (known(r.attempt) or 1) == last_attempt[r.round]]
    return Run(path, summaries, records, _profiles(path))


def _profiles(path: Path) -> dict[str, str]:
    links = path / "links.json"
    if links.exists():
        return {d["device"]: d["profile"] for d in json.loads(links.read_text()).get("devices", [])}
    sim = path / "simulate.json"
    if sim.exists() and not json.loads(sim.read_text()).get("link"):
        return {"*": LOOPBACK}
    return {}


# ------------------------------------------------------------------ tables
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def megabytes(n: float | None) -> str:
    """Bytes as MB, two decimals; below 0.1 MB three significant digits (a zero-order update is 0.000465 MB)."""
    if n is None:
        return "-"
    mb = n / 1e6
    return f"{mb:.2f}" if mb >= 0.1 or mb == 0 else f"{mb:.3g}"


def _known_mean(recs: list[DeviceRound], key: str) -> float | None:
    """The mean over the records that know `key` (a lost figure is null, not 0); None if none does."""
    vals = [v for v in (known(getattr(r, key)) for r in recs) if v is not None]
    return mean(vals) if vals else None


def _markdown(header: list[str], rows: list[list[str]], text_cols: int = 0) -> str:
    """A markdown table; the first `text_cols` columns are left-aligned, numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i < text_cols else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(":" + "-" * (w + 1) if i < text_cols else "-" * (w + 1) + ":"
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _present(records: list[DeviceRound]) -> list[str]:
    return [k for k in OPTIONAL_COLUMNS if any(r.figure(k) is not None for r in records)]


def round_table(run: Run) -> str:
    extra = [k for k in _present(run.records) if k in ("power_w", "energy_j")]
    header = ["round", "devs", "T_comp s", "T_comm s", "G", "MB down", "MB up", "wire down", "wire up",
              "eval loss", "ROUGE-L", *(OPTIONAL_COLUMNS[k] + (" (sum)" if k == "energy_j" else " (mean)")
                                        for k in extra)]
    by_round = defaultdict(list)
    for r in run.records:
        if r.aggregated:
            by_round[r.round].append(r)
    rows = []
    for s in run.summaries:
        n = s.get("round", 0)
        row = [str(n), str(len(s.get("participants", []))) if n else "-", _fmt(s.get("t_comp_s"), ".2f"),
               _fmt(s.get("t_comm_s"), ".2f"), _fmt(s.get("g"), ".3f"),
               megabytes(s.get("bytes_down")), megabytes(s.get("bytes_up")), s.get("download", "-"),
               s.get("upload", "-"), _fmt(s.get("eval_loss"), ".4f"), _fmt(s.get("rougeL"), ".2f")]
        for k in extra:
            vals = [v for v in (r.figure(k) for r in by_round.get(n, [])) if v is not None]
            agg = (sum(vals) if k == "energy_j" else mean(vals)) if vals else None
            row.append(_fmt(agg, ".1f"))
        rows.append(row)
    return _markdown(header, rows)


def device_table(run: Run) -> str:
    extra = _present(run.records)
    header = ["device", "link", "rounds", "T_comp s", "T_down s", "T_up s", "T_comm s", "G", "MB down", "MB up",
              *(OPTIONAL_COLUMNS[k] for k in extra)]
    by_dev: dict[str, list[DeviceRound]] = defaultdict(list)
    for r in run.records:
        if r.aggregated and r.measured:
            by_dev[r.client].append(r)
    rows = []
    for dev, recs in sorted(by_dev.items()):
        row = [dev, run.profile(dev), str(len(recs)), f"{mean(r.t_comp_s for r in recs):.2f}",
               f"{mean(r.t_down_s for r in recs):.2f}", _fmt(_known_mean(recs, "t_up_s"), ".2f"),
               _fmt(_known_mean(recs, "t_comm_s"), ".2f"), _fmt(_known_mean(recs, "g"), ".3f"),
               megabytes(sum(r.bytes_down or 0 for r in recs)), megabytes(sum(r.bytes_up or 0 for r in recs))]
        for k in extra:
            vals = [v for v in (r.figure(k) for r in recs) if v is not None]
            row.append(_fmt(mean(vals) if vals else None, ".4g"))
        rows.append(row)
    return _markdown(header, rows, text_cols=2)


# ------------------------------------------------------------------- plots
def _phase_seconds(r: DeviceRound, key: str | None) -> float:
    if key is None:
        return 0.0
    return sum(float(known(getattr(r, k)) or 0.0) for k in key.split("+"))


def plot_timeline(run: Run, plt: Any, out: Path) -> Path:
    """Per device, each round's download, compute, upload and idle time as stacked horizontal bars."""
    devices = sorted({r.client for r in run.records})
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * max(1, len(devices))))
    start = 0.0
    for s in run.rounds:
        wall = float(s.get("wall_s", 0.0))
        ax.axvline(start, color="black", lw=0.6, ls=":")
        ax.text(start, len(devices) - 0.4, f" r{s['round']}", fontsize=8, va="bottom")
        for r in (r for r in run.records if r.round == s["round"]):
            y = devices.index(r.client)
            at = start
            busy = 0.0
            for label, key, color in PHASES:
                width = _phase_seconds(r, key) if key else max(0.0, wall - busy)
                busy += width
                if width > 0:
                    ax.barh(y, width, left=at, height=0.6, color=color,
                            edgecolor="white" if label != "idle" else "#BBBBBB", linewidth=0.4)
                at += width
            if not r.aggregated:
                ax.text(start, y, " missing", fontsize=7, va="center", color="#C44E52")
        start += wall
    ax.set_yticks(range(len(devices)), [f"{d} ({run.profile(d)})" for d in devices])
    ax.set_ylim(-0.6, len(devices) + 0.2)
    ax.set_xlabel("seconds since round 1 started (rounds laid end to end by their wall time)")
    ax.set_title(f"Per-round timeline per device: {run.path.name}", loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in PHASES]
    # Above the plot, right of the title: below it would cover the axis label on short figures.
    ax.legend(handles, [p for p, _, _ in PHASES], loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=4,
              fontsize=8, frameon=False)
    return _save(fig, plt, out / "timeline.png")


def plot_g(run: Run, plt: Any, out: Path) -> Path:
    """G per round (the round's and each link profile's) and the mean G of each link profile."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    rounds = [s for s in run.rounds if s.get("g") is not None]
    ax.plot([s["round"] for s in rounds], [s["g"] for s in rounds], "k-o", lw=1.5, ms=4,
            label="round: slowest T_comp / slowest T_comm")
    per_profile: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in run.records:
        if r.aggregated and known(r.g) is not None:
            per_profile[run.profile(r.client)][r.round].append(r.g)
    for prof, by_round in sorted(per_profile.items()):
        xs = sorted(by_round)
        ax.plot(xs, [mean(by_round[x]) for x in xs], "o--", ms=5, lw=0.8, label=f"{prof}: mean device G")
    ax.set_yscale("log")
    _plain_log_labels(ax, [s["g"] for s in rounds] + [g for p in per_profile.values() for gs in p.values()
                                                       for g in gs])
    _rounds_axis(ax)
    ax.set_ylabel("G = T_comp / T_comm (log)")
    ax.set_title("G per round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    names = sorted(per_profile)
    means = [mean(g for gs in per_profile[p].values() for g in gs) for p in names]
    bars = bx.bar(names, means, color="#8172B2")
    for b, p in zip(bars, names):
        n = sum(len(v) for v in per_profile[p].values())
        bx.annotate(f"{b.get_height():.3g}\n({n} update{'s' if n != 1 else ''})", (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    bx.set_yscale("log")
    if means:
        bx.set_ylim(min(means) / 3, max(means) * 3)
    _plain_log_labels(bx, [min(means) / 3, max(means) * 3] if means else [])
    bx.set_title("mean G per link profile")
    bx.grid(alpha=0.3, axis="y", which="both")
    return _save(fig, plt, out / "g.png")


def plot_rouge(run: Run, plt: Any, out: Path) -> Path:
    """ROUGE-1/2/L of the global model per round (round 0: the initial model), eval loss alongside."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ss = [s for s in run.summaries if s.get("rougeL") is not None]
    xs = [s["round"] for s in ss]
    ax.plot(xs, [s["rougeL"] for s in ss], "-o", color="#C44E52", lw=2, label="ROUGE-L")
    for key, style in (("rouge1", ":"), ("rouge2", "--")):
        ax.plot(xs, [s.get(key) for s in ss], style, color="gray", lw=1, label=key.upper().replace("E", "E-"))
    _rounds_axis(ax)
    ax.set_ylabel("ROUGE (0-100)")
    ax.grid(alpha=0.3)
    bx = ax.twinx()
    bx.plot(xs, [s.get("eval_loss") for s in ss], "-", color="#4C72B0", lw=1, alpha=0.7, label="eval loss")
    bx.set_ylabel("eval loss", color="#4C72B0")
    lines = ax.get_legend_handles_labels()
    more = bx.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    ax.set_title(f"Held-out ROUGE per round: {run.path.name}")
    return _save(fig, plt, out / "rouge.png")


def plot_bytes(run: Run, plt: Any, out: Path) -> Path:
    """Wire MB per round, down and up stacked, coloured by direction and encoding/codec."""
    fig, ax = plt.subplots(figsize=(8, 4))
    palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2", "#937860"]
    colors: dict[str, str] = {}
    seen: set[str] = set()
    for s in run.rounds:
        bottom = 0.0
        for direction, key, enc_key in (("down", "bytes_down", "download"), ("up", "bytes_up", "upload")):
            label = f"{direction} {s.get(enc_key, '?')}"
            color = colors.setdefault(label, palette[len(colors) % len(palette)])
            mb = s.get(key, 0) / 1e6
            ax.bar(s["round"], mb, bottom=bottom, color=color, label=None if label in seen else label)
            seen.add(label)
            bottom += mb
    _rounds_axis(ax)
    ax.set_ylabel("MB on the wire (all devices)")
    ax.set_title("Bytes per round by direction and encoding/codec")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, out / "bytes.png")


def _rounds_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _plain_log_labels(ax: Any, values: list[float]) -> None:
    """Log axes labelled 150, 200 (not 1.5x10^2), with fewer ticks when the values span decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pos = [v for v in values if v > 0]
    wide = bool(pos) and max(pos) / min(pos) > 5
    subs = (1.0, 2.0, 5.0) if wide else (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: Path, out: Path | None = None) -> str:
    """Write report.md and the PNGs; return the text printed by `fedserver report`."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("fedserver report draws with matplotlib: pip install 'fedtune[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = load_run(run_dir)
    if not run.rounds:
        raise ValueError(f"{run_dir}: no completed round yet; nothing to report")
    out = Path(out) if out is not None else run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = [plot_timeline(run, plt, out), plot_g(run, plt, out), plot_rouge(run, plt, out),
            plot_bytes(run, plt, out)]
    links = sorted({run.profile(d) for d in {r.client for r in run.records}})
    text = "\n".join([
        f"# Run {run.path}", "",
        f"{len(run.rounds)} rounds, {len({r.client for r in run.records})} devices took part; "
        f"links: {', '.join(links) or '-'}", "",
        "## Per round", "",
        "T_comp and T_comm are the slowest device's; G = T_comp / T_comm; MB summed over the round's devices; "
        "round 0 is the initial model.", "",
        round_table(run), "",
        "## Per device", "",
        "Means over the device's aggregated rounds; MB summed.", "",
        device_table(run), "",
        "## Plots", "",
        *(f"![{p.stem}]({p.name})" for p in pngs), ""])
    (out / "report.md").write_text(text)
    return text + "\nwrote " + ", ".join(str(p) for p in [out / "report.md", *pngs])

"""`netem report RUN_DIR...`: the study's Table 1 layout from measured runs, next to its figures.

Each run directory is what `fedserver simulate` or `netem run` wrote:
summary.json (config), rounds.jsonl (one record per device and round) and,
behind emulated links, links.json. Figures are means over the devices'
aggregated rounds; T_comm counts download, upload and the server's
acknowledgement, as the study counts sending, waiting and receiving.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from fedcore.hwreport import efficiency_lines
from fedcore.records import DeviceRound

# Woisetschläger et al. 2023, Table 1 (LTE 40/15 Mbit/s; computation per 100K tokens).
# The Large row's up/down are swapped in the source; listed here corrected.
STUDY_TABLE1: dict[str, dict[str, float]] = {
    "small": {"mb": 308, "lte_up": 157, "lte_down": 61, "lte_total": 218, "10g_total": 0.2,
              "comp_a100": 1, "comp_orin": 14},
    "base": {"mb": 990, "lte_up": 504, "lte_down": 197, "lte_total": 701, "10g_total": 0.8,
             "comp_a100": 4, "comp_orin": 39},
    "large": {"mb": 3100, "lte_up": 1653, "lte_down": 620, "lte_total": 2273, "10g_total": 2.5,
              "comp_a100": 15, "comp_orin": 118},
}


@dataclass
class Row:
    run: str
    preset: str
    wire: str
    link: str
    wire_mb: float
    t_up_s: float
    t_down_s: float
    t_comm_s: float
    t_comp_s: float
    tokens: float
    devices: int

    @property
    def t_comp_100k_s(self) -> float:
        return self.t_comp_s / self.tokens * 1e5 if self.tokens else float("nan")

    @property
    def g(self) -> float:
        return self.t_comp_s / self.t_comm_s if self.t_comm_s else float("nan")

    @property
    def g_100k(self) -> float:
        return self.t_comp_100k_s / self.t_comm_s if self.t_comm_s else float("nan")

    @property
    def g_orin(self) -> float:
        """The study's Orin compute time per 100K tokens over our measured T_comm."""
        s = STUDY_TABLE1.get(self.preset)
        return s["comp_orin"] / self.t_comm_s if s and self.t_comm_s else float("nan")


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[DeviceRound]]:
    """summary.json and the rounds.jsonl records of a run directory."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        records = [DeviceRound.from_json(json.loads(line))
                   for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    except FileNotFoundError as exc:
        raise ValueError(f"{run_dir} is not a run directory: {exc.filename} is missing") from None
    return summary, records


def load_run(run_dir: Path) -> Row:
    run_dir = Path(run_dir)
    summary, records = read_run(run_dir)
    cfg = summary.get("config", {})
    got = [r for r in records if r.aggregated and r.measured]
    if not got:
        raise ValueError(f"{run_dir}: no aggregated device rounds with metrics in rounds.jsonl")
    downloads = [r for r in got if not r.download_cached]
    link = "loopback"
    if (run_dir / "links.json").exists():
        links = json.loads((run_dir / "links.json").read_text())
        names = sorted({d["profile"] for d in links.get("devices", [])})
        link = ",".join(names) + (" [htb]" if links.get("backend") == "htb" else "")
    return Row(
        run=run_dir.name,
        preset=str(cfg.get("preset", "?")),
        wire=f"{cfg.get('upload_encoding', '?')}/{cfg.get('upload_codec', '?')}",
        link=link,
        wire_mb=mean(r.bytes_up for r in got) / 1e6,
        t_up_s=mean(r.t_up_s + r.t_wait_s for r in got),
        t_down_s=mean(r.t_down_s for r in downloads) if downloads else 0.0,
        t_comm_s=mean(r.t_comm_s for r in got),
        t_comp_s=mean(r.t_comp_s for r in got),
        tokens=mean(r.tokens for r in got),
        devices=len(got),
    )


def _study_cells(row: Row) -> str:
    s = STUDY_TABLE1.get(row.preset)
    if s is None:
        return "(no published row for this preset)"
    if row.link.startswith("lte"):
        return (f"{s['mb']:.0f} MB, up {s['lte_up']:.0f} s, down {s['lte_down']:.0f} s, T_comm {s['lte_total']:.0f} s, "
                f"G Orin {s['comp_orin'] / s['lte_total']:.3f}, G A100 {s['comp_a100'] / s['lte_total']:.3f}")
    if row.link.startswith("10g"):
        return (f"{s['mb']:.0f} MB, T_comm {s['10g_total']:g} s, G Orin {s['comp_orin'] / s['10g_total']:.2f}, "
                f"G A100 {s['comp_a100'] / s['10g_total']:.2f}")
    return f"{s['mb']:.0f} MB (study measured LTE and 10G only)"


def render(rows: list[Row]) -> str:
    head = (f"{'run':<18} {'model':<6} {'wire':<10} {'link':<22} {'wire MB':>8} {'T_up s':>8} {'T_down s':>8} "
            f"{'T_comm s':>8} {'T_comp s':>8} {'comp/100K s':>11} {'G':>8} {'G(100K)':>8} {'G Orin':>7}")
    lines = ["Table 1 layout (Woisetschläger et al. 2023): measured per device and round, mean over "
             "aggregated updates", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.run:<18.18} {r.preset:<6} {r.wire:<10} {r.link:<22.22} {r.wire_mb:8.1f} {r.t_up_s:8.2f} "
                     f"{r.t_down_s:8.2f} {r.t_comm_s:8.2f} {r.t_comp_s:8.2f} {r.t_comp_100k_s:11.2f} {r.g:8.4f} "
                     f"{r.g_100k:8.4f} {r.g_orin:7.4f}")
    lines.append("")
    lines.append("study, same model and link:")
    for r in rows:
        lines.append(f"  {r.run:<18.18} {_study_cells(r)}")
    lines.append("G = T_comp / T_comm with T_comp measured here (this machine's CPU); G(100K) uses T_comp "
                 "normalised to 100K tokens, as the study does;\n"
                 "G Orin puts the study's Jetson AGX Orin compute time per 100K tokens over our measured T_comm.")
    return "\n".join(lines)


def efficiency_sections(run_dirs: list[Path]) -> str:
    """Each run's per-device hardware efficiency, next to the study's Tables 2-3."""
    parts = []
    for d in run_dirs:
        summary, records = read_run(Path(d))
        cfg = summary.get("config", {})
        lines = efficiency_lines(records, cfg.get("preset"), cfg.get("batch_size"))
        if lines:
            parts.append(f"\n{Path(d).name}: " + "\n".join(lines))
    return "\n".join(parts)


def report(run_dirs: list[Path]) -> str:
    """Table 1, then the hardware efficiency of each run."""
    return render([load_run(Path(d)) for d in run_dirs]) + "\n" + efficiency_sections(run_dirs)


def rows_as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [{**r.__dict__, "t_comp_100k_s": r.t_comp_100k_s, "g": r.g, "g_100k": r.g_100k, "g_orin": r.g_orin}
            for r in rows]

"""The round records: rounds.jsonl (one DeviceRound per device and attempt) and summary.json (a RoundSummary per round).

Builds the records and the summary from a round's state (fedserver.roundstate),
writes them, and on resume makes both files agree with the checkpoint, the
commit point of a round. The schema itself is fedcore.records. It names no
fine-tuning method and no coordinator: what a summary says of the method and
the bytes re-sent per device are passed in. Time comes from the injected clock.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.clock import Clock
from fedcore.config import to_dict
from fedcore.records import ABSENT, DEVICE_METRIC_KEYS, HARDWARE_KEYS, DeviceRound, RoundSummary

from .config import ServerConfig
from .strategy import SeedMean
from .roundstate import Assignment, RoundState
from .storage import RoundLog, set_aside, write_json_atomic

log = logging.getLogger("fedserver.roundlog")


@dataclass
class EvalRecord:
    loss: float
    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815
    n: int


class RoundRecords:
    """rounds.jsonl and summary.json of one run directory, for the coordinator."""

    def __init__(self, out: Path, cfg: ServerConfig, clock: Clock,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.out, self.cfg, self.clock, self.on_round = out, cfg, clock, on_round
        self.log = RoundLog(out / "rounds.jsonl")
        self.summary_path = out / "summary.json"
        self.summaries: list[dict[str, Any]] = []  # summary.json's rounds as written

    # ------------------------------------------------------------ building
    def device_records(self, cur: RoundState, resent_down: Mapping[str, int]) -> list[DeviceRound]:
        """The round's records, one per sampled device; resent_down: download bytes sent again, per device."""
        return device_records(cur, cur.collected_at or self.clock.monotonic(), self.cfg.round_policy, resent_down)

    def summary(self, cur: RoundState, records: list[DeviceRound], ev: EvalRecord | None, t_agg: float,
                version: str, strategy: str, upload_note: str = "",
                method_fields: Mapping[str, Any] | None = None) -> RoundSummary:
        """The round's summary; upload_note and method_fields: what it says of the fine-tuning method."""
        return round_summary(cur, records, ev, t_agg, (cur.collected_at or self.clock.monotonic()) - cur.started,
                             self.cfg, version, strategy, upload_note, method_fields)

    # ------------------------------------------------------------- writing
    def log_devices(self, records: list[DeviceRound]) -> None:
        for rec in records:
            self.log.append(rec.to_json())

    def record_round(self, summary: RoundSummary) -> None:
        """Add the round to summary.json and tell on_round."""
        s = summary.to_json()
        self.summaries.append(s)
        self._write_summaries()
        if self.on_round:
            self.on_round(s)

    def _write_summaries(self) -> None:
        write_json_atomic(self.summary_path, {"config": to_dict(self.cfg), "rounds": self.summaries})

    # ------------------------------------------------------------ resuming
    def reconcile(self, rnd: int, records: list[dict[str, Any]] | None, summary: dict[str, Any] | None) -> None:
        """Make rounds.jsonl and summary.json agree with the checkpoint of round `rnd` (0: none).

        A crash can leave records of a round that never committed (it will
        run again), lose some or all records of one that did (the checkpoint
        carries a copy), or repeat an append: the log ends with every
        committed round's records exactly as its checkpoint holds them, and
        each change is said in one warning.
        """
        path = self.log.path
        found, bad = self.log.salvage()
        kept, notes = reconcile_records(found, rnd, records)
        if bad:
            notes.insert(0, f"corrupt line(s) {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} "
                            f"skipped (the file as it was is kept as {set_aside(path, copy=True).name})")
        if notes:
            log.warning("round log %s: %s", path, "; ".join(notes))
            self.log.rewrite(kept)
        self.summaries = self._reconciled_summaries(rnd, summary)

    def _reconciled_summaries(self, rnd: int, committed: dict[str, Any] | None) -> list[dict[str, Any]]:
        """summary.json's rounds up to `rnd`, round `rnd` as its checkpoint holds it; rewritten if that changed.

        summary.json is derived data: one that cannot be read is set aside
        (never deleted) and rebuilt from what the checkpoint holds.
        """
        if not rnd:
            return []
        path = self.summary_path
        notes: list[str] = []
        try:
            found = read_summaries(path)
        except ValueError as e:
            found = []
            notes.append(f"unreadable ({e}), set aside as {set_aside(path).name}; rebuilt from the checkpoint")
        kept, seen = [], set()
        for s in found:
            n = round_of(s)
            if n is not None and n < rnd and n not in seen:
                seen.add(n)
                kept.append(s)
        ours = [s for s in found if s.get("round") == rnd]
        kept += [committed] if committed is not None else ours[:1]
        if kept != found:
            if not notes:
                dropped = len(found) - len(kept) + (1 if ours[:1] != kept[-1:] else 0)
                notes.append(f"{dropped} summaries of uncommitted, repeated or unnumbered rounds dropped"
                             + ("" if ours == kept[-1:] else f"; round {rnd}'s restored from its checkpoint"))
            log.warning("summary %s: %s", path, "; ".join(notes))
            self.summaries = kept
            self._write_summaries()
        return kept


def device_records(cur: RoundState, end: float, policy: str, resent_down: Mapping[str, int]) -> list[DeviceRound]:
    """One record per sampled device; `end` is when the round stopped collecting (server clock)."""
    wall = max(end - cur.started, 1e-9)
    return [device_record(cur, a, end, wall, policy, resent_down.get(a.device_id, 0))
            for a in cur.assignments.values()]


def device_record(cur: RoundState, a: Assignment, end: float, wall: float, policy: str,
                  resent_down: int) -> DeviceRound:
    m = dict(a.metrics or {})
    rec = DeviceRound(round=cur.number, attempt=cur.attempt, client=a.device_id,
                      status=a.status if a.status in ("aggregated", "refused") else "missing",
                      num_samples=a.num_samples, num_samples_claimed=a.claimed_samples)
    for name in ("weight_cut", "reason", "upload_encoding", "encoding_reason"):
        if getattr(a, name):
            setattr(rec, name, getattr(a, name))
    for k in DEVICE_METRIC_KEYS:
        if k in m:
            setattr(rec, k, m[k])
    lost = lost_upload_figures(a, m)
    if lost:
        # The server's count stands in for the bytes; the upload times are unknown (null), never 0.
        rec.note, rec.bytes_up = lost, a.bytes_in
        if m:
            rec.t_up_s = rec.t_wait_s = None
    extra = m.get("extra") or {}
    if "t_comp_s" in m:
        rec.t_comm_s = None if lost else m["t_down_s"] + m["t_up_s"] + m["t_wait_s"]
        rec.tokens_per_s = m["tokens"] / m["t_comp_s"] if m["t_comp_s"] > 0 else 0.0
        rec.g = m["t_comp_s"] / rec.t_comm_s if rec.t_comm_s else None
        # Hardware figures (fedcore.efficiency): what the device did not know is null, never 0.
        for k in HARDWARE_KEYS:
            setattr(rec, k, extra.get(k))
        rec.power_source = m.get("power_source") or None
        rec.hardware = m.get("hardware") or None
    if a.plan is not None:
        rec.plan = f"{a.plan.describe()}: {a.plan.note}" if a.plan.note else a.plan.describe()
        rec.trained_params = a.plan_params
    rec.policy = policy
    rec.local_steps_assigned = a.local_steps
    rec.local_samples_assigned = a.local_samples
    rec.expected_s = a.expected_s
    # Waiting for the slowest device, as a share of the round's wall time (server clock).
    rec.idle_ratio = (end - a.done_at) / wall if a.done_at is not None else None
    rec.done_s = a.done_at - cur.started if a.done_at is not None else None
    rec.bytes_resent_down = resent_down
    rec.bytes_resent_up = int(extra.get("bytes_resent_up", 0))
    rec.bytes_resent = rec.bytes_resent_down + rec.bytes_resent_up
    rec.compute_slowdown_emulated = extra.get("compute_slowdown", 1.0)
    return rec


def lost_upload_figures(a: Assignment, m: Mapping[str, Any]) -> str:
    """Why an aggregated update's upload figures from the device are unusable ("": they are usable)."""
    if a.status != "aggregated":
        return ""
    if not m:
        return "no metrics arrived: the device went away after the server acknowledged its upload"
    if not m.get("bytes_up") and a.bytes_in:
        return (f"the device reported 0 bytes up for an upload the server received ({a.bytes_in} bytes): its "
                f"upload figures were lost (a restart after the acknowledgement?); upload times unknown")
    return ""


def round_summary(cur: RoundState, records: list[DeviceRound], ev: EvalRecord | None, t_agg: float, wall_s: float,
                  cfg: ServerConfig, version: str, strategy: str, upload_note: str = "",
                  method_fields: Mapping[str, Any] | None = None) -> RoundSummary:
    """The round's summary from its device records; wall_s: dispatch to the last update (or the deadline).

    upload_note is appended to the upload description (it is the whole of it
    for a method whose updates are (seed, scalar) pairs) and method_fields are
    the method's own keys (what fedcore.methods says of itself)."""
    seeds = isinstance(cur.mean, SeedMean)
    aggregated = [r for r in records if r.aggregated]
    got = [r for r in aggregated if r.measured]
    # T_comm and G come from the devices whose communication figures are known: a lost one is not a zero.
    known = [r for r in got if r.t_comm_s is not None]
    t_comm = max((r.t_comm_s for r in known), default=None)
    g_comp = max((r.t_comp_s for r in known), default=0.0)
    weight = sum(r.num_samples for r in got) or 1
    return RoundSummary(
        round=cur.number,
        participants=[r.client for r in aggregated],
        sampled=len(cur.assignments),
        t_comp_s=max((r.t_comp_s for r in got), default=0.0),
        t_comm_s=t_comm,
        g=g_comp / t_comm if t_comm else None,
        figures_unknown=[r.client for r in records if r.note],
        t_down_s=max((r.t_down_s for r in got), default=0.0),
        t_up_s=max((r.t_up_s for r in known), default=None),
        bytes_down=sum(_or(r.bytes_down, 0) for r in got),
        bytes_up=sum(_or(r.bytes_up, 0) for r in aggregated),
        tokens=sum(_or(r.tokens, 0) for r in got),
        train_loss=sum(_or(r.train_loss, 0.0) * r.num_samples for r in got) / weight,
        wall_s=wall_s,
        policy=cfg.round_policy,
        idle_ratio_mean=(sum(r.idle_ratio for r in got) / len(got)) if got else None,
        bytes_resent=sum(_or(r.bytes_resent, 0) for r in records),
        aggregate_s=t_agg,
        version=version,
        strategy=strategy,
        download=f"{cfg.download_encoding}/{cfg.download_codec}"
                 + (f" + {cfg.download_delta_encoding} deltas" if cfg.download_payload == "delta" else "")
                 + (" + seed replay" if seeds else ""),
        # (Seed, scalar) pairs are not tensors: no wire encoding describes them.
        upload=upload_note.strip() if seeds else (
            f"{cfg.upload_encoding}/{cfg.upload_codec}"
            + (f" {cfg.upload_payload}" + (" +EF" if cfg.error_feedback else "") if cfg.upload_payload == "delta"
               else "")
            + upload_note),
        more=dict(method_fields or {}),
        **eval_fields(ev),
    )


def baseline_summary(version: str, ev: EvalRecord | None) -> RoundSummary:
    """Round 0: the initial model's evaluation."""
    return RoundSummary(round=0, participants=[], version=version, **eval_fields(ev))


def _or(v: Any, default: Any) -> Any:
    """v, or default when the record does not hold it."""
    return default if v is ABSENT else v


def eval_fields(ev: EvalRecord | None) -> dict[str, Any]:
    if ev is None:
        return {}
    return {"eval_loss": ev.loss, "rouge1": ev.rouge1, "rouge2": ev.rouge2, "rougeL": ev.rougeL, "eval_n": ev.n}


def read_summaries(path: Path) -> list[dict[str, Any]]:
    """The rounds of summary.json ([] if there is none); ValueError says why it cannot be read."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    rounds = data.get("rounds") if isinstance(data, dict) else None
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise ValueError("no list of round summaries under 'rounds'")
    return rounds


def round_of(rec: Mapping[str, Any]) -> int | None:
    n = rec.get("round")
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def reconcile_records(records: list[dict[str, Any]], rnd: int, committed: list[dict[str, Any]] | None
                      ) -> tuple[list[dict[str, Any]], list[str]]:
    """The round log as the checkpoint of round `rnd` says it must be, and what had to change ([]: nothing).

    Rounds after `rnd` never committed and records without a round number
    are dropped, repeated records kept once, and the committed attempt of
    round `rnd` made exactly the checkpoint's copy `committed`. Records of its
    failed attempts and of earlier rounds stay as they are. Records are the
    lines as read (dicts), so that a line this version cannot parse is kept.
    """
    notes: list[str] = []
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    beyond = malformed = repeated = 0
    for r in records:
        n = round_of(r)
        if n is None:
            malformed += 1
            continue
        if n > rnd:
            beyond += 1
            continue
        key = json.dumps(r, sort_keys=True)
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        kept.append(r)
    for count, what in ((beyond, "of uncommitted rounds"), (malformed, "without a round number"),
                        (repeated, "repeated")):
        if count:
            notes.append(f"{count} record(s) {what} dropped")
    if rnd and committed is not None:
        attempt = committed[0].get("attempt") if committed else None
        ours = [r for r in kept if r["round"] == rnd and r.get("attempt") == attempt]
        if ours != committed:
            kept = [r for r in kept if not (r["round"] == rnd and r.get("attempt") == attempt)] + committed
            notes.append(f"round {rnd}: {len(ours)} record(s) in the log, {len(committed)} in its checkpoint; "
                         f"restored the checkpoint's copy")
    return kept, notes

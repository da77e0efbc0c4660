"""Issue 14, durable server state: nothing in the run directory is used unverified, damage is set aside and the
previous intact state used, derived files are rebuilt, and a full disk is one clear error that loses nothing."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcore.records import RoundSummary
from fedserver import storage
from fedserver.app import build_coordinator
from fedserver.storage import CheckpointDir, CheckpointError, RoundLog, load_checkpoint, save_checkpoint

from fedhelpers import tiny_server_config

LOGGER = "fedserver"


# ----------------------------------------------------------------- helpers
def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Byte range of tensor `name`'s data in a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + start, 8 + n + end


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def records_of(rnd: int, clients=("a", "b", "c"), attempt: int = 1) -> list[dict]:
    return [{"round": rnd, "attempt": attempt, "client": c, "status": "aggregated", "num_samples": 10 + i,
             "t_comp_s": 0.5 + i} for i, c in enumerate(clients)]


def commit(coord, rnd: int, records: list[dict] | None = None) -> Path:
    """What Coordinator._aggregate leaves on disk for round `rnd`: the checkpoint, then the log and summary."""
    records = records_of(rnd) if records is None else records
    summary = {"round": rnd, "participants": [r["client"] for r in records], "version": coord.version}
    tensors, meta = coord.model.checkpoint(coord.strategy)
    meta.update(round=str(rnd), round_records=json.dumps(records), round_summary=json.dumps(summary))
    path = coord.checkpoints.save(rnd, tensors, meta)
    for r in records:
        coord.records.log.append(r)
    coord.round_no = rnd
    coord.records.record_round(RoundSummary.from_json(summary))
    return path


def adam_coordinator(out: Path, **over):
    """A FedAdam server with non-zero moments and a broadcast residual, so every checkpoint prefix is present."""
    cfg = tiny_server_config(out, eval_size=0, rounds=5, strategy="fedadam", insecure=True, **over)
    coord = build_coordinator(cfg)
    train = coord.model.trainable()
    coord.strategy.apply(train, {k: torch.full_like(v, 1e-3) for k, v in train.items() if v.is_floating_point()})
    g = torch.Generator().manual_seed(1)
    coord.model.broadcast_ef.commit({k: torch.randn(v.shape, generator=g) for k, v in list(train.items())[:3]})
    return cfg, coord


def two_rounds(out: Path, **over):
    cfg, coord = adam_coordinator(out, **over)
    commit(coord, 1)
    return cfg, coord, commit(coord, 2)


# ------------------------------------------------------- every tensor verified
@pytest.mark.parametrize("prefix", ["server_opt/m.", "server_opt/v.", "server_ef/", "model"])
def test_durable_every_checkpoint_tensor_is_verified(tmp_path, caplog, one_torch_thread, prefix):
    cfg, coord, newest = two_rounds(tmp_path / "srv")
    names = list(json.loads(newest.read_bytes()[8:8 + struct.unpack("<Q", newest.read_bytes()[:8])[0]]))
    name = next(n for n in names if n != "__metadata__" and (n.startswith(prefix) if prefix != "model"
                                                             else "/" not in n))
    start, end = tensor_span(newest, name)
    count = min(4096, (end - start) // 4)
    overwrite(newest, start, struct.pack(f"<{count}f", *[1e3] * count))  # the 4,096 values of 1e3
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = build_coordinator(cfg)
    assert again.round_no == 1, f"a checkpoint with {name} overwritten was resumed"
    assert newest.name in caplog.text and "does not match its digest" in caplog.text
    assert not newest.exists() and newest.with_name(newest.name + ".damaged").exists(), "set aside, not deleted"


def test_durable_lora_base_weights_and_adapters_are_verified(tmp_path, caplog, one_torch_thread):
    cfg = tiny_server_config(tmp_path / "srv", eval_size=0, rounds=5, lora_rank=2, insecure=True)
    coord = build_coordinator(cfg)
    commit(coord, 1)
    newest = commit(coord, 2)
    header = json.loads(newest.read_bytes()[8:8 + struct.unpack("<Q", newest.read_bytes()[:8])[0]])
    for name in (next(n for n in header if n.startswith("lora_base/")), next(n for n in header if "lora_A" in n)):
        start, _ = tensor_span(newest, name)
        overwrite(newest, start, b"\x00\x00\x80\x7f" * 16)  # +inf
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert build_coordinator(cfg).round_no == 1
    assert "does not match its digest" in caplog.text


def test_durable_checkpoint_metadata_is_verified(tmp_path, caplog, one_torch_thread):
    """The round records in the header are durable state too: an edit of the same length is caught."""
    cfg, coord, newest = two_rounds(tmp_path / "srv")
    raw = newest.read_bytes()
    assert raw.count(b'\\"num_samples\\": 11') == 1
    newest.write_bytes(raw.replace(b'\\"num_samples\\": 11', b'\\"num_samples\\": 99'))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert build_coordinator(cfg).round_no == 1


def test_durable_checkpoint_without_digest_loads_with_a_warning(tmp_path, caplog):
    """Files from before the digest stay loadable, said to be unverified (the documented choice)."""
    path = tmp_path / "old.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(path), metadata={"round": "1"})
    with caplog.at_level(logging.WARNING, logger="fedserver.storage"):
        state, meta = load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(3)) and meta == {"round": "1"}
    assert "UNVERIFIED" in caplog.text and str(path) in caplog.text


# ------------------------------------------------------------- fallback
def _truncate(p: Path) -> None:
    os.truncate(p, p.stat().st_size // 2)


def _flip_model_bytes(p: Path) -> None:
    start, _ = tensor_span(p, "shared.weight")
    overwrite(p, start + 100, bytes(b ^ 0xFF for b in p.read_bytes()[start + 100:start + 164]))


def _bad_header(p: Path) -> None:
    overwrite(p, 8, b"{garbage")


def _header_length_too_big(p: Path) -> None:
    overwrite(p, 0, struct.pack("<Q", 1 << 40))


@pytest.mark.parametrize("damage", [_truncate, _flip_model_bytes, _bad_header, _header_length_too_big])
def test_durable_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, one_torch_thread, damage):
    cfg, coord, newest = two_rounds(tmp_path / "srv")
    damage(newest)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = build_coordinator(cfg)
    assert again.round_no == 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and newest.name in r.getMessage()]
    assert len(warnings) == 1 and "set aside" in warnings[0].getMessage(), caplog.text
    assert newest.with_name(newest.name + ".damaged").exists()
    assert json.loads((cfg.out / "checkpoints" / "latest").read_text())["round"] == 1
    # Round 2 never committed now: its records and summary are gone, round 1's are as committed.
    assert RoundLog(cfg.out / "rounds.jsonl").read() == records_of(1)
    assert [s["round"] for s in again.records.summaries] == [1]
    # A second restart is quiet and the run continues from round 1.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert build_coordinator(cfg).round_no == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(LOGGER)], caplog.text


def _run_server(cfg, extra=()):
    toml = cfg.out.parent / "server.toml"
    toml.write_text(f'preset = "tiny"\nrounds = 5\neval_size = 0\ninsecure = true\nlisten = "127.0.0.1:0"\n'
                    f'strategy = "{cfg.strategy}"\n')
    return subprocess.run([sys.executable, "-m", "fedserver", "run", "--config", str(toml), "--out", str(cfg.out),
                           *extra], capture_output=True, text=True, timeout=300)


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("fedserver: error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def test_durable_no_intact_checkpoint_is_one_error_line_and_no_restart(tmp_path, one_torch_thread):
    cfg, coord, newest = two_rounds(tmp_path / "srv")
    for p in (cfg.out / "checkpoints").glob("round-*.safetensors"):
        _flip_model_bytes(p)
    r = _run_server(cfg)
    line = _one_error_line(r)
    assert r.returncode == 2 and "no intact checkpoint" in line and "round-000002" in line, r.stderr
    # Nothing was renamed when nothing could be used: the operator decides.
    assert sorted(p.name for p in (cfg.out / "checkpoints").glob("round-*")) == [
        "round-000001.safetensors", "round-000002.safetensors"]


def test_durable_run_of_other_settings_is_one_error_line(tmp_path, one_torch_thread):
    cfg, coord, newest = two_rounds(tmp_path / "srv")
    r = _run_server(cfg, ["--lora-rank", "2"])
    line = _one_error_line(r)
    assert r.returncode == 2 and "written with full fine-tuning, this server is set for LoRA r2" in line, r.stderr
    assert newest.exists(), "a mismatched run is not damage: nothing is set aside"


def test_durable_systemd_does_not_restart_an_unusable_config_or_state():
    unit = (Path(__file__).resolve().parent.parent / "systemd" / "fedserver.service").read_text()
    assert "RestartPreventExitStatus=2" in unit.splitlines()


# ------------------------------------------------------------ summary.json
@pytest.mark.parametrize("garbage", [b"\x00\x01garbage", b"[1, 2]", b'{"rounds": 3}', b"\xff\xfe"])
def test_durable_unreadable_summary_is_set_aside_and_rebuilt(tmp_path, caplog, one_torch_thread, garbage):
    cfg, coord, _ = two_rounds(tmp_path / "srv")
    summary = cfg.out / "summary.json"
    summary.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = build_coordinator(cfg)
    assert again.round_no == 2 and [s["round"] for s in again.records.summaries] == [2]
    assert str(summary) in caplog.text and "set aside" in caplog.text
    assert (cfg.out / "summary.json.damaged").read_bytes() == garbage
    assert [s["round"] for s in json.loads(summary.read_text())["rounds"]] == [2]


def test_durable_summary_agrees_with_the_checkpoint(tmp_path, caplog, one_torch_thread):
    cfg, coord, _ = two_rounds(tmp_path / "srv")
    path = cfg.out / "summary.json"
    data = json.loads(path.read_text())
    committed = data["rounds"][-1]
    # Round 2's summary altered, round 1's repeated and a round 3 that never committed.
    data["rounds"] = [data["rounds"][0], data["rounds"][0], {**committed, "participants": ["x"]},
                      {"round": 3, "participants": []}]
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = build_coordinator(cfg)
    assert again.records.summaries == [data["rounds"][0], committed]
    assert json.loads(path.read_text())["rounds"] == again.records.summaries
    assert "summary" in caplog.text


# ------------------------------------------------------------ round log
def _partial(log: Path) -> None:  # the issue: a kill between two appends left 1 of the round's 3 records
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-2]))


def _repeated(log: Path) -> None:  # an append repeated after a restart
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines + lines[-3:]))


def _torn_committed(log: Path) -> None:  # the last committed record half written
    data = log.read_bytes()
    log.write_bytes(data[:-20])


def _corrupt_middle(log: Path) -> None:  # a damaged line among good ones
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = "\x00garbage\n"
    log.write_text("".join(lines))


def _missing_round_number(log: Path) -> None:
    with open(log, "a") as f:
        f.write('{"round": "two", "client": "z"}\n')


@pytest.mark.parametrize("damage", [_partial, _repeated, _torn_committed, _corrupt_middle, _missing_round_number])
def test_durable_round_log_matches_the_committed_checkpoint(tmp_path, caplog, one_torch_thread, damage):
    cfg, coord, _ = two_rounds(tmp_path / "srv")
    log = cfg.out / "rounds.jsonl"
    damage(log)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_coordinator(cfg)
    got = RoundLog(log).read()
    committed = records_of(2)
    assert [r for r in got if r["round"] == 2] == committed, "the committed round's records as its checkpoint"
    assert len(got) == len({json.dumps(r, sort_keys=True) for r in got}), "no record twice"
    assert f"round log {log}" in caplog.text
    if damage is _corrupt_middle:
        assert (cfg.out / "rounds.jsonl.damaged").exists(), "the damaged file is kept for the operator"
    else:
        assert [r for r in got if r["round"] == 1] == records_of(1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build_coordinator(cfg)
    assert RoundLog(log).read() == got and "round log" not in caplog.text, "reconciliation is idempotent"


def test_durable_round_log_keeps_failed_attempts_and_drops_uncommitted_rounds(tmp_path, one_torch_thread):
    """A round that needed a second attempt keeps the first attempt's records; a round after the checkpoint goes."""
    cfg, coord = adam_coordinator(tmp_path / "srv")
    commit(coord, 1)
    failed = records_of(2, clients=("a",), attempt=1)
    for r in failed:
        coord.records.log.append(r)
    commit(coord, 2, records_of(2, attempt=2))
    healthy = RoundLog(cfg.out / "rounds.jsonl").read()
    coord.records.log.append(records_of(3)[0])
    build_coordinator(cfg)
    assert RoundLog(cfg.out / "rounds.jsonl").read() == healthy


# ------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB file system (tmpfs; needs root), so writes meet a real ENOSPC."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> None:
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_durable_full_disk_keeps_the_previous_checkpoint_and_says_what_it_needed(small_disk):
    cd = CheckpointDir(small_disk / "checkpoints")
    cd.save(1, {"w": torch.ones(1000)}, {"round": "1"})
    _fill(small_disk, 64 << 10)
    with pytest.raises(OSError) as err:
        cd.save(2, {"w": torch.ones(100_000)}, {"round": "2"})  # 400 kB
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert msg.startswith("no space left to write ") and "round-000002.safetensors" in msg, msg
    assert re.search(r"it needs 39\d\.\d KiB, 6\d\.\d KiB free", msg), msg
    assert "\n" not in msg
    assert sorted(p.name for p in cd.root.iterdir()) == ["latest", "round-000001.safetensors"], "no temp file left"
    r, state, meta = cd.load_latest()
    assert r == 1 and torch.equal(state["w"], torch.ones(1000))


def test_durable_full_disk_on_the_round_log_and_summary(small_disk):
    log = RoundLog(small_disk / "rounds.jsonl")
    log.append({"round": 1, "client": "a"})
    storage.write_json_atomic(small_disk / "summary.json", {"rounds": [1]})
    _fill(small_disk, 0)
    big = {"round": 2, "client": "b", "pad": "x" * 200_000}
    with pytest.raises(OSError, match=r"no space left to write .*rounds\.jsonl: it needs"):
        log.append(big)
    assert RoundLog(log.path).read() == [{"round": 1, "client": "a"}], "no torn record left behind"
    with pytest.raises(OSError, match=r"no space left to write .*summary\.json: it needs"):
        storage.write_json_atomic(small_disk / "summary.json", {"rounds": [1, 2], "pad": "x" * 200_000})
    assert json.loads((small_disk / "summary.json").read_text()) == {"rounds": [1]}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "rounds.jsonl", "summary.json"]
    # Space freed: the log carries on where it was.
    (small_disk / "filler").unlink()
    log.append({"round": 2, "client": "b"})
    assert [r["round"] for r in RoundLog(log.path).read()] == [1, 2]


def test_durable_full_disk_is_said_even_where_the_kernel_reports_it_late(tmp_path, monkeypatch):
    """Some file systems report ENOSPC only at fsync: the same message, the same clean-up."""
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"v": "1"})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "fsync", full)
    with pytest.raises(OSError, match=r"no space left to write .*c\.safetensors: it needs"):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"v": "2"})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"v": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_durable_load_errors_are_checkpoint_errors(tmp_path):
    """Whatever the damage, load_checkpoint says CheckpointError (never a safetensors or JSON exception)."""
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.arange(64, dtype=torch.float32)}, {"round": "1"})
    raw = path.read_bytes()
    for bad in (raw[:5], raw[:-1], raw + b"x", b"", raw[:8] + b"\xff" * (len(raw) - 8)):
        path.write_bytes(bad)
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            load_checkpoint(path)

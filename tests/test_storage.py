"""Durable server state: checkpoints, round log, checkpoint directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedserver import storage
from fedserver.storage import (
    CheckpointDir,
    CheckpointError,
    RoundLog,
    load_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from fedserver.strategy import FedAdam


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=g)
    return {
        "shared.weight": shared,
        "encoder.embed_tokens.weight": shared,  # tied, as in T5
        "decoder.embed_tokens.weight": shared,
        "lm_head.weight": torch.randn(6, 4, generator=g),
        "norm": torch.randn(4, generator=g).bfloat16(),
        "transposed": torch.randn(3, 5, generator=g).t(),  # not contiguous
        "positions": torch.arange(7, dtype=torch.int64),
        "flag": torch.tensor(True),
        "scalar": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.zeros(0, 3),
    }


def test_round_trip_with_ties(tmp_path: Path) -> None:
    state = sample_state()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, state, {"round": "4", "model": "tiny"})

    loaded, meta = load_checkpoint(path)
    assert meta == {"round": "4", "model": "tiny"}
    assert list(loaded) == list(state)  # order preserved
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    # The tie is restored: one storage for the three names.
    ptr = loaded["shared.weight"].data_ptr()
    assert loaded["encoder.embed_tokens.weight"].data_ptr() == ptr
    assert loaded["decoder.embed_tokens.weight"].data_ptr() == ptr
    assert loaded["lm_head.weight"].data_ptr() != ptr

    # A standard safetensors file, holding the tied tensor once.
    plain = load_file(str(path))
    assert "encoder.embed_tokens.weight" not in plain and "shared.weight" in plain
    # No temp files left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_deduplicated_input_and_overlapping_views(tmp_path: Path) -> None:
    base = torch.arange(10, dtype=torch.float32)
    # Two different views of one storage cannot be one tie: stored as copies.
    state = {"head": base[:4], "tail": base[4:], "dup": base.clone()}
    save_checkpoint(tmp_path / "c.safetensors", state, {})
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    assert meta == {}
    for k in state:
        assert torch.equal(loaded[k], state[k])
    assert loaded["head"].data_ptr() != loaded["tail"].data_ptr()


def test_failed_save_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"v": "1"})

    def boom(f, t):  # type: ignore[no-untyped-def]
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(storage, "_write_tensor", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"v": "2"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"v": "1"} and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x", {"w": torch.ones(1)}, {"fedtune.aliases": "{}"})
    with pytest.raises(TypeError, match="str"):
        save_checkpoint(tmp_path / "x", {"w": torch.ones(1)}, {"round": 3})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)


def test_optimizer_state_survives_checkpoint(tmp_path: Path) -> None:
    s = FedAdam()
    x = s.apply({"w": torch.ones(3)}, {"w": torch.tensor([0.1, -0.2, 0.3])})
    save_checkpoint(tmp_path / "opt.safetensors", s.state_dict(), {})
    restored = FedAdam()
    restored.load_state_dict(load_checkpoint(tmp_path / "opt.safetensors")[0])
    d = {"w": torch.tensor([0.05, 0.05, -0.1])}
    assert torch.equal(s.apply(x, d)["w"], restored.apply(x, d)["w"])


def test_write_json_atomic(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "summary.json"
    write_json_atomic(p, {"rounds": 3, "g": [0.06]})
    write_json_atomic(p, {"rounds": 4})
    assert json.loads(p.read_text()) == {"rounds": 4}
    assert [q.name for q in p.parent.iterdir()] == ["summary.json"]


def test_round_log_torn_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = RoundLog(tmp_path / "rounds.jsonl")
    assert log.read() == [] and log.last() is None
    for r in range(3):
        log.append({"round": r, "loss": 1.0 / (r + 1)})
    with open(log.path, "ab") as f:
        f.write(b'{"round": 3, "lo')  # a crash mid-write

    with caplog.at_level(logging.WARNING, logger="fedserver.storage"):
        records = RoundLog(log.path).read()
    assert [r["round"] for r in records] == [0, 1, 2]
    assert "torn last line" in caplog.text

    # The next writer cuts the fragment off instead of gluing onto it.
    again = RoundLog(log.path)
    again.append({"round": 3, "loss": 0.2})
    again.append({"event": "summary"})
    assert [r.get("round") for r in again.read()] == [0, 1, 2, 3, None]
    assert again.last() == {"round": 3, "loss": 0.2}
    assert again.last("event") == {"event": "summary"}


def test_round_log_zero_filled_tail_and_middle_corruption(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    path.write_bytes(b'{"round": 0}\n\x00\x00\x00\n')  # file system zero-fill after a crash
    assert RoundLog(path).read() == [{"round": 0}]
    log = RoundLog(path)
    log.append({"round": 1})
    assert log.read() == [{"round": 0}, {"round": 1}]

    path.write_bytes(b'{"round": 0}\ngarbage\n{"round": 2}\n')
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        RoundLog(path).read()


def test_checkpoint_dir_prunes_and_points_to_latest(tmp_path: Path) -> None:
    cd = CheckpointDir(tmp_path / "ckpt", keep=3)
    assert cd.latest() is None and cd.load_latest() is None
    for r in range(1, 6):
        path = cd.save(r, {"w": torch.full((2,), float(r))}, {"round": str(r)})
        assert path.name == f"round-{r:06d}.safetensors"
    names = sorted(p.name for p in cd.root.iterdir())
    assert names == ["latest", "round-000003.safetensors", "round-000004.safetensors", "round-000005.safetensors"]
    assert json.loads((cd.root / "latest").read_text()) == {"round": 5, "file": "round-000005.safetensors"}
    assert cd.latest() == (5, cd.root / "round-000005.safetensors")
    found = cd.load_latest()
    assert found is not None
    r, state, meta = found
    assert r == 5 and meta == {"round": "5"} and torch.equal(state["w"], torch.full((2,), 5.0))

    cd.save(5, {"w": torch.zeros(2)}, {})  # re-saving the latest round is fine
    with pytest.raises(ValueError, match="already has round 5"):
        cd.save(4, {"w": torch.zeros(2)}, {})

    # A restarted server with a smaller keep prunes on its next save.
    cd1 = CheckpointDir(cd.root, keep=1)
    cd1.save(6, {"w": torch.zeros(2)}, {})
    assert sorted(p.name for p in cd.root.iterdir()) == ["latest", "round-000006.safetensors"]


def test_checkpoint_dir_recovers_without_pointer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ckpt"
    cd = CheckpointDir(root)
    cd.save(1, {"w": torch.ones(1)}, {})
    cd.save(2, {"w": torch.ones(1)}, {})
    (root / "latest").write_text('{"round": 9, "file": "round-000009.safetensors"}')
    with caplog.at_level(logging.WARNING, logger="fedserver.storage"):
        assert cd.latest() == (2, root / "round-000002.safetensors")
    assert "missing file" in caplog.text
    (root / "latest").unlink()
    assert cd.latest() == (2, root / "round-000002.safetensors")

    # A temp file left by a crash mid-save is removed on startup.
    (root / ".round-000003.safetensors.abc.tmp").write_bytes(b"partial")
    CheckpointDir(root)
    assert not list(root.glob("*.tmp"))

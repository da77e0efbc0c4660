"""A device that holds the weights a run starts from offers their digest at Join and skips the first download."""
from __future__ import annotations

import pytest

from fedcore.methods import FullFineTuning
from fedcore.models import build_model, load_pretrained, load_tokenizer
from fedcore.wire import digest
from fedserver.model import GlobalModel

from fedhelpers import start_daemon, start_server, stop, tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def saved(path, seed: int):
    build_model("tiny", seed=seed).save_pretrained(path)
    load_tokenizer(None).save_pretrained(path)
    return path


def test_the_digest_of_a_saved_directory_is_the_servers_version_of_its_weights(tmp_path):
    d = saved(tmp_path / "w", seed=3)
    server_model = GlobalModel(build_model("tiny", weights_dir=d).state_dict(), FullFineTuning(), 0)
    assert digest(load_pretrained(d).state_dict()) == server_model.version == server_model.initial_version
    assert digest(build_model("tiny", seed=4).state_dict()) != server_model.version
    half = {k: v.half() for k, v in load_pretrained(d).state_dict().items()}
    assert digest(half) != server_model.version, "another dtype is another model"


def test_a_device_holding_the_base_downloads_nothing_and_one_holding_other_weights_downloads(tmp_path):
    same, other = saved(tmp_path / "same", seed=3), saved(tmp_path / "other", seed=5)
    srv = start_server(tiny_server_config(tmp_path / "run", insecure=True, weights_dir=same, rounds=1,
                                          devices_per_round=2, min_devices=2, eval_size=0))
    logs = {d: tmp_path / f"{d}.log" for d in ("holder", "stranger")}
    procs = [start_daemon(srv.address, "holder", logs["holder"], "--weights-dir", str(same)),
             start_daemon(srv.address, "stranger", logs["stranger"], "--weights-dir", str(other))]
    try:
        assert srv.wait(180), "the round did not complete"
        rec = {r["client"]: r for r in srv.coord.last_records}
        assert rec["holder"]["bytes_down"] == 0 and rec["holder"]["download_cached"]
        assert rec["stranger"]["bytes_down"] > 0 and not rec["stranger"]["download_cached"]
        text = logs["stranger"].read_text()
        mine, run = digest(load_pretrained(other).state_dict()), srv.coord.model.initial_version
        assert "are not this run's initial model" in text and mine[:19] in text and run[:19] in text
    finally:
        stop(procs)
        srv.close()

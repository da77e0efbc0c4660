"""Trust in what a device claims: an update's FedAvg weight is bounded by what the server knows.

The server knows the samples a device registered at Join (as of sampling)
and the work its task asked for; an upload's num_samples above that is cut,
and the round log says so. Honest devices (fedclient.trainer's count) are
never cut.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from fedcore.batching import EncodedExample
from fedcore.wire import StateEncoder, unique_tensors
from fedclient.trainer import TrainSettings, _batches
from fedserver.app import build_coordinator
from fedcore.wire import clone_tied
from fedserver.rounds import MAX_NUM_SAMPLES, Coordinator, RoundError, UpdateRefused
from fedserver.storage import RoundLog
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EMB = "shared.weight"
HUGE = 1 << 40


class Round:
    """A Coordinator running its round loop in a thread; devices talk to it directly, without gRPC."""

    def __init__(self, out: Path, **over) -> None:
        cfg = tiny_server_config(out, insecure=True, eval_size=0, round_deadline_s=600, upload_encoding="fp32",
                                 **over)
        self.coord: Coordinator = build_coordinator(cfg)
        self.base = clone_tied(self.coord.state)
        self.sessions: dict[str, str] = {}
        self.thread = threading.Thread(target=self.coord.run, daemon=True)
        self.thread.start()

    def join(self, devices: dict[str, int]) -> dict[str, pb.Task]:
        """Join every device (registered samples), then wait for each one's task."""
        for d, n in devices.items():
            self.sessions[d] = self.coord.join(d, n, {}).session_id
        return {d: self.task(d) for d in devices}

    def task(self, device: str) -> pb.Task:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            t = self.coord.next_task(device, self.sessions[device], 1.0)
            if t.kind == pb.Task.TRAIN:
                return t
        raise AssertionError(f"{device} got no task")

    def update(self, changes: dict[str, float] | None = None, seed: int = 0, noise: float = 1e-3
               ) -> dict[str, torch.Tensor]:
        """The global model with `changes` added to canonical tensors, plus small noise; ties kept."""
        state = clone_tied(self.base)
        g = torch.Generator().manual_seed(seed)
        for e in unique_tensors(state):
            if e.tensor.is_floating_point():
                e.tensor.add_(changes.get(e.name, 0.0) if changes else 0.0)
                e.tensor.add_(noise * torch.randn(e.tensor.shape, generator=g))
        return state

    def header(self, device: str, task: pb.Task, claim: int, enc: StateEncoder) -> pb.UploadHeader:
        h = pb.UploadHeader(device_id=device, session_id=self.sessions[device], task_id=task.task_id,
                            round=task.round, base_version=task.model_version, num_samples=claim)
        h.manifest.CopyFrom(enc.manifest)
        return h

    def send(self, device: str, task: pb.Task, state: dict[str, torch.Tensor], claim: int,
             train_loss: float = 1.0) -> None:
        enc = StateEncoder(state, self.coord.cfg.upload_spec())
        sess = self.coord.open_upload(self.header(device, task, claim, enc))
        for chunk in enc.chunks(None):
            sess.charge(chunk)
            sess.receiver.accept(chunk)
        self.coord.finish_upload(sess)
        self.report(device, task, train_loss)

    def report(self, device: str, task: pb.Task, train_loss: float = 1.0) -> None:
        self.coord.report_metrics(device, self.sessions[device], {
            "round": task.round, "task_id": task.task_id, "t_down_s": 0.1, "t_up_s": 0.1, "t_wait_s": 0.0,
            "t_comp_s": 0.5, "bytes_down": 1, "bytes_up": 1, "tokens": 10, "train_loss": train_loss,
            "step_times": {}, "extra": {}})

    def finish(self) -> dict[str, dict]:
        self.thread.join(120)
        assert not self.thread.is_alive(), "the round did not complete"
        return {r["client"]: r for r in RoundLog(self.coord.out / "rounds.jsonl").read()}

    def close(self) -> None:
        self.coord.stop()
        self.thread.join(10)


@pytest.fixture
def make_round(tmp_path):
    made: list[Round] = []

    def make(**over) -> Round:
        r = Round(tmp_path / f"srv{len(made)}", **over)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_claims_weight_of_a_lying_device_is_cut_to_its_task(make_round, caplog):
    """The issue's attack: 10 samples registered, 2 steps of batch 8, num_samples = 2^40, embedding + 1."""
    rnd = make_round(rounds=1, devices_per_round=2, min_updates=2, local_steps=2, batch_size=8)
    tasks = rnd.join({"attacker": 10, "honest": 24})
    shift = 1.0
    attack, honest = rnd.update({EMB: shift}, noise=0.0), rnd.update(seed=2)
    with caplog.at_level(logging.WARNING, logger="fedserver.rounds"):
        rnd.send("attacker", tasks["attacker"], attack, HUGE, train_loss=9.0)
        rnd.send("honest", tasks["honest"], honest, 16, train_loss=1.0)
        recs = rnd.finish()
    att, hon = recs["attacker"], recs["honest"]
    assert att["num_samples"] == 16, "the weight is the task's 2 x 8 samples, not the claim"
    assert att["num_samples_claimed"] == HUGE
    assert "2 steps x batch 8 of 10 registered samples" in att["weight_cut"] and str(HUGE) in att["weight_cut"]
    assert (hon["num_samples"], hon["num_samples_claimed"]) == (16, 16) and "weight_cut" not in hon
    assert any(f"not the {HUGE} it claims" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # The new model is the FedAvg of the bounded weights: the attack moves it by half the shift, not all of it.
    base, new = rnd.base[EMB], rnd.coord.state[EMB]
    torch.testing.assert_close(new, base + (16 * (attack[EMB] - base) + 16 * (honest[EMB] - base)) / 32,
                               rtol=0, atol=1e-6)
    honest_part = 16 / 32 * float((honest[EMB] - base).abs().max())
    assert float((new - base).abs().max()) <= 16 / 32 * shift + honest_part + 1e-6
    # The summary weights train_loss by the same bounded weights.
    assert rnd.coord.records.summaries[-1]["train_loss"] == pytest.approx((9.0 * 16 + 1.0 * 16) / 32)


@pytest.mark.parametrize("policy", [
    dict(local_steps=0, local_epochs=2),  # epochs: 2 x the 10 registered samples
    dict(round_policy="samples", local_steps=1, local_samples=20),  # 20 samples, batches of up to 8: at most 27
])
def test_claims_epochs_and_samples_tasks_bound_the_weight_too(make_round, policy):
    bound = 20 if "local_epochs" in policy else 27
    rnd = make_round(rounds=1, devices_per_round=2, min_updates=2, batch_size=8, **policy)
    tasks = rnd.join({"a": 10, "b": 10})
    rnd.send("a", tasks["a"], rnd.update(seed=1), bound)
    rnd.send("b", tasks["b"], rnd.update(seed=2), bound + 1)
    recs = rnd.finish()
    assert recs["b"]["num_samples"] == bound and recs["b"]["num_samples_claimed"] == bound + 1
    assert recs["a"]["num_samples"] == bound and "weight_cut" not in recs["a"]
    assert f"at most {bound}" in recs["b"]["weight_cut"]


def test_claims_rejoining_with_more_samples_after_sampling_does_not_raise_the_weight(make_round):
    rnd = make_round(rounds=1, devices_per_round=1, local_steps=0, local_epochs=1)
    task = rnd.join({"mallory": 10})["mallory"]
    # Sampled with 10; a new Join (a new session) now says the device holds the maximum.
    rnd.sessions["mallory"] = rnd.coord.join("mallory", MAX_NUM_SAMPLES, {}).session_id
    rnd.send("mallory", task, rnd.update({EMB: 1.0}), MAX_NUM_SAMPLES)
    rec = rnd.finish()["mallory"]
    assert rec["num_samples"] == 10 and rec["num_samples_claimed"] == MAX_NUM_SAMPLES
    assert "1 epoch of 10 registered samples" in rec["weight_cut"]


def test_claims_join_beyond_the_limit_is_refused(make_round):
    rnd = make_round(rounds=1, devices_per_round=1)
    with pytest.raises(RoundError) as e:
        rnd.coord.join("big", HUGE, {})
    assert e.value.code == "invalid" and str(MAX_NUM_SAMPLES) in str(e.value)
    assert MAX_NUM_SAMPLES <= 1 << 24, "a Join claim is an epochs task's weight: keep its limit plausible"


def test_claims_zero_and_negative_are_refused_and_the_task_stays_open(make_round):
    rnd = make_round(rounds=1, devices_per_round=1)
    task = rnd.join({"d": 10})["d"]
    state = rnd.update()
    enc = StateEncoder(state, rnd.coord.cfg.upload_spec())
    for claim in (0, -3):
        with pytest.raises(RoundError) as e:
            rnd.coord.open_upload(rnd.header("d", task, claim, enc))
        assert e.value.code == "invalid" and "must be positive" in str(e.value)
    assert rnd.coord.current.assignments["d"].status == "sampled"
    rnd.send("d", task, state, 8)
    assert rnd.finish()["d"]["status"] == "aggregated"


def test_claims_device_that_registered_no_samples_is_refused_and_the_round_goes_on(make_round):
    rnd = make_round(rounds=1, devices_per_round=2, min_updates=1)
    tasks = rnd.join({"empty": 0, "honest": 10})
    with pytest.raises(UpdateRefused) as e:
        rnd.send("empty", tasks["empty"], rnd.update({EMB: 1.0}), HUGE)
    assert e.value.code == "invalid"
    rnd.send("honest", tasks["honest"], rnd.update(), 8)
    recs = rnd.finish()
    assert recs["empty"]["status"] == "refused" and "registered 0 samples" in recs["empty"]["reason"]
    assert recs["honest"]["status"] == "aggregated"
    assert float((rnd.coord.state[EMB] - rnd.base[EMB]).abs().max()) < 0.1, "the refused shift is not in the model"


def test_claims_resumed_upload_cannot_change_its_claim(make_round):
    rnd = make_round(rounds=1, devices_per_round=1)
    task = rnd.join({"d": 10})["d"]
    state = rnd.update()
    enc = StateEncoder(state, rnd.coord.cfg.upload_spec())
    chunks = list(enc.chunks(None))
    sess = rnd.coord.open_upload(rnd.header("d", task, 8, enc))
    for c in chunks[:3]:
        sess.charge(c)
        sess.receiver.accept(c)
    resume = rnd.header("d", task, HUGE, enc)
    resume.start.CopyFrom(sess.receiver.next_position())
    with pytest.raises(RoundError) as e:
        rnd.coord.open_upload(resume)
    assert e.value.code == "invalid" and "resumed upload claims" in str(e.value)
    resume.num_samples = 8
    assert rnd.coord.open_upload(resume) is sess
    for c in chunks[3:]:
        sess.charge(c)
        sess.receiver.accept(c)
    rnd.coord.finish_upload(sess)
    rnd.report("d", task)
    rec = rnd.finish()["d"]
    assert (rec["num_samples"], rec["num_samples_claimed"], rec["status"]) == (8, 8, "aggregated")


def test_claims_stream_replaced_by_a_fresh_start_cannot_finish(make_round):
    """A fresh start replaces the staged file, header and weight; the older stream must not settle the task."""
    rnd = make_round(rounds=1, devices_per_round=1)
    task = rnd.join({"d": 10})["d"]
    first, second = rnd.update({EMB: 1.0}, seed=1), rnd.update(seed=2)
    enc1, enc2 = (StateEncoder(s, rnd.coord.cfg.upload_spec()) for s in (first, second))
    old = rnd.coord.open_upload(rnd.header("d", task, 8, enc1))
    *head, last = enc1.chunks(None)
    for c in head:
        old.charge(c)
        old.receiver.accept(c)
    new = rnd.coord.open_upload(rnd.header("d", task, 8, enc2))  # from the beginning, same task
    assert new is not old
    old.receiver.accept(last)  # the older stream goes on writing and reaches its end
    with pytest.raises(RoundError) as e:
        rnd.coord.finish_upload(old)
    assert e.value.code == "aborted" and "replaced" in str(e.value)
    for c in enc2.chunks(None):
        new.charge(c)
        new.receiver.accept(c)
    rnd.coord.finish_upload(new)
    rnd.report("d", task)
    assert rnd.finish()["d"]["status"] == "aggregated"
    # The model is the second upload's (one device: FedAvg is that update), not the first's shifted one.
    torch.testing.assert_close(rnd.coord.state[EMB], second[EMB], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_examples,batch,device_batch,task", [
    (24, 8, 8, dict(local_steps=2)), (10, 8, 8, dict(local_steps=2)), (5, 8, 8, dict(local_steps=3)),
    (10, 8, 3, dict(local_steps=4)), (10, 8, 8, dict(local_epochs=1)), (7, 4, 4, dict(local_epochs=3)),
    (10, 8, 8, dict(local_samples=20)), (10, 8, 3, dict(local_samples=20)), (5, 8, 8, dict(local_samples=17)),
    (16, 16, 3, dict(local_samples=16)), (3, 8, 2, dict(local_samples=9)),
])
def test_claims_honest_counts_are_never_cut(n_examples, batch, device_batch, task):
    """What fedclient.trainer counts as samples for a task (the daemon's steps, a device-capped batch) fits the bound."""
    from fedserver.intake import weight_bound
    from fedserver.roundstate import Assignment

    steps = task.get("local_steps", 0)
    if task.get("local_samples"):
        steps = -(-task["local_samples"] // device_batch)  # as fedclient.daemon turns samples into steps
    settings = TrainSettings(local_epochs=task.get("local_epochs", 1), local_steps=steps, batch_size=device_batch,
                             seed=3)
    encoded = [EncodedExample([5, 1], [6, 1]) for _ in range(n_examples)]
    counted, done = 0, 0
    for b in _batches(encoded, settings, pad_id=0):  # the trainer adds each step's n_examples
        if steps and done == steps:
            break
        counted, done = counted + b.n_examples, done + 1
    a = Assignment("d", "t", registered_samples=n_examples, local_steps=task.get("local_steps", 0),
                   local_samples=task.get("local_samples", 0))
    bound, _ = weight_bound(a, batch, task.get("local_epochs", 1))
    assert 0 < counted <= bound


@pytest.mark.slow
def test_claims_attack_against_a_live_server_is_bounded(tmp_path):
    """End to end over mutual TLS: a real honest daemon and the attacker of bench.attack_claims."""
    from bench.attack_claims import run_attack

    r = run_attack(tmp_path, shift=1.0, claim=HUGE)
    assert r.claim == HUGE and r.weight_used == 16 and "at most 16" in r.weight_cut
    assert r.honest_weight == r.honest_claim == 16, "the honest daemon's count is never cut"
    assert r.bound == pytest.approx(0.5)
    assert r.max_change <= r.bound + r.honest_part + 1e-5
    # Without the bound the next global embedding would have been the attacker's upload.
    assert r.unbounded_change == pytest.approx(1.0, abs=1e-3) and r.unbounded_from_attacker < 1e-6

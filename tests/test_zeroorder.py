"""Zero-order methods (MeZO, FedKSeed, FedSPZO): directions pinned, updates validated, replay bit-exact."""
from __future__ import annotations

import math
import threading
import uuid

import grpc
import pytest
import torch

from fedcore import directions
from fedcore.batching import collate, encode_examples
from fedcore.clock import FakeClock
from fedcore.config import ConfigError
from fedcore.data import synthetic_corpus
from fedcore.methods import FedKSeed, FedSPZO, MeZO, UpdateInvalid, from_task
from fedcore.methods.zeroorder import (FIRST, SECOND, WHOLE, T5_SECOND_BLOCK, SeedPairs, ZeroOrderSpec, perturbed,
                                       replay, t5_loss)
from fedcore.models import build_model, load_tokenizer
from fedcore.wire import WireError, digest
from fedserver.downloads import DownloadPlanner
from fedserver.intake import UploadIntake
from fedcore.wire import clone_tied
from fedserver.model import GlobalModel
from fedserver.roundstate import Assignment, RoundState, UpdateRefused
from fedserver.storage import CheckpointDir
from fedserver.strategy import SeedMean, make_strategy
from fedcore.wire import TransferSpec
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = {"mezo": MeZO(ZeroOrderSpec(learning_rate=1e-3, eps=1e-3, weight_decay=0.1)), "fedkseed": FedKSeed(ZeroOrderSpec(learning_rate=1e-3, eps=1e-3, pool_size=64,
                                                                  pool_seed=7)),
           "fedspzo": FedSPZO(ZeroOrderSpec(learning_rate=1e-3, eps=1e-3, perturbations=1, second_perturbations=2,
                                            second_block=T5_SECOND_BLOCK))}


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return build_model("tiny", seed=0).state_dict()


# ---------------------------------------------------------------- directions
def test_directions_are_pinned_by_checksum():
    # The bits every server and device must produce: a change here breaks replay between versions of fedtune.
    assert directions.SCHEME == "rademacher-lowbias32-v1"
    assert directions.checksum(0x0123456789ABCDEF, "encoder.block.0.layer.0.SelfAttention.q.weight", 4099) == (
        "3b661580a7c6f20ccd6961f34787496817eef2f5ecbf2e184870c4747ca08341")
    assert directions.checksum(0, "shared.weight", 4097) == (
        "10acdb8ff18d513fa19e9be24885972fd41493d0ffc5f1fc231a60113d07a245")


def reference_direction(seed: int, name: str, n: int) -> list[float]:
    """The scheme of fedcore.directions in plain Python integers, written from its docstring."""
    import zlib

    def mix(x: int) -> int:
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    k1 = mix(mix(seed & 0xFFFFFFFF) ^ zlib.crc32(name.encode()))
    k2 = mix(mix((seed >> 32) ^ 0x9E3779B9) ^ k1)
    return [1.0 if (mix(mix((i // 32) ^ k1) ^ k2) >> (i % 32)) & 1 else -1.0 for i in range(n)]


def test_directions_follow_the_documented_scheme_exactly():
    for seed, name in ((0, "shared.weight"), ((1 << 64) - 1, "lm_head.weight"), (0x0123456789ABCDEF, "x")):
        assert directions.direction(seed, name, 200).tolist() == reference_direction(seed, name, 200)


def test_directions_are_signs_sliceable_and_independent():
    z = directions.direction(5, "w", 1 << 16)
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(float(z.mean())) < 0.02
    assert torch.equal(directions.direction(5, "w", 1000, start=333), z[333:1333]), "a slice is the same stream"
    other = directions.direction(6, "w", 1 << 16)
    assert abs(float((z * other).mean())) < 0.02, "seeds give independent signs"
    assert not torch.equal(directions.direction(5, "v", 64), z[:64]), "names give other signs"
    with pytest.raises(ValueError, match="uint64"):
        directions.direction(-1, "w", 4)


def test_a_step_is_exact_addition_of_plus_or_minus_c():
    t = torch.randn(1000)
    before = t.clone()
    directions.add_direction(t, "w", 9, 0.1)
    c = float(torch.tensor(0.1, dtype=torch.float32))
    z = directions.direction(9, "w", 1000)
    assert torch.equal(t, before + z * c)


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("over, field, why", [
    (dict(method="mezo", strategy="fedadam"), "strategy", "fedavg"),
    (dict(method="fedkseed", upload_encoding="int8"), "upload_encoding", "seed, scalar"),
    (dict(method="fedspzo", download_encoding="int8"), "method", "fp32"),
    (dict(method="mezo", download_payload="delta"), "method", "replay"),
    (dict(method="mezo", lora_rank=4), "lora_rank", "every weight"),
    (dict(method="fedspzo", zo_second_block=""), "method", "second block"),
])
def test_settings_a_zero_order_run_cannot_use_are_refused(tmp_path, over, field, why):
    with pytest.raises(ConfigError, match=why) as e:
        tiny_server_config(tmp_path, insecure=True, **over).validate()
    assert e.value.key == field


def test_the_task_carries_the_method_and_a_device_rebuilds_it():
    for method in METHODS.values():
        tr = pb.TrainingSettings(learning_rate=method.spec.learning_rate)
        method.to_task(tr)
        assert from_task(tr) == method
    tr = pb.TrainingSettings(learning_rate=1e-3)
    METHODS["mezo"].to_task(tr)
    tr.zero_order.directions = "gaussian-v0"
    with pytest.raises(ValueError, match="directions"):
        from_task(tr)


# ---------------------------------------------------------------- the device's step
def tiny_batch():
    tok = load_tokenizer(None)
    examples = synthetic_corpus(4, seed=1)
    return collate(encode_examples(tok, examples, 64, 16), tok.pad_token_id or 0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_local_steps_move_the_model_as_the_uploaded_pairs_say(base_state, name):
    method = METHODS[name]
    model = build_model("tiny", seed=0)
    model.load_state_dict(base_state)
    trainee = method.bind(model)
    est = trainee.start(1234)
    params = perturbed(model)
    batch = tiny_batch()
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            loss, cost = est.step(model, params, batch, lambda: None)
    assert math.isfinite(loss) and cost.forward_s > 0 and cost.first_forwards > 0
    tensors, _ = trainee.update_state()
    pairs = SeedPairs.from_tensors(tensors)
    assert pairs.steps == 3
    method.check_pairs(pairs, max_steps=3)
    # The server's view of this one device: its pairs, folded with weight 1, are the step it replays.
    mean = SeedMean()
    mean.add({(b, s): v for s, v, b in zip(pairs.seeds, pairs.values, pairs.blocks)}, 1.0, method.decay(pairs.steps))
    gm = GlobalModel(base_state, method, delta_keep=1)
    gm.commit(gm.seed_step(mean, 1))
    for k, v in model.state_dict().items():
        # Locally each perturbation's round trip (+eps, -2 eps, +eps) leaves fp32 rounding behind, and the local
        # decay also shrinks the earlier steps a little (the server decays once, then adds the steps).
        torch.testing.assert_close(v, gm.state[k], atol=5e-6, rtol=3e-5)
    if name == "fedspzo":
        assert {FIRST, SECOND} == set(pairs.blocks)
        enc, dec = est.method.spec.perturbations, est.method.spec.second_perturbations
        assert len(pairs.seeds) == 3 * (enc + dec)
    if name == "fedkseed":
        assert all(0 <= s < 64 for s in pairs.seeds) and len(pairs.seeds) <= 3


def test_dropout_is_off_and_the_loss_is_the_models(base_state):
    model = build_model("tiny", seed=0)
    model.load_state_dict(base_state)
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        assert t5_loss(model, batch) == t5_loss(model, batch)


# ---------------------------------------------------------------- validation
def test_updates_no_honest_device_sends_are_refused():
    k = METHODS["fedkseed"]
    ok = SeedPairs([1, 2], [0.5, -0.25], [WHOLE, WHOLE], steps=2)
    k.check_pairs(ok, max_steps=2)
    for pairs, why in (
            (SeedPairs([64], [0.1], [WHOLE], 1), "outside the pool"),
            (SeedPairs([1], [float("nan")], [WHOLE], 1), "NaN"),
            (SeedPairs([1], [float("inf")], [WHOLE], 1), "NaN"),
            (SeedPairs([1, 2, 3], [0.1] * 3, [WHOLE] * 3, 2), "at most 2"),
            (SeedPairs([1], [0.1], [WHOLE], 5), "allows 1 to 2"),
            (SeedPairs([1, 1], [0.1, 0.2], [WHOLE] * 2, 2), "twice"),
            (SeedPairs([1], [0.1, 0.2], [WHOLE], 1), "parallel"),
            (SeedPairs([1], [0.1], [SECOND], 1), "block 2")):
        with pytest.raises(UpdateInvalid, match=why):
            k.check_pairs(pairs, max_steps=2)
    METHODS["fedspzo"].check_pairs(SeedPairs([1, 2], [0.1, 0.2], [FIRST, SECOND], 1), max_steps=1)
    with pytest.raises(UpdateInvalid, match="block 0"):
        METHODS["fedspzo"].check_pairs(SeedPairs([1], [0.1], [WHOLE], 1), max_steps=1)


class SeedIntake:
    """An UploadIntake of a FedKSeed run with one open round, no coordinator, no gRPC."""

    def __init__(self, tmp_path, base_state, **over) -> None:
        self.cfg = tiny_server_config(tmp_path, insecure=True, method="fedkseed", zo_pool_size=64,
                                      learning_rate=1e-3, **over)
        self.model = GlobalModel(base_state, self.cfg.build_method(), delta_keep=1)
        self.lock = threading.Condition()
        self.intake = UploadIntake(self.cfg, self.model, tmp_path, self.lock, FakeClock())
        self.cur = RoundState(1, 1, self.model.version, 0.0, 600.0, {}, self.model.new_mean())

    def send(self, device: str, pairs: SeedPairs, claim: int = 8):
        a = Assignment(device, uuid.uuid4().hex, registered_samples=16, local_steps=2)
        self.cur.assignments[device] = a
        h = pb.UploadHeader(device_id=device, task_id=a.task_id, round=1, num_samples=claim,
                            base_version=self.model.version)
        pairs.to_proto(h.seeds)
        with self.lock:
            return a, self.intake.take_seeds(self.cur, h, 0)


def test_intake_takes_checks_and_folds_seed_updates(tmp_path, base_state):
    t = SeedIntake(tmp_path, base_state, max_update_norm=10.0)
    a1, d1 = t.send("d1", SeedPairs([3, 5], [1.0, -2.0], [0, 0], 2), claim=8)
    a2, _ = t.send("d2", SeedPairs([3], [3.0], [0], 2), claim=1 << 20)
    assert a1.status == a2.status == "aggregated" and d1.startswith("sha256:")
    assert a2.num_samples == 16, "the claim is cut to what 2 steps of 8 allow"
    for device, pairs, why in (("d3", SeedPairs([99], [1.0], [0], 1), "outside the pool"),
                               ("d4", SeedPairs([1], [float("nan")], [0], 1), "NaN"),
                               ("d5", SeedPairs(list(range(40)), [0.1] * 40, [0] * 40, 2), "at most 2"),
                               ("d6", SeedPairs([1], [1e6], [0], 1), "exceeds max_update_norm")):
        with pytest.raises(UpdateRefused, match=why):
            t.send(device, pairs)
        assert t.cur.assignments[device].status == "refused"
    t.intake.fold(t.cur)
    mean = t.cur.mean.mean()
    assert mean == {(0, 3): (8 * 1.0 + 16 * 3.0) / 24, (0, 5): 8 * -2.0 / 24}


def test_a_tensor_upload_is_refused_by_a_seed_run_and_seeds_by_a_tensor_run(tmp_path, base_state):
    t = SeedIntake(tmp_path, base_state)
    a = Assignment("d1", "t1", registered_samples=16, local_steps=2)
    t.cur.assignments["d1"] = a
    from fedserver.roundstate import RoundError
    with pytest.raises(RoundError, match="seed, value"):
        t.intake.open(t.cur, pb.UploadHeader(device_id="d1", task_id="t1", round=1, num_samples=1,
                                             base_version=t.model.version), 0)


# ---------------------------------------------------------------- replay
def run_rounds(model: GlobalModel, first: int, n: int) -> None:
    """n rounds of made-up device values (two devices, some shared seeds)."""
    for r in range(first, first + n):
        mean = model.new_mean()
        g = torch.Generator().manual_seed(r)
        blocks = model.method.blocks_allowed
        for dev in range(2):
            keys = torch.randint(0, 32, (5,), generator=g).tolist()
            vals = torch.randn(5, generator=g).tolist()
            mean.add({(blocks[i % len(blocks)], k): v for i, (k, v) in enumerate(zip(keys, vals))}, 1.0 + dev,
                     model.method.decay(2 + dev))
        model.commit(model.seed_step(mean, r))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_replay_reaches_the_servers_digest_after_missed_rounds_and_a_restart(tmp_path, base_state, name):
    method = METHODS[name]
    model = GlobalModel(base_state, method, delta_keep=1)
    plan = DownloadPlanner(model, TransferSpec("fp32", "none"), "weights")
    held = {0: (model.version, clone_tied(model.state))}
    run_rounds(model, 1, 2)
    held[2] = (model.version, clone_tied(model.state))
    run_rounds(model, 3, 1)
    # The server stops after round 3 and resumes from its checkpoint.
    ckpt = CheckpointDir(tmp_path / "ckpt", keep=2)
    tensors, meta = model.checkpoint(make_strategy("fedavg"))
    ckpt.save(3, tensors, meta)
    resumed = GlobalModel(base_state, method, delta_keep=1)
    latest = ckpt.load_latest(lambda rnd, t, m: resumed.resumable(rnd, t, m, "fedavg", "ckpt"))
    assert latest is not None
    resumed.resume(latest[1])
    assert resumed.version == model.version and len(resumed.seeds.steps) == 3
    run_rounds(resumed, 4, 2)
    plan = DownloadPlanner(resumed, TransferSpec("fp32", "none"), "weights")
    for at, (version, state) in held.items():
        msg = plan.encoder(f"dev{at}", pb.ENCODING_UNSPECIFIED, pb.CODEC_UNSPECIFIED, version)
        assert isinstance(msg, pb.SeedReplay) and len(msg.rounds) == 5 - at
        assert pb.DownloadMessage(replay=msg).ByteSize() < 20_000
        out, v = replay(state, msg, version)
        assert v == resumed.version and digest(out) == resumed.version
        assert out["encoder.embed_tokens.weight"] is out["shared.weight"], "ties kept"
        assert digest(state) == version, "the held copy is left as it was (it may be a cache file)"
    # A version the run never had gets the full model.
    assert not isinstance(plan.encoder("x", 0, 0, "sha256:" + "0" * 64), pb.SeedReplay)


def test_a_damaged_replay_fails_its_digest_check(base_state):
    model = GlobalModel(base_state, METHODS["mezo"], delta_keep=1)
    v0, held = model.version, clone_tied(model.state)
    run_rounds(model, 1, 1)
    msg = DownloadPlanner(model, TransferSpec("fp32", "none"), "weights").replay(v0)
    msg.rounds[0].values[0] *= 2
    with pytest.raises(WireError) as e:
        replay(held, msg, v0)
    assert e.value.kind == "digest"
    with pytest.raises(WireError, match="holds"):
        replay(held, msg, "sha256:other")


# ---------------------------------------------------------------- FedKSeed-Pro
def test_fedkseed_pro_scores_seeds_by_their_past_gradients_and_devices_sample_by_them(base_state):
    from fedcore.methods.fedkseed import seed_scores

    spec = ZeroOrderSpec(learning_rate=1e-3, eps=1e-3, pool_size=4, pool_seed=3, weighted_seeds=True)
    pro = FedKSeed(spec)
    seed = pro.direction_seed
    # |gradient| = |step| / lr: seed 0 400, seed 1 100 (twice), seed 2 5000 clipped to 1000, seed 3 never used.
    history = [SeedPairs([seed(0), seed(1)], [-0.4, -0.1], [0, 0]),
               SeedPairs([seed(1), seed(2)], [0.1, 5.0], [0, 0])]
    scores = seed_scores(spec, history, seed)
    assert list(scores) == [102, 26, 255, 0]
    assert seed_scores(spec, [], seed) == bytes(4), "no history: every seed alike"
    # The round's tasks carry the scores; a device rebuilds the method and samples by them.
    model = GlobalModel(base_state, pro, delta_keep=1)
    first = model.round_method()
    assert first.spec.seed_weights == bytes(4) and model.round_method() is first, "computed once a version"
    mean = model.new_mean()
    mean.add({(0, 0): 2.0, (0, 1): 0.5}, 1.0)
    model.commit(model.seed_step(mean, 1))
    later = model.round_method()
    assert later is not first and later.spec.seed_weights != bytes(4)
    tr = pb.TrainingSettings()
    later.to_task(tr)
    device = from_task(tr)
    assert device.spec.seed_weights == later.spec.seed_weights and "FedKSeed-Pro" in device.describe()
    skewed = FedKSeed(ZeroOrderSpec(learning_rate=1e-3, pool_size=4, weighted_seeds=True,
                                    seed_weights=bytes([255, 0, 0, 0])))
    est = skewed.estimator(11)
    picks = [est.key(0) for _ in range(4000)]
    # exp(1) / (exp(1) + 3) = 0.475 against 0.25 uniformly
    assert 0.43 < picks.count(0) / len(picks) < 0.52
    uniform = METHODS["fedkseed"].estimator(11)
    assert 0.5 / 64 < [uniform.key(0) for _ in range(4000)].count(0) / 4000 < 2 / 64, "uniform over the pool of 64"
    with pytest.raises(ValueError, match="seed weights"):
        FedKSeed(ZeroOrderSpec(pool_size=4, seed_weights=bytes(3))).validate()


# ---------------------------------------------------------------- over gRPC
def test_seed_updates_and_replays_over_grpc(tmp_path):
    """A FedKSeed server: bad seed uploads get INVALID_ARGUMENT with the reason, a good one completes the round,
    and a device holding round 0's version then gets a SeedReplay (a few hundred bytes), not the model."""
    from fedhelpers import start_server

    cfg = tiny_server_config(tmp_path, insecure=True, method="fedkseed", zo_pool_size=64, learning_rate=1e-4,
                             rounds=2, eval_size=0)
    srv = start_server(cfg)
    try:
        stub = srv.stub("d1")
        v0 = srv.coord.version
        join = stub.Join(pb.JoinRequest(device_id="d1", num_samples=16), timeout=10)
        task = stub.GetTask(pb.TaskRequest(device_id="d1", session_id=join.session_id), timeout=10)
        assert task.kind == pb.Task.TRAIN and task.training.method == "fedkseed"
        assert task.training.zero_order.pool_size == 64

        def upload(pairs: SeedPairs) -> pb.UploadReply:
            h = pb.UploadHeader(device_id="d1", session_id=join.session_id, task_id=task.task_id, round=task.round,
                                base_version=task.model_version, num_samples=8)
            pairs.to_proto(h.seeds)
            return stub.Upload(iter([pb.UploadMessage(header=h)]), timeout=10)

        with pytest.raises(grpc.RpcError) as e:
            upload(SeedPairs([64], [0.5], [0], 1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the pool" in e.value.details()
        # A refused update is settled for good: the device's next poll gets the next round's work, later.
        state = srv.coord.snapshot()
        assert [p["status"] for p in state["participants"]] == ["refused"]
    finally:
        srv.close()

    srv = start_server(tiny_server_config(tmp_path / "ok", insecure=True, method="fedkseed", zo_pool_size=64,
                                          learning_rate=1e-4, rounds=2, eval_size=0))
    try:
        stub = srv.stub("d1")
        v0 = srv.coord.version
        join = stub.Join(pb.JoinRequest(device_id="d1", num_samples=16), timeout=10)
        task = stub.GetTask(pb.TaskRequest(device_id="d1", session_id=join.session_id), timeout=10)
        h = pb.UploadHeader(device_id="d1", session_id=join.session_id, task_id=task.task_id, round=task.round,
                            base_version=task.model_version, num_samples=8)
        SeedPairs([3], [0.5], [0], 1).to_proto(h.seeds)
        reply = stub.Upload(iter([pb.UploadMessage(header=h)]), timeout=10)
        assert reply.complete and reply.digest.startswith("sha256:")
        status = stub.UploadStatus(pb.UploadStatusRequest(device_id="d1", session_id=join.session_id,
                                                          task_id=task.task_id), timeout=10)
        assert status.complete
        task2 = pb.Task()
        for _ in range(60):  # polls answer WAIT until round 1 is aggregated and round 2 opens
            task2 = stub.GetTask(pb.TaskRequest(device_id="d1", session_id=join.session_id), timeout=30)
            if task2.kind == pb.Task.TRAIN:
                break
        assert task2.round == 2 and task2.model_version != v0
        msgs = list(stub.Download(pb.DownloadRequest(device_id="d1", session_id=join.session_id,
                                                     model_version=task2.model_version, base_version=v0),
                                  timeout=10))
        assert len(msgs) == 1 and msgs[0].WhichOneof("body") == "replay" and msgs[0].ByteSize() < 1000
        held = build_model("tiny", seed=0).state_dict()
        assert digest(held) == v0
        out, version = replay(held, msgs[0].replay, v0)
        assert version == task2.model_version == digest(out)
    finally:
        srv.close()


# ---------------------------------------------------------------- the device's pending seed update
class LinkDown(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "link down"


class SeedStub:
    """A fake server for seed uploads: the first `fail` calls break, then it takes the update."""

    def __init__(self, fail: int = 0, holds: bool = False) -> None:
        self.fail, self.calls, self.got, self.holds = fail, 0, None, holds

    def Upload(self, messages, timeout=None, wait_for_ready=None):
        self.calls += 1
        msgs = list(messages)
        if self.calls <= self.fail:
            raise LinkDown()
        self.got, self.holds = msgs[0].header, True
        return pb.UploadReply(complete=True, digest="sha256:x")

    def UploadStatus(self, request, timeout=None):
        return pb.UploadStatusReply(known=False, complete=self.holds)


def test_a_pending_seed_update_survives_a_restart_and_is_sent_whole_once(tmp_path):
    from fedclient.statedir import PendingUpload, StateDir
    from fedclient.transfer import Limits, upload_seeds

    pairs = SeedPairs([(1 << 64) - 5, 7], [0.25, -1.5], [FIRST, SECOND], steps=1)
    StateDir(tmp_path).uploads.save(PendingUpload("t1", 3, "sha256:base", 8, {}, form="seeds"),
                                    [(k, v, []) for k, v in pairs.to_tensors().items()])
    pending, kept = StateDir(tmp_path).uploads.load()
    assert pending.form == "seeds" and SeedPairs.from_tensors(kept) == pairs, "uint64 seeds survive bit for bit"
    stub = SeedStub(fail=2)
    reply, stats = upload_seeds(stub, pb.UploadHeader(task_id="t1"), kept, Limits(stall_s=0), lambda _: None)
    assert reply.complete and stats.attempts == 3 and stats.bytes_resent == 2 * stats.bytes // 3
    assert SeedPairs.from_proto(stub.got.seeds) == pairs
    # A restarted daemon whose update the server already holds sends nothing.
    done = SeedStub(holds=True)
    reply, stats = upload_seeds(done, pb.UploadHeader(task_id="t1"), kept, Limits(stall_s=0), lambda _: None,
                                resume=True)
    assert reply.complete and done.calls == 0 and stats.bytes == 0

"""The Coordinator's parts, each alone: the global model, download planning, upload intake; and the round
loop on a fake clock, whose deadlines pass without waiting real seconds."""
from __future__ import annotations

import threading
import uuid

import pytest
import torch

from fedcore.clock import FakeClock
from fedcore.methods import FfaLora, FullFineTuning
from fedcore.methods.lora import LoraSpec
from fedcore.models import build_model
from fedcore.wire import FrozenStream, StateEncoder, TransferSpec, state_digest, unique_tensors
from fedserver.app import build_coordinator
from fedserver.downloads import DownloadPlanner
from fedserver.errors import StateMismatch
from fedserver.intake import UploadIntake
from fedcore.wire import clone_tied
from fedserver.model import GlobalModel
from fedserver.roundstate import Assignment, RoundError, RoundState, UpdateRefused
from fedserver.storage import RoundLog
from fedserver.strategy import RunningMean, make_strategy
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FP32 = TransferSpec("fp32", "none")
INT8 = TransferSpec("int8", "none")
LORA = FfaLora(LoraSpec(2, 4.0, ("q", "v")))


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return build_model("tiny", seed=0).state_dict()


def shifted(model: GlobalModel, by: float) -> dict[str, torch.Tensor]:
    """A mean delta that moves every trainable float tensor by `by`."""
    return {k: torch.full(v.shape, by) for k, v in model.trainable().items() if v.is_floating_point()}


# ---------------------------------------------------------------- the global model
def test_global_model_steps_commits_versions_and_keeps_ties(base_state):
    model = GlobalModel(base_state, FullFineTuning(), delta_keep=2)
    v0, emb = model.version, model.state["shared.weight"].clone()
    nxt = model.step(make_strategy("fedavg"), shifted(model, 0.5), None)
    assert model.version == v0, "step alone changes nothing"
    model.commit(nxt)
    assert model.versions == [v0, model.version] and model.version == state_digest(unique_tensors(model.state))
    torch.testing.assert_close(model.state["shared.weight"], emb + 0.5)
    assert model.state["encoder.embed_tokens.weight"] is model.state["shared.weight"], "ties kept"
    assert model.history.chain(v0, model.version) is None, "no broadcast deltas asked for"


def test_global_model_broadcast_delta_is_what_a_device_applies(base_state):
    model = GlobalModel(base_state, FullFineTuning(), delta_keep=2)
    v0, held = model.version, clone_tied(model.state)
    model.commit(model.step(make_strategy("fedavg"), shifted(model, 0.01), INT8))
    chain = model.history.chain(v0, model.version)
    assert chain is not None and len(chain) == 1
    manifest = chain[0].stream.manifest
    assert manifest.base_version == v0 and manifest.digest == model.version
    assert model.broadcast_ef.residual, "what int8 left out is kept for the next step"
    assert model.state["shared.weight"].shape == held["shared.weight"].shape


def test_global_model_checkpoint_resumes_and_refuses_another_method_or_strategy(base_state):
    model = GlobalModel(LORA.init_global(base_state, 0), LORA, delta_keep=1)
    strategy = make_strategy("fedadam")
    model.commit(model.step(strategy, shifted(model, 0.01), None))
    tensors, meta = model.checkpoint(strategy)
    assert any(k.startswith("lora_base/") for k in tensors) and any(k.startswith("server_opt/") for k in tensors)
    fresh = GlobalModel(LORA.init_global(base_state, 0), LORA, delta_keep=1)
    found = fresh.resumable(3, tensors, meta, "fedadam", "ckpt")
    fresh.resume(found)
    assert fresh.version == model.version and fresh.versions == model.versions
    assert found.opt and set(found.opt) == set(strategy.state_dict())
    with pytest.raises(StateMismatch, match="strategy fedadam, this server runs fedavg"):
        fresh.resumable(3, tensors, meta, "fedavg", "ckpt")
    full = GlobalModel(base_state, FullFineTuning(), delta_keep=1)
    with pytest.raises(StateMismatch, match="written with LoRA r2 alpha 4 on q,v, this server is set for full"):
        full.resumable(3, tensors, meta, "fedadam", "ckpt")


# ------------------------------------------------------------------ download planning
def test_downloads_full_then_deltas_while_they_are_cheaper(base_state):
    model = GlobalModel(base_state, FullFineTuning(), delta_keep=2)
    plan = DownloadPlanner(model, FP32, "delta")
    v0 = model.version
    first = plan.encoder("d1", pb.ENCODING_UNSPECIFIED, pb.CODEC_UNSPECIFIED)
    assert isinstance(first, StateEncoder) and not first.manifest.base_version
    assert plan.encoder("d2", pb.ENCODING_UNSPECIFIED, pb.CODEC_UNSPECIFIED) is first, "one encoder a version"
    assert plan.expected_bytes("") == model.wire_bytes(FP32)
    model.commit(model.step(make_strategy("fedavg"), shifted(model, 0.01), INT8))
    step = plan.encoder("d1", pb.ENCODING_UNSPECIFIED, pb.CODEC_UNSPECIFIED, base_version=v0)
    assert isinstance(step, FrozenStream) and step.manifest.base_version == v0
    assert plan.expected_bytes(v0) == step.wire_bytes < model.wire_bytes(FP32)
    unknown = plan.encoder("d1", pb.ENCODING_UNSPECIFIED, pb.CODEC_UNSPECIFIED, base_version="sha256:" + "0" * 64)
    assert isinstance(unknown, StateEncoder) and unknown.manifest.digest == model.version, "not kept: full model"
    assert unknown is not first, "a new version, a new encoder"


def test_downloads_with_a_frozen_base_send_only_the_trainable_tensors(base_state):
    model = GlobalModel(LORA.init_global(base_state, 0), LORA, delta_keep=1)
    plan = DownloadPlanner(model, FP32, "weights")
    v0 = model.version
    model.commit(model.step(make_strategy("fedavg"), shifted(model, 0.01), None))
    patch = plan.encoder("d1", pb.ENCODING_UNSPECIFIED, pb.CODEC_UNSPECIFIED, base_version=v0)
    assert patch.manifest.base_version == v0 and patch.manifest.digest == model.version
    assert {t.name for t in patch.manifest.tensors} == set(model.trainable_names)
    assert plan.expected_bytes(v0) == model.wire_bytes(FP32, model.trainable()) < model.wire_bytes(FP32)


def test_resent_download_bytes_are_counted_per_device_and_version():
    plan = DownloadPlanner(None, FP32, "weights")  # type: ignore[arg-type]
    chunk = pb.Chunk(tensor="shared.weight", offset=0, payload=b"x" * 10, scales=b"y" * 2)
    for _ in range(3):
        plan.note_sent("d1", "v1", "", chunk)
    plan.note_sent("d2", "v1", "", chunk)
    assert plan.resent("d1", "v1") == 24 and plan.resent("d2", "v1") == 0 and plan.resent("d1", "v2") == 0


# ---------------------------------------------------------------------- upload intake
class Intake:
    """An UploadIntake with one open round of hand-made assignments, no coordinator, no gRPC."""

    def __init__(self, tmp_path, base_state, **over) -> None:
        self.cfg = tiny_server_config(tmp_path, insecure=True, **over)
        self.model = GlobalModel(base_state, FullFineTuning(), delta_keep=1)
        self.lock = threading.Condition()
        self.intake = UploadIntake(self.cfg, self.model, tmp_path, self.lock, FakeClock())
        self.cur = RoundState(1, 1, self.model.version, 0.0, 600.0, {}, RunningMean(self.model.trainable()))

    def assign(self, device: str, registered: int = 16, steps: int = 2) -> Assignment:
        a = Assignment(device, uuid.uuid4().hex, registered_samples=registered, local_steps=steps)
        self.cur.assignments[device] = a
        return a

    def upload(self, a: Assignment, state, claim: int, version: str | None = None):
        enc = StateEncoder(state, FP32)
        h = pb.UploadHeader(device_id=a.device_id, task_id=a.task_id, round=1, num_samples=claim,
                            base_version=version or self.model.version)
        h.manifest.CopyFrom(enc.manifest)
        with self.lock:
            sess = self.intake.open(self.cur, h, 0)
        for chunk in enc.chunks(None):
            sess.charge(chunk)
            sess.receiver.accept(chunk)
        return sess


def test_intake_refuses_what_is_not_this_rounds(tmp_path, base_state):
    t = Intake(tmp_path, base_state)
    a = t.assign("d1")
    for h, code, why in (
            (pb.UploadHeader(device_id="d9", task_id=a.task_id, round=1, num_samples=1), "permission", "not sampled"),
            (pb.UploadHeader(device_id="d1", task_id="other", round=1, num_samples=1), "permission", "is not device"),
            (pb.UploadHeader(device_id="d1", task_id=a.task_id, round=2, num_samples=1), "precondition", "round 2"),
            (pb.UploadHeader(device_id="d1", task_id=a.task_id, round=1, num_samples=1, base_version="sha256:x"),
             "precondition", "trained from")):
        with pytest.raises(RoundError, match=why) as e:
            t.intake.open(t.cur, h, 0)
        assert e.value.code == code


def test_intake_bounds_the_weight_folds_in_device_order_and_refuses_big_norms(tmp_path, base_state):
    t = Intake(tmp_path, base_state, max_update_norm=1000.0)
    a1, a2, a3 = t.assign("d1"), t.assign("d2"), t.assign("d3")
    up1, up2 = clone_tied(t.model.state), clone_tied(t.model.state)
    up1["shared.weight"] += 1.0
    up2["shared.weight"] -= 1.0
    s2 = t.upload(a2, up2, claim=8)
    s1 = t.upload(a1, up1, claim=1 << 30)  # 2 steps x batch 8 allow 16
    assert (a1.num_samples, a1.claimed_samples) == (16, 1 << 30) and "at most 16" in a1.weight_cut
    t.intake.finish(s2, lambda: t.cur)
    t.intake.finish(s1, lambda: t.cur)
    bad = clone_tied(t.model.state)
    bad["shared.weight"] += 100.0
    with pytest.raises(UpdateRefused, match="exceeds max_update_norm 1000"):
        t.intake.finish(t.upload(a3, bad, claim=8), lambda: t.cur)
    assert [a.status for a in (a1, a2, a3)] == ["aggregated", "aggregated", "refused"]
    assert t.intake.trained_on == {"d1": t.model.version, "d2": t.model.version}
    t.intake.fold(t.cur)
    mean = t.cur.mean.mean()
    torch.testing.assert_close(mean["shared.weight"], torch.full_like(mean["shared.weight"], (16 - 8) / 24))
    assert not (tmp_path / "staging" / "round-000001").exists(), "folded: the staged files are gone"


# ------------------------------------------------------------- the round loop, fake clock
def test_a_straggler_round_closes_at_its_deadline_on_a_fake_clock(tmp_path):
    """Two devices sampled, one delivers, one never does: the round closes at its 600 s deadline,
    600 s of the server's clock that pass at once."""
    cfg = tiny_server_config(tmp_path, insecure=True, eval_size=0, rounds=1, devices_per_round=2, min_updates=1,
                             round_deadline_s=600, liveness_s=86400)
    # 1 s of the server's clock per 10 ms of real waiting: the device's own work takes real time, not the round's.
    clock = FakeClock(step=1.0, real_slice=0.01)
    coord = build_coordinator(cfg, clock=clock)
    start = clock.monotonic()
    sessions = {d: coord.join(d, 16, {}).session_id for d in ("fast", "gone")}
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    task = coord.next_task("fast", sessions["fast"], 600.0)
    while task.kind != pb.Task.TRAIN:
        task = coord.next_task("fast", sessions["fast"], 600.0)
    update = clone_tied(coord.state)
    update["shared.weight"] += 0.1
    enc = StateEncoder(update, cfg.upload_spec())
    h = pb.UploadHeader(device_id="fast", session_id=sessions["fast"], task_id=task.task_id, round=1,
                        base_version=task.model_version, num_samples=8)
    h.manifest.CopyFrom(enc.manifest)
    sess = coord.open_upload(h)
    for chunk in enc.chunks(None):
        sess.charge(chunk)
        sess.receiver.accept(chunk)
    coord.finish_upload(sess)
    coord.report_metrics("fast", sessions["fast"], {
        "round": 1, "task_id": task.task_id, "t_down_s": 0.1, "t_up_s": 0.1, "t_wait_s": 0.0, "t_comp_s": 0.5,
        "bytes_down": 1, "bytes_up": 1, "tokens": 10, "train_loss": 1.0, "step_times": {}, "extra": {}})
    thread.join(120)
    assert not thread.is_alive(), "the round did not close at its deadline"
    assert clock.monotonic() - start >= 600, "closed by the deadline, not before it"
    recs = {r["client"]: r["status"] for r in RoundLog(tmp_path / "rounds.jsonl").read()}
    assert recs == {"fast": "aggregated", "gone": "missing"} and coord.round_no == 1

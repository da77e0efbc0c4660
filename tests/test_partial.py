"""Methods with per-device plans (layer-wise CAFF, selective heads SMHA): averaging, planning, validation, downloads."""
from __future__ import annotations

import random
import threading

import grpc
import pytest
import torch

from fedcore.flops import shape_of_state
from fedcore.layers import layer_units
from fedcore.methods import LayerWise, SelectiveHeads, UpdateInvalid, from_task
from fedcore.methods.partial import WHOLE, DeviceBudget, Part, Plan, PlanContext
from fedcore.methods.smha import cover_heads
from fedcore.models import build_model
from fedcore.wire import StateReceiver, TransferSpec, clone_tied, digest, unique_tensors
from fedserver.downloads import DownloadPlanner
from fedserver.model import GlobalModel
from fedserver.storage import CheckpointDir
from fedserver.strategy import RunningMean, UpdateMismatchError, make_strategy
from fedtune.v1 import fedtune_pb2 as pb

from fedhelpers import tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    return build_model("tiny", seed=0).state_dict()


def canonical(state):
    return {e.name: e.tensor for e in unique_tensors(state)}


# ---------------------------------------------------------------- averaging
def test_each_tensor_is_averaged_over_the_devices_that_trained_it():
    template = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    mean = RunningMean(template)
    mean.add({"a": torch.full((2, 2), 1.0), "b": torch.full((3,), 6.0)}, 1.0, Plan.whole(["a", "b"]))
    mean.add({"a": torch.full((2, 2), 4.0)}, 3.0, Plan.whole(["a"]))
    got, covered = mean.mean(), mean.covered()
    assert torch.equal(got["a"], torch.full((2, 2), (1 * 1.0 + 3 * 4.0) / 4))  # 3.25: both devices
    assert torch.equal(got["b"], torch.full((3,), 6.0))  # only the first trained b: its value, not 6 / 4
    assert covered == {"a": None, "b": None}
    mean2 = RunningMean(template)
    mean2.add({"a": torch.ones(2, 2)}, 2.0, Plan.whole(["a"]))
    assert set(mean2.covered()) == {"a"} and torch.equal(mean2.mean()["b"], torch.zeros(3))


def test_each_heads_slice_is_averaged_over_the_devices_that_trained_it():
    # Four heads of 2 rows (q-like, axis 0) and of 2 columns (o-like, axis 1).
    template = {"q": torch.zeros(8, 3), "o": torch.zeros(3, 8)}
    mean = RunningMean(template)
    rows = lambda *v: torch.tensor(v, dtype=torch.float32).repeat_interleave(2)  # noqa: E731
    # device 1 (weight 1) trains heads 0, 1; device 2 (weight 3) heads 1, 2; head 3 nobody
    mean.add({"q": rows(10, 20).view(4, 1).expand(4, 3).clone(), "o": rows(10, 20).view(1, 4).expand(3, 4).clone()},
             1.0, Plan.of({"q": Part(0, 2, (0, 1)), "o": Part(1, 2, (0, 1))}))
    mean.add({"q": rows(30, 40).view(4, 1).expand(4, 3).clone(), "o": rows(30, 40).view(1, 4).expand(3, 4).clone()},
             3.0, Plan.of({"q": Part(0, 2, (1, 2)), "o": Part(1, 2, (1, 2))}))
    want = rows(10.0, (20 * 1 + 30 * 3) / 4, 40.0, 0.0)  # head 0: 10; head 1: 27.5; head 2: 40; head 3: none
    got = mean.mean()
    assert torch.equal(got["q"], want.view(8, 1).expand(8, 3))
    assert torch.equal(got["o"], want.view(1, 8).expand(3, 8))
    cov = mean.covered()
    assert cov["q"].flatten().tolist() == [True] * 6 + [False] * 2
    assert cov["o"].flatten().tolist() == [True] * 6 + [False] * 2
    # A whole update covers every head from then on.
    mean.add({"q": torch.ones(8, 3), "o": torch.ones(3, 8)}, 4.0, Plan.whole(["q", "o"]))
    assert mean.covered() == {"q": None, "o": None}
    assert mean.mean()["q"][7, 0].item() == 1.0 and mean.mean()["q"][0, 0].item() == pytest.approx((10 * 1 + 1 * 4) / 5)


def test_an_update_that_does_not_follow_its_plan_is_not_folded():
    mean = RunningMean({"q": torch.zeros(8, 3), "b": torch.zeros(3)})
    with pytest.raises(UpdateMismatchError, match="plan"):
        mean.add({"q": torch.zeros(8, 3)}, 1.0, Plan.of({"q": Part(0, 2, (0,))}))
    with pytest.raises(UpdateMismatchError, match="differ from its plan"):
        mean.add({"q": torch.zeros(2, 3), "b": torch.zeros(3)}, 1.0, Plan.of({"q": Part(0, 2, (0,))}))
    assert mean.count == 0


def test_adaptive_strategies_move_only_what_was_trained():
    x = {"a": torch.ones(4, 2), "b": torch.ones(2)}
    fedadam = make_strategy("fedadam", server_lr=0.1)
    first = fedadam.apply(x, {"a": torch.ones(4, 2), "b": torch.ones(2)})
    m_b, v_b = fedadam._m["b"].clone(), fedadam._v["b"].clone()
    m_a = fedadam._m["a"].clone()
    mask = torch.tensor([True, True, False, False]).view(4, 1)
    out = fedadam.apply(first, {"a": torch.ones(4, 2), "b": torch.zeros(2)}, {"a": mask})
    assert out["b"] is first["b"] and torch.equal(fedadam._m["b"], m_b) and torch.equal(fedadam._v["b"], v_b)
    assert torch.equal(out["a"][2:], first["a"][2:]) and torch.equal(fedadam._m["a"][2:], m_a[2:])
    assert not torch.equal(out["a"][:2], first["a"][:2]) and not torch.equal(fedadam._m["a"][:2], m_a[:2])


# ---------------------------------------------------------------- plans
def test_a_plan_travels_in_the_task_and_is_checked_against_the_model(base_state):
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in canonical(base_state).items()}
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    plan = Plan.of({"lm_head.weight": WHOLE, q: Part(0, 32, (1, 3))})
    plan.check(layout)
    assert plan.layout(layout)[q] == (torch.float32, (64, 128))
    training = pb.TrainingSettings()
    SelectiveHeads().with_plan(plan).to_task(training)
    got = from_task(training)
    assert isinstance(got, SelectiveHeads) and got.plan_ == plan
    for bad, why in ((Plan.of({"nope": WHOLE}), "not a tensor"), (Plan.of({q: Part(0, 32, (4,))}), "below 4"),
                     (Plan.of({q: Part(0, 48, (0,))}), "do not divide"), (Plan.of({q: Part(0, 32, (2, 1))}),
                                                                          "ascending"), (Plan(()), "nothing")):
        with pytest.raises(ValueError, match=why):
            bad.check(layout)


def context(state, round_no=1):
    can = canonical(state)
    return PlanContext(can, shape_of_state(can), round_no, 7, lambda st: sum(4 * t.numel() for t in st.values()))


def test_layerwise_plans_as_many_output_side_units_as_the_budgets_allow(base_state):
    ctx = context(base_state)
    units = layer_units(list(ctx.state), ctx.shape.num_layers, ctx.shape.num_decoder_layers)
    kw = dict(batch_size=8, input_tokens=64, target_tokens=16)
    plans = LayerWise().plan([DeviceBudget("big", **kw), DeviceBudget("mid", memory_bytes=9 * 2**20, **kw),
                              DeviceBudget("up", upload_bytes=300_000, **kw),
                              DeviceBudget("tiny", memory_bytes=1, **kw)], ctx)
    assert set(plans["big"].names()) == set(ctx.state), "no budget: everything trains"
    order = [n for u in units for n in u.tensors]
    for dev in ("mid", "up", "tiny"):
        names = plans[dev].names()
        assert names == order[:len(names)], f"{dev}: a prefix of the output-first order"
    assert 0 < len(plans["mid"]) < len(ctx.state) and "lm_head.weight" in plans["mid"].names()
    assert sum(4 * ctx.state[n].numel() for n in plans["up"].names()) <= 300_000
    assert plans["tiny"].names() == list(units[0].tensors) and "anyway" in plans["tiny"].note


def test_smha_head_sets_cover_every_head_and_one_device_trains_everything(base_state):
    ctx = context(base_state)
    devices = [DeviceBudget(f"d{i}", head_fraction=f) for i, f in enumerate((0.25, 0.25, 0.5, 0.0))]
    plans = SelectiveHeads(fraction=0.25, full_devices=1).plan(devices, ctx)
    full = [d for d, p in plans.items() if all(part.whole for _, part in p.parts) and len(p) == len(ctx.state)]
    assert len(full) == 1
    q = "decoder.block.1.layer.1.EncDecAttention.q.weight"
    sliced = {d: p.index[q].heads for d, p in plans.items() if d not in full}
    assert sorted(len(h) for h in sliced.values()) == [1, 1, 2][:len(sliced)] or len(sliced) == 3
    # without any full device the sets alone still cover all 4 heads
    plans = SelectiveHeads(fraction=0.25, full_devices=0).plan(devices[:2], ctx)
    assert set().union(*(p.index[q].heads for p in plans.values())) == {0, 1, 2, 3}
    assert all(p.index["shared.weight"].whole for p in plans.values()), "train_rest: the other weights train"
    rest_frozen = SelectiveHeads(full_devices=0, train_rest=False).plan(devices[:1], ctx)["d0"]
    assert all(not p.whole for _, p in rest_frozen.parts)


def test_smha_takes_the_servers_share_unless_a_budget_needs_less(base_state):
    ctx = context(base_state)
    roomy, tight = DeviceBudget("roomy", memory_bytes=1 << 40), DeviceBudget("tight", upload_bytes=1)
    half = SelectiveHeads(fraction=0.5)
    assert half.device_fraction(roomy, ctx) == (0.5, "the server's default")  # not more than the server asks
    assert SelectiveHeads(fraction=1.0).device_fraction(roomy, ctx)[0] == 1.0
    share, why = half.device_fraction(tight, ctx)
    assert share == 0.25 and why.startswith("nothing fits its budgets (upload")


def test_cover_heads_is_seeded_and_covers_when_counts_add_up():
    sets = cover_heads(["a", "b", "c"], {"a": 2, "b": 1, "c": 1}, 4, random.Random(3), need_cover=False)
    assert sorted(h for s in sets.values() for h in s) == [0, 1, 2, 3]
    assert sets == cover_heads(["a", "b", "c"], {"a": 2, "b": 1, "c": 1}, 4, random.Random(3), need_cover=False)


# ---------------------------------------------------------------- validation and downloads
def test_an_update_outside_its_plan_is_refused_with_the_reason(base_state):
    method = LayerWise()
    glob = canonical(base_state)
    plan = Plan.whole(["lm_head.weight", "decoder.final_layer_norm.weight"])
    good = {n: glob[n].clone() for n in plan.names()}
    method.check_update(good, glob, plan)
    with pytest.raises(UpdateInvalid, match="outside this device's plan"):
        method.check_update({**good, "shared.weight": glob["shared.weight"]}, glob, plan)
    with pytest.raises(UpdateInvalid, match="lacks"):
        method.check_update({"lm_head.weight": glob["lm_head.weight"]}, glob, plan)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    hplan = Plan.of({q: Part(0, 32, (0, 2))})
    with pytest.raises(UpdateInvalid, match=r"plan's torch.float32 \(64, 128\)"):
        method.check_update({q: glob[q]}, glob, hplan)


def run_partial_rounds(model: GlobalModel, strategy, first: int, n: int) -> None:
    ctx_units = layer_units(list(model.canonical()), 2, 2)
    for r in range(first, first + n):
        mean = model.new_mean()
        g = torch.Generator().manual_seed(r)
        for dev, k in enumerate((1, 3)):
            names = [t for u in ctx_units[:k] for t in u.tensors]
            plan = Plan.whole(names)
            glob = model.trainable()
            mean.add({n: 1e-3 * torch.randn(glob[n].shape, generator=g) for n in names}, 1.0 + dev, plan)
        model.commit(model.step(strategy, mean.mean(), None, mean.covered()))


def test_a_device_catching_up_downloads_only_the_changed_tensors_and_reaches_the_digest(tmp_path, base_state):
    model = GlobalModel(base_state, LayerWise(), delta_keep=1)
    strategy = make_strategy("fedadam", server_lr=1e-3)
    held = {0: (model.version, clone_tied(model.state))}
    run_partial_rounds(model, strategy, 1, 2)
    held[2] = (model.version, clone_tied(model.state))
    # A restart from the checkpoint keeps the record of what changed.
    ckpt = CheckpointDir(tmp_path / "ckpt", keep=2)
    tensors, meta = model.checkpoint(strategy)
    ckpt.save(2, tensors, meta)
    resumed = GlobalModel(base_state, LayerWise(), delta_keep=1)
    found = ckpt.load_latest(lambda rnd, t, m: resumed.resumable(rnd, t, m, "fedadam", "ckpt"))
    resumed.resume(found[1])
    assert resumed.changes == model.changes
    strategy2 = make_strategy("fedadam", server_lr=1e-3)
    strategy2.load_state_dict(found[1].opt)
    run_partial_rounds(resumed, strategy2, 3, 1)
    planner = DownloadPlanner(resumed, TransferSpec("fp32", "none"), "weights")
    trained = {t for u in layer_units(list(resumed.canonical()), 2, 2)[:3] for t in u.tensors}
    for at, (version, state) in held.items():
        enc = planner.encoder(f"d{at}", pb.ENCODING_UNSPECIFIED, pb.CODEC_UNSPECIFIED, version)
        names = {t.name for t in enc.manifest.tensors}
        assert names == trained, "only what the devices trained since"
        assert enc.manifest.base_version == version
        assert planner.expected_bytes(version) == sum(4 * resumed.canonical()[n].numel() for n in trained) < (
            resumed.wire_bytes(planner.spec))
        rx = StateReceiver(enc.manifest)
        for chunk in enc.chunks():
            rx.accept(chunk)
        out = rx.finish(base=state)
        assert digest(out) == resumed.version
    assert len(planner.encoder("x", 0, 0, "sha256:" + "0" * 64).manifest.tensors) == len(canonical(base_state))


def test_over_grpc_a_task_carries_its_plan_and_a_tensor_outside_it_is_refused(tmp_path):
    """A layer-wise server plans from the budgets a device states at Join; the task carries the plan; an upload
    naming a tensor outside it gets INVALID_ARGUMENT with the reason, one that follows it completes the round."""
    from fedhelpers import start_server

    srv = start_server(tiny_server_config(tmp_path, insecure=True, method="layerwise", rounds=1, eval_size=0,
                                          batch_size=4, max_input_tokens=64, max_target_tokens=16))
    try:
        stub = srv.stub("d1")
        caps = pb.Capabilities(budgets=pb.Budgets(memory_bytes=9 * 2**20, memory_source="config"))
        join = stub.Join(pb.JoinRequest(device_id="d1", num_samples=16, capabilities=caps), timeout=10)
        task = stub.GetTask(pb.TaskRequest(device_id="d1", session_id=join.session_id), timeout=10)
        assert task.training.method == "layerwise"
        plan = Plan.from_proto(task.training.plan)
        state = canonical(srv.coord.state)
        assert 0 < len(plan) < len(state) and "lm_head.weight" in plan.names()

        def upload(names):
            enc_spec = TransferSpec("fp32", "none")
            from fedcore.wire import StateEncoder
            enc = StateEncoder({n: state[n] for n in names}, enc_spec)
            h = pb.UploadHeader(device_id="d1", session_id=join.session_id, task_id=task.task_id, round=task.round,
                                base_version=task.model_version, num_samples=4, manifest=enc.manifest)
            return stub.Upload(iter([pb.UploadMessage(header=h), *(pb.UploadMessage(chunk=c)
                                                                    for c in enc.chunks(None))]), timeout=30)

        with pytest.raises(grpc.RpcError) as e:
            upload([*plan.names(), "shared.weight"])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'shared.weight' is outside this device's plan" in e.value.details()
        assert upload(plan.names()).complete
        assert srv.wait(60)
        rec = srv.coord.last_records[0]
        assert rec["plan"].startswith(f"{len(plan)} tensors whole") and rec["trained_params"] > 0
    finally:
        srv.close()


# ---------------------------------------------------------------- admission
def test_a_methods_memory_need_counts_what_backpropagation_keeps(base_state):
    from fedcore.methods import FfaLora, FullFineTuning, MeZO
    from fedcore.methods.lora import LoraSpec

    shape = shape_of_state(base_state)
    state = canonical(base_state)
    weights = 4 * sum(t.numel() for t in state.values())
    need = {m.name: m.memory_need(m.init_global(state, 0), shape, 8, 64, 16)
            for m in (FullFineTuning(), FfaLora(LoraSpec(4, 8.0, ("q", "v"))), MeZO())}
    assert need["mezo"] == weights  # forward passes only
    # LoRA keeps every block's activations (backpropagation reaches block 0) but no base grads or moments
    assert weights < need["lora"] < need["full"]
    assert need["full"] - need["lora"] > 2.9 * weights  # grads + AdamW's two moments of every base weight


def test_devices_whose_stated_memory_cannot_hold_a_step_sit_out(tmp_path):
    """Full fine-tuning samples only devices whose configured budget holds a step; a measured budget is a hint."""
    from fedhelpers import start_server

    srv = start_server(tiny_server_config(tmp_path, insecure=True, rounds=1, eval_size=0, devices_per_round=3,
                                          min_devices=3, batch_size=4, max_input_tokens=64, max_target_tokens=16))
    try:
        for d, mib, source in (("poor", 1, "config"), ("rich", 4096, "config"), ("free", 1, "ram")):
            caps = pb.Capabilities(budgets=pb.Budgets(memory_bytes=mib * 2**20, memory_source=source))
            srv.stub(d).Join(pb.JoinRequest(device_id=d, num_samples=16, capabilities=caps), timeout=10)
        for _ in range(200):
            if srv.coord.current is not None:
                break
            threading.Event().wait(0.05)
        assert sorted(srv.coord.current.assignments) == ["free", "rich"]
        assert 2**20 < srv.coord.step_memory < 4096 * 2**20
    finally:
        srv.close()

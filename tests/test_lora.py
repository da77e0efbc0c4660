"""LoRA (FFA-LoRA): only B is trained, exchanged and averaged; A is frozen and common; merged for eval and export."""
from __future__ import annotations

import dataclasses
import json
import threading
import time

import grpc
import pytest
import torch

from bench.fuzz import join_and_wait
from fedclient.trainer import TrainSettings, make_optimizer, train_local
from fedclient.transfer import Limits, fetch, upload
from fedcore.methods import lora
from fedcore.methods.lora import BASE_PREFIX as LORA_BASE_PREFIX, LoraAdapters
from fedcore.config import from_mapping, load_toml
from fedcore.data import synthetic_corpus
from fedcore.models import build_model, t5_config
from fedcore.wire import TransferSpec, digest, unique_tensors
from fedserver.app import build_coordinator
from fedserver.config import ServerConfig
from fedcore.wire import clone_tied
from fedlab.simulate import SimulateConfig, run
from fedserver.storage import CheckpointDir, RoundLog, load_checkpoint
from fedtune.v1 import fedtune_pb2 as pb
from fedtune.v1 import fedtune_pb2_grpc as pbg

from fedhelpers import start_daemon, start_server, stop, tiny_server_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=("q", "v"))  # scaling 2
FP32 = TransferSpec()


def no_wait(_attempt: int) -> None:
    pass


def fp32_bytes(state) -> int:
    return sum(e.tensor.numel() * e.tensor.element_size() for e in unique_tensors(state))


def lora_cfg(out, **over) -> ServerConfig:
    return tiny_server_config(out, eval_size=0, round_deadline_s=600, lora_rank=SPEC.rank, lora_alpha=SPEC.alpha,
                              lora_targets=",".join(SPEC.targets), **over)


def global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    base = build_model("tiny", seed=seed).state_dict()
    return {**base, **lora.init_adapters(base, SPEC, seed)}


def join_all(srv, devices: list[str]) -> dict[str, tuple[grpc.Channel, str, pb.Task]]:
    """Join every device at once (the round waits for all of them) and wait for their tasks."""
    chans = {d: srv.channel(d) for d in devices}
    got: dict[str, tuple[str, pb.Task]] = {}
    threads = [threading.Thread(target=lambda d=d: got.__setitem__(d, join_and_wait(pbg.FederationStub(chans[d]), d)))
               for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return {d: (chans[d], *got[d]) for d in devices}


def send(ch: grpc.Channel, dev: str, sid: str, task: pb.Task, state: dict[str, torch.Tensor], n: int = 10,
         spec: TransferSpec = FP32):
    hdr = pb.UploadHeader(device_id=dev, session_id=sid, task_id=task.task_id, round=task.round,
                          base_version=task.model_version, num_samples=n)
    return upload(pbg.FederationStub(ch), hdr, state, spec, Limits(retries=0, stall_s=0), no_wait)


def wait_round(srv, number: int, timeout: float = 120) -> None:
    """Until round `number` is committed: checkpointed and in summary.json (round_no moves before both)."""
    end = time.monotonic() + timeout
    while not any(s.get("round") == number for s in srv.coord.records.summaries):
        assert time.monotonic() < end, f"round {number} did not complete"
        time.sleep(0.1)


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize("over, message", [
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(lora_rank=8, lora_targets="q,attn"), "attn are not T5 linear layers"),
    (dict(lora_rank=8, lora_targets=""), "at least one target"),
    (dict(lora_rank=8, download_payload="delta"), "download_payload = 'weights'"),
    (dict(lora_rank=8, download_encoding="int8"), "download_encoding = 'fp32'"),
    (dict(lora_rank=8, lora_dropout=1.0), "dropout"),
])
def test_incompatible_lora_settings_are_refused_at_config_load(tmp_path, over, message):
    with pytest.raises(ValueError, match=message):
        tiny_server_config(tmp_path, insecure=True, **over)


def test_alpha_defaults_to_twice_the_rank(tmp_path):
    spec = tiny_server_config(tmp_path, insecure=True, lora_rank=8).lora_spec()
    assert spec == lora.LoraSpec(8, 16.0, ("q", "v")) and spec.scaling == 2.0
    assert tiny_server_config(tmp_path, insecure=True).lora_spec() is None


@pytest.mark.parametrize("preset, ratio", [("small", 500), ("base", 500)])
def test_adapters_move_hundreds_of_times_fewer_bytes_than_fp32_weights(preset, ratio):
    """Per round and device, once the base is held: B up and B down, against the fp32 model up and down."""
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):  # shapes only
        base = T5ForConditionalGeneration(t5_config(preset)).state_dict()
    spec = lora.LoraSpec(8, 16.0, ("q", "v"))
    b = {k: v for k, v in lora.init_adapters(base, spec, 0).items() if k.endswith(lora.B_SUFFIX)}
    # Meta tensors have no storage to find ties by: leave out the shared embedding's two aliases by name.
    full = sum(v.numel() * 4 for k, v in base.items() if not k.endswith("embed_tokens.weight"))
    adapters = fp32_bytes(b)
    assert full / adapters > ratio, (full, adapters)
    if preset == "small":  # 8 + 8 blocks: q, v of 8 encoder self-, 8 decoder self- and 8 cross-attentions
        assert len(b) == 48 and adapters == 48 * 384 * 8 * 4 and round(full / 1e6, 1) == 307.8


# ------------------------------------------------------------------------ device
def test_a_is_frozen_and_identical_across_devices_and_only_b_learns(tok):
    state = global_state()
    a_names = [k for k in state if k.endswith(lora.A_SUFFIX)]
    b_names = lora.trainable_names(state)
    assert len(a_names) == len(b_names) == 12  # q and v of 2 encoder self-, 2 decoder self- and 2 cross-attentions
    trained = []
    for i in range(2):  # two devices with their own data and seeds
        model = build_model("tiny", seed=100 + i)  # whatever it was built with, the download overwrites it
        ad = LoraAdapters(model, SPEC)
        ad.load(state)
        assert sorted(ad.b_params) == sorted(b_names)
        settings = TrainSettings(local_steps=2, batch_size=4, learning_rate=1e-2, max_input_tokens=64,
                                 max_target_tokens=24, seed=i)
        assert {id(p) for g in make_optimizer(model, settings).param_groups for p in g["params"]} == \
            {id(p) for p in ad.b_params.values()}, "the optimizer holds the B matrices and nothing else"
        res = train_local(model, tok, synthetic_corpus(8, seed=10 + i), settings, torch.device("cpu"),
                          weight_grads=ad.weight_grads)
        assert res.step_times.steps == 2 and res.step_times.backward_s > 0, "timing breakdown kept"
        if i == 0:
            # MFU counts what LoRA computes: the frozen weights' gradients are skipped (4 not 6 per matmul).
            full = train_local(build_model("tiny", seed=100), tok, synthetic_corpus(8, seed=10), settings,
                               torch.device("cpu"))
            assert full.tokens == res.tokens
            assert 4 / 6 < res.model_flops / full.model_flops < 0.75
        after = {ad.names[k]: v for k, v in model.state_dict().items()}
        for k in state:
            if k in b_names:
                assert not torch.equal(after[k], state[k]), f"{k} did not learn"
            else:
                assert torch.equal(after[k], state[k]), f"{k} changed, but only B may"
        trained.append(ad.trainable_state())

        # Gradients reach B only: not the base weights, not A.
        batch = tok(["a dialogue"], return_tensors="pt")
        labels = tok(["a summary"], return_tensors="pt").input_ids
        model.train()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        for name, p in model.named_parameters():
            ours = ad.names[name]
            assert (p.grad is not None) == (ours in b_names), name
    assert not torch.equal(trained[0][b_names[0]], trained[1][b_names[0]]), "the devices' B differ"


def test_merged_weights_compute_what_the_peft_model_computes(tok):
    state = global_state()
    g = torch.Generator().manual_seed(3)
    for k in lora.trainable_names(state):
        state[k] = torch.randn(state[k].shape, generator=g) * 0.1
    model = build_model("tiny", seed=1)
    LoraAdapters(model, SPEC).load(state)
    plain = build_model("tiny", seed=2)
    plain.load_state_dict(lora.merged(state, SPEC.scaling), strict=True)
    batch = tok(["Amy: hi\nBob: hello"], return_tensors="pt")
    dec = torch.tensor([[0, 5, 9, 14]])
    with torch.no_grad():
        a = model(input_ids=batch.input_ids, decoder_input_ids=dec).logits
        b = plain(input_ids=batch.input_ids, decoder_input_ids=dec).logits
        unadapted = build_model("tiny", seed=0)(input_ids=batch.input_ids, decoder_input_ids=dec).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, unadapted, atol=1e-3), "the adapters change the output"


# ---------------------------------------------------------------- exchange
def test_lora_exchange_and_aggregation_round_trip(tmp_path):
    """Two devices upload B over gRPC; the server's B is their FedAvg, the merged model base + s mean(B) A."""
    # 4 steps of batch 8 over 10 registered samples: the claims below (up to 30) are within what the task allows.
    cfg = lora_cfg(tmp_path / "srv", rounds=2, devices_per_round=2, min_updates=2, local_steps=4)
    srv = start_server(cfg)
    try:
        init = clone_tied(srv.coord.state)  # ties kept
        b_names = lora.trainable_names(init)
        devs = join_all(srv, ["d1", "d2"])
        g = torch.Generator().manual_seed(7)
        sent, held = {}, {}
        for (d, (ch, sid, task)), n in zip(sorted(devs.items()), (10, 30)):
            lo = task.training.lora
            assert (lo.rank, lo.alpha, list(lo.target_modules)) == (4, 8.0, ["q", "v"])
            state, st = fetch(pbg.FederationStub(ch), d, sid, task.model_version, None, "", Limits(stall_s=0),
                              no_wait)
            assert st.bytes == fp32_bytes(init) and not st.patched, "first download: the whole state"
            assert digest(state) == task.model_version
            for k, v in init.items():
                assert torch.equal(state[k], v), f"{k} arrived changed"
            held[d] = (state, task.model_version)
            sent[d] = ({k: torch.randn(init[k].shape, generator=g) * 0.01 for k in b_names}, n)
            reply, ust = send(ch, d, sid, task, sent[d][0], n)
            assert reply.complete and ust.bytes == fp32_bytes(sent[d][0]), "upload: the B matrices, nothing else"
        wait_round(srv, 1)

        total = sum(n for _, n in sent.values())
        new = srv.coord.state
        for k in b_names:  # FedAvg of B (from B = 0): the sample-weighted mean of the uploads
            torch.testing.assert_close(new[k], sum(b[k] * n for b, n in sent.values()) / total)
        for k in init:
            if k not in b_names:
                assert torch.equal(new[k], init[k]), f"{k} is frozen but changed"
        merged = srv.coord.export_state()
        assert not any(lora.is_adapter(k) for k in merged)
        mods = lora.adapter_modules(init)
        assert len(mods) == 12
        for m in mods:
            a, w = init[m + lora.A_SUFFIX], init[m + ".weight"]
            mean_b = sum(b[m + lora.B_SUFFIX] * n for b, n in sent.values()) / total
            torch.testing.assert_close(merged[m + ".weight"], w + SPEC.scaling * mean_b @ a)
        assert merged["encoder.embed_tokens.weight"] is merged["shared.weight"], "ties kept"

        # The checkpoint exports the merged model (loads into a plain T5) and keeps what resuming needs.
        ckpt, meta = load_checkpoint(CheckpointDir(cfg.out / "checkpoints").path_for(1))
        plain = {k: v for k, v in ckpt.items() if "/" not in k and not lora.is_adapter(k)}
        for k, v in merged.items():
            assert torch.equal(plain[k], v), k
        from transformers import T5ForConditionalGeneration
        T5ForConditionalGeneration(t5_config("tiny")).load_state_dict(plain, strict=True)
        for m in mods:
            assert torch.equal(ckpt[LORA_BASE_PREFIX + m + ".weight"], init[m + ".weight"])
        assert meta["lora"] == "LoRA r4 alpha 8 on q,v" and meta["version"] == srv.coord.version

        # Round 2: a device holding round 1's base gets only B, and ends with the exact global version.
        d = "d1"
        ch, sid, _ = devs[d]
        stub = pbg.FederationStub(ch)
        task2 = stub.GetTask(pb.TaskRequest(device_id=d, session_id=sid), timeout=60)
        while task2.kind != pb.Task.TRAIN:
            task2 = stub.GetTask(pb.TaskRequest(device_id=d, session_id=sid), timeout=60)
        state, st = fetch(stub, d, sid, task2.model_version, *held[d], Limits(stall_s=0), no_wait)
        assert st.patched and st.bytes == fp32_bytes({k: new[k] for k in b_names}), "later downloads: B only"
        assert digest(state) == task2.model_version == srv.coord.version
        assert st.bytes * 50 < fp32_bytes(init)

        # Round 2 starts from B != 0: weights uploads must still fold to their sample-weighted mean
        # (a fold that took them for deltas, or diffed against the wrong base, would not).
        start_b = {k: new[k].clone() for k in b_names}
        assert all(v.abs().sum() > 0 for v in start_b.values())
        sent2 = {}
        for d, n in (("d1", 20), ("d2", 5)):
            ch, sid, _ = devs[d]
            stub = pbg.FederationStub(ch)
            t = task2 if d == "d1" else stub.GetTask(pb.TaskRequest(device_id=d, session_id=sid), timeout=60)
            while t.kind != pb.Task.TRAIN:
                t = stub.GetTask(pb.TaskRequest(device_id=d, session_id=sid), timeout=60)
            assert t.round == 2
            sent2[d] = ({k: start_b[k] + torch.randn(start_b[k].shape, generator=g) * 0.01 for k in b_names}, n)
            reply, _ = send(ch, d, sid, t, sent2[d][0], n)
            assert reply.complete
        wait_round(srv, 2)
        for k in b_names:
            torch.testing.assert_close(srv.coord.state[k], (sent2["d1"][0][k] * 20 + sent2["d2"][0][k] * 5) / 25)
    finally:
        srv.close()

    # A restarted server continues from the checkpoint: same model, same run versions, same A.
    again = build_coordinator(cfg)
    assert again.round_no == 2 and again.version == srv.coord.version
    assert again.model.versions == srv.coord.model.versions and len(again.model.versions) == 3
    for k, v in srv.coord.state.items():
        assert torch.equal(again.state[k], v), k
    with pytest.raises(RuntimeError, match="written with LoRA r4 alpha 8 on q,v, this server is set for full"):
        build_coordinator(dataclasses.replace(cfg, lora_rank=0))


def test_b_travels_as_an_int8_delta_with_error_feedback_too(tmp_path):
    from fedcore.wire import ErrorFeedback, TransferSpec

    cfg = lora_cfg(tmp_path / "srv", rounds=1, upload_payload="delta", upload_encoding="int8", error_feedback=True)
    srv = start_server(cfg)
    try:
        b_names = lora.trainable_names(srv.coord.state)
        ((ch, sid, task),) = join_all(srv, ["d1"]).values()
        assert task.upload.payload == pb.DELTA and task.upload.error_feedback
        g = torch.Generator().manual_seed(5)
        delta = {k: torch.randn(srv.coord.state[k].shape, generator=g) * 1e-2 for k in b_names}
        spec = TransferSpec("int8", block_size=task.upload.block_size, chunk_elems=task.upload.chunk_elems,
                            payload="delta")
        send_, received, _ = ErrorFeedback().compensate(delta, spec.encoding_id, spec.block_size, spec.chunk_elems)
        reply, st = send(ch, "d1", sid, task, send_, spec=spec)
        assert reply.complete and st.bytes < fp32_bytes(delta) / 3
        wait_round(srv, 1)
        for k in b_names:  # B was zero: the new B is the delta as the server decoded it
            torch.testing.assert_close(srv.coord.state[k], received[k])
    finally:
        srv.close()


def test_bad_adapter_uploads_are_refused(tmp_path):
    cfg = lora_cfg(tmp_path / "srv", rounds=1, devices_per_round=2, min_updates=1, max_update_norm=10.0)
    srv = start_server(cfg)
    try:
        init = srv.coord.state
        b_names = lora.trainable_names(init)
        good = {k: torch.full(init[k].shape, 1e-3) for k in b_names}
        devs = join_all(srv, ["bad", "huge"])
        ch, sid, task = devs["bad"]

        def refused(state, dev="bad", spec=FP32) -> str:
            c, s, t = devs[dev]
            with pytest.raises(grpc.RpcError) as e:
                send(c, dev, s, t, state, spec=spec)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            return e.value.details()

        first = b_names[0]
        wrong_rank = dict(good, **{first: torch.zeros(init[first].shape[0], 5)})
        assert "shape" in refused(wrong_rank)
        assert "lacks" in refused({k: v for k, v in good.items() if k != first})
        a_name = first.replace(lora.B_SUFFIX, lora.A_SUFFIX)
        assert "not part of the model" in refused(dict(good, **{a_name: init[a_name]}))  # A is not for uploading
        assert "only the B matrices" in refused({k: v for k, v in init.items()})  # the full state is not either
        assert "dtype" in refused({k: v.half() for k, v in good.items()}, spec=TransferSpec("fp16"))
        nan = {k: v.clone() for k, v in good.items()}
        nan[first][0, 0] = float("nan")
        assert "NaN or Inf" in refused(nan)
        assert "max_update_norm" in refused({k: v * 1e5 for k, v in good.items()}, dev="huge")
        end = time.monotonic() + 60
        while len(RoundLog(cfg.out / "rounds.jsonl").read()) < 2:
            assert time.monotonic() < end, "the refused round was not logged"
            time.sleep(0.1)
        recs = {r["client"]: r for r in RoundLog(cfg.out / "rounds.jsonl").read()}
        assert {d: r["status"] for d, r in recs.items()} == {"bad": "refused", "huge": "refused"}
        assert srv.coord.round_no == 0, "nothing was aggregated"
    finally:
        srv.close()


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_lora_run_uploads_only_b_and_a_restarted_server_continues(tmp_path):
    cfg = SimulateConfig.of(out=tmp_path / "run", preset="tiny", base="random", rounds=2, devices=2, devices_per_round=2, local_steps=1,
                         batch_size=8, max_input_tokens=128, max_target_tokens=32, data_size=40, eval_size=4,
                         learning_rate=1e-2, lora_rank=8, round_deadline_s=300, insecure=True)
    lines: list[str] = []
    assert run(cfg, echo=lines.append) == 0, "\n".join(lines)
    assert "LoRA r8 alpha 16 on q,v" in lines[0]
    init = global_state_for(cfg)
    b_bytes = fp32_bytes({k: init[k] for k in lora.trainable_names(init)})
    full = fp32_bytes(init)
    model_only = fp32_bytes({k: v for k, v in init.items() if not lora.is_adapter(k)})
    assert b_bytes == 12 * 128 * 8 * 4 and b_bytes * 70 < model_only  # tiny's embeddings weigh more than Small's
    recs = RoundLog(cfg.out / "rounds.jsonl").read()
    assert len(recs) == 4 and all(r["status"] == "aggregated" for r in recs)
    for r in recs:
        assert r["bytes_up"] == b_bytes, "uploads carry the B matrices only"
        assert r["bytes_down"] == (full if r["round"] == 1 else b_bytes), "first download full, later B only"
    summary = json.loads((cfg.out / "summary.json").read_text())["rounds"]
    assert [s["round"] for s in summary] == [0, 1, 2] and all("rougeL" in s for s in summary)
    assert summary[2]["upload"].endswith("B only") and summary[2]["lora"] == "LoRA r8 alpha 16 on q,v"

    # Restart: the server resumes from round 2's checkpoint and runs round 3; the daemons, restarted too, hold
    # round 1's model on disk, which the server knows as a version of this run: B alone brings them up to date.
    scfg = from_mapping(ServerConfig, {**load_toml(cfg.out / "server.toml"), "rounds": 3, "listen": "127.0.0.1:0"})
    srv = start_server(scfg)
    procs = []
    try:
        assert srv.coord.round_no == 2
        procs = [start_daemon(srv.address, f"dev-{i:02d}", tmp_path / f"dev-{i}.log", "--state-dir",
                              str(cfg.out / "devices" / f"dev-{i:02d}")) for i in range(2)]
        assert srv.wait(300), "round 3 did not finish"
    finally:
        stop(procs)
        srv.close()
    recs3 = [r for r in RoundLog(cfg.out / "rounds.jsonl").read() if r["round"] == 3]
    assert len(recs3) == 2 and all(r["status"] == "aggregated" and r["bytes_down"] == b_bytes
                                   and r["bytes_up"] == b_bytes for r in recs3), recs3
    ckpts = CheckpointDir(cfg.out / "checkpoints")
    a_names = [k for k in init if k.endswith(lora.A_SUFFIX)]
    for rnd in (1, 2, 3):
        ckpt, meta = load_checkpoint(ckpts.path_for(rnd))
        for k in a_names:
            assert torch.equal(ckpt[k], init[k]), f"round {rnd}: {k} is not the shared initial A"
        unmerged = {k: ckpt[LORA_BASE_PREFIX + k] if LORA_BASE_PREFIX + k in ckpt else ckpt[k] for k in init}
        assert digest(unmerged) == meta["version"]


def global_state_for(cfg: SimulateConfig) -> dict[str, torch.Tensor]:
    """The state a server of this run starts from."""
    base = build_model(cfg.server.preset, seed=cfg.server.seed).state_dict()
    spec = cfg.server_config(cfg.out, 0).lora_spec()
    assert spec is not None
    return {**base, **lora.init_adapters(base, spec, cfg.server.seed)}


def test_compress_lora_scenario_is_compress_fp32_with_adapters():
    from fedlab.runner import load_scenario, scenario_path

    from fedcore.config import load_toml

    def flat(name: str) -> dict:
        data = load_toml(scenario_path(name))
        return {**data.pop("server"), **data}

    fp32, lo = flat("compress-fp32"), flat("compress-lora")
    added = {k: v for k, v in lo.items() if k not in fp32}
    assert added == {"lora_rank": 8, "lora_alpha": 16, "lora_targets": "q,v"}
    assert {k: v for k, v in lo.items() if k in fp32 and k != "description"} == \
        {k: v for k, v in fp32.items() if k != "description"}, "same preset, rounds, devices, steps, data, seed, links"
    cfg = load_scenario("compress-lora")
    assert cfg.server_config(cfg.out, 0).lora_spec() == lora.LoraSpec(8, 16.0, ("q", "v"))


def test_a_patch_applies_only_to_its_base_and_must_give_the_digest():
    from fedcore.wire import StateEncoder, StateReceiver, WireError

    old = global_state()
    b_names = lora.trainable_names(old)
    new = dict(old, **{k: torch.full(old[k].shape, 0.5) for k in b_names})
    enc = StateEncoder({k: new[k] for k in b_names}, FP32, digest=digest(new), base_version=digest(old))

    def receive(base):
        r = StateReceiver(enc.manifest)
        for c in enc.chunks():
            r.accept(c)
        return r.finish(base=base)

    got = receive(old)
    assert digest(got) == digest(new) and list(got) == list(old)
    assert got["encoder.embed_tokens.weight"] is got["shared.weight"], "the held ties stay"
    other = dict(old, **{"lm_head.weight": old["lm_head.weight"] + 1})  # not the version the patch is for
    with pytest.raises(WireError) as e:
        receive(other)
    assert e.value.kind == "digest", "the device then falls back to the full model"
    with pytest.raises(WireError, match="not a tensor of the base") as e:
        receive({k: v for k, v in old.items() if k != b_names[0]})
    assert e.value.kind == "base", "a held version the patch does not fit: the device fetches the full model"
    with pytest.raises(WireError, match="does not fit the base") as e:
        receive(dict(old, **{b_names[0]: torch.zeros(3, 3)}))
    assert e.value.kind == "base"


def test_an_adapter_on_a_tied_weight_is_refused():
    # T5 v1.0 checkpoints tie lm_head to the shared embedding: W + sBA under lm_head alone would break the tie,
    # and loading the merged model would push the adapter into the embedding as well.
    from transformers import T5ForConditionalGeneration

    cfg = t5_config("tiny")
    cfg.tie_word_embeddings = True
    state = T5ForConditionalGeneration(cfg).state_dict()
    assert state["lm_head.weight"].data_ptr() == state["shared.weight"].data_ptr()
    with pytest.raises(ValueError, match="lm_head is tied to"):
        lora.init_adapters(state, lora.LoraSpec(rank=4, alpha=8.0, targets=("q", "lm_head")), 0)
    # Untied targets of the same model are fine.
    assert lora.init_adapters(state, lora.LoraSpec(rank=4, alpha=8.0, targets=("q",)), 0)

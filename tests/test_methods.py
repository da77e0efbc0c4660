"""The method seam (fedcore.methods): each method answers for both sides, and the task carries it by name."""
from __future__ import annotations

import pytest
import torch

from fedcore import methods
from fedcore.methods import FfaLora, FullFineTuning, UpdateInvalid
from fedcore.methods.base import update_norm, written_by
from fedcore.methods.lora import BASE_PREFIX, LoraSpec, merged
from fedcore.models import build_model
from fedcore.wire import unique_tensors
from fedtune.v1 import fedtune_pb2 as pb

LORA = FfaLora(LoraSpec(4, 8.0, ("q", "v")))


def task_for(method) -> pb.TrainingSettings:
    training = pb.TrainingSettings()
    method.to_task(training)
    return training


@pytest.mark.parametrize("method", [FullFineTuning(), LORA], ids=["full", "lora"])
def test_a_task_carries_its_method_to_the_device(method):
    training = task_for(method)
    assert training.method == method.name
    assert methods.from_task(training) == method


def test_tasks_from_servers_before_the_seam_name_no_method():
    assert methods.from_task(pb.TrainingSettings()) == FullFineTuning()
    old_lora = pb.TrainingSettings(lora=pb.LoraSettings(rank=4, alpha=8.0, target_modules=["q", "v"]))
    assert methods.from_task(old_lora) == LORA


def test_an_unknown_or_unusable_method_is_refused_by_name():
    with pytest.raises(ValueError, match="'zo-magic'.*update fedtune"):
        methods.from_task(pb.TrainingSettings(method="zo-magic"))
    with pytest.raises(ValueError, match="not T5 linear layers"):
        methods.from_task(pb.TrainingSettings(method="lora", lora=pb.LoraSettings(rank=4, alpha=8.0,
                                                                                  target_modules=["nope"])))


def test_full_fine_tuning_trains_and_uploads_every_tensor_once():
    model = build_model("tiny", seed=1)
    state = FullFineTuning().init_global(model.state_dict(), seed=0)
    assert FullFineTuning().trainable(state) is None and FullFineTuning().export(state) is state
    trainee = FullFineTuning().bind(build_model("tiny", seed=2))
    trainee.load(state)
    upload, aliases = trainee.update_state()
    entries = unique_tensors(model.state_dict())
    assert list(upload) == [e.name for e in entries], "tied tensors travel once, in state order"
    assert aliases == {e.name: e.aliases for e in entries}
    assert all(torch.equal(upload[k], state[k]) for k in upload)
    assert trainee.weight_grads and not trainee.alters_model


def test_lora_global_state_checkpoint_round_trip_and_export():
    base = build_model("tiny", seed=1).state_dict()
    state = LORA.init_global(base, seed=0)
    names = LORA.trainable(state)
    assert names and all(k.endswith(".lora_B.weight") for k in names)
    for k in names:  # as after some rounds
        state[k] = torch.full_like(state[k], 0.01)
    export = LORA.export(state)
    assert set(export) == set(base) and export is not state
    saved = {**export, **LORA.checkpoint_tensors(state)}
    assert any(k.startswith(BASE_PREFIX) for k in saved)
    restored = LORA.restore(saved)
    assert set(restored) == set(state) and all(torch.equal(restored[k], state[k]) for k in state)
    assert torch.equal(merged(restored, LORA.spec.scaling)[names[0][:-len(".lora_B.weight")] + ".weight"],
                       export[names[0][:-len(".lora_B.weight")] + ".weight"])


def test_a_checkpoint_says_which_method_wrote_it_old_ones_included():
    assert LORA.check_checkpoint(LORA.checkpoint_meta()) == ""
    assert FullFineTuning().check_checkpoint(FullFineTuning().checkpoint_meta()) == ""
    assert "was written with LoRA r4" in FullFineTuning().check_checkpoint(LORA.checkpoint_meta())
    assert "was written with full fine-tuning" in LORA.check_checkpoint({})
    # Before the seam: LoRA runs wrote only "lora", full fine-tuning nothing.
    assert written_by({"lora": LORA.describe()}) == LORA.describe()
    assert LORA.check_checkpoint({"lora": LORA.describe()}) == ""


def test_lora_download_settings_are_checked():
    with pytest.raises(ValueError, match="download_payload"):
        LORA.check_transfers("delta", "fp32")
    with pytest.raises(ValueError, match="fp32"):
        LORA.check_transfers("weights", "int8")
    FullFineTuning().check_transfers("delta", "int8")


def test_an_update_is_checked_and_becomes_an_fp32_delta():
    glob = {"w": torch.ones(2, 3), "steps": torch.tensor([3])}
    method = FullFineTuning()
    method.check_update({"w": torch.full((2, 3), 1.5), "steps": torch.tensor([4])}, glob)
    delta = method.update_delta({"w": torch.full((2, 3), 1.5), "steps": torch.tensor([4])}, glob, is_delta=False)
    assert list(delta) == ["w"] and torch.equal(delta["w"], torch.full((2, 3), 0.5))
    assert update_norm(delta) == pytest.approx(0.5 * 6 ** 0.5)
    sent = method.update_delta({"w": torch.full((2, 3), 0.25)}, glob, is_delta=True)
    assert torch.equal(sent["w"], torch.full((2, 3), 0.25))
    for bad, why in (({"w": torch.ones(2, 3)}, "differ from the model's"),
                     ({"w": torch.ones(3, 2), "steps": torch.tensor([1])}, "does not match"),
                     ({"w": torch.full((2, 3), float("nan")), "steps": torch.tensor([1])}, "NaN or Inf")):
        with pytest.raises(UpdateInvalid, match=why):
            method.check_update(bad, glob)


def test_the_worked_example_in_the_docs_is_a_working_method(monkeypatch):
    """docs/explanation/methods.md adds a method in one module; run its code through the seam."""
    from pathlib import Path

    from fedclient.trainer import TrainSettings, train_local
    from fedcore.data import synthetic_corpus
    from fedcore.models import load_tokenizer

    text = (Path(__file__).resolve().parent.parent / "docs" / "explanation" / "methods.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    import sys
    import types

    module = types.ModuleType("fedcore.methods.norms")  # dataclasses look their module up by name
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "methods.md", "exec"), module.__dict__)
    method = module.LayerNorms()
    monkeypatch.setitem(methods.METHODS, method.name, type(method))
    assert methods.from_task(task_for(method)) == method

    state = build_model("tiny", seed=1).state_dict()
    names = method.trainable(state)
    assert names and all(k.endswith("layer_norm.weight") for k in names)
    model = build_model("tiny", seed=2)
    trainee = method.bind(model)
    trainee.load(state)
    settings = TrainSettings(local_steps=2, batch_size=4, learning_rate=1e-2, max_input_tokens=48,
                             max_target_tokens=16, seed=0)
    train_local(model, load_tokenizer(None), synthetic_corpus(8, seed=3), settings, torch.device("cpu"),
                weight_grads=trainee.weight_grads)
    upload, aliases = trainee.update_state()
    assert sorted(upload) == sorted(names) and all(v == [] for v in aliases.values())
    assert any(not torch.equal(upload[k], state[k]) for k in names), "the norms learned"
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state if k not in names), "nothing else moved"

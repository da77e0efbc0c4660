"""Local training: step accounting, timing structure, learning."""
from __future__ import annotations

import math

import pytest
import torch

from fedclient.trainer import StepTimes, TrainResult, TrainSettings, train_local
from fedcore.data import synthetic_corpus
from fedcore.models import build_model

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_local_steps_runs_exactly_n_steps_cycling_data(tok) -> None:
    model = build_model("tiny", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = synthetic_corpus(5, seed=0)
    settings = TrainSettings(local_steps=4, batch_size=2, max_input_tokens=64, max_target_tokens=24)
    res = train_local(model, tok, examples, settings, CPU)

    assert isinstance(res, TrainResult) and isinstance(res.step_times, StepTimes)
    assert res.steps == res.step_times.steps == len(res.losses) == 4
    # 5 examples in batches of 2 -> 2, 2, 1, then a new epoch starts with 2.
    assert res.samples == 7
    assert res.tokens > 0 and res.tokens_per_s > 0
    assert math.isfinite(res.mean_loss) and res.mean_loss == pytest.approx(sum(res.losses) / 4)
    assert not model.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_epochs_mode_and_timing_structure(tok) -> None:
    model = build_model("tiny", seed=0)
    examples = synthetic_corpus(6, seed=1)
    settings = TrainSettings(local_epochs=2, batch_size=4, max_input_tokens=64, max_target_tokens=24)
    res = train_local(model, tok, examples, settings, CPU)

    assert res.steps == 4 and res.samples == 12
    st = res.step_times
    phases = [st.batch_loading_s, st.forward_s, st.loss_s, st.backward_s, st.optimizer_step_s]
    assert all(t > 0 for t in phases)
    # The phases are disjoint parts of T_comp; what is left over is setup
    # (tokenizing, optimizer creation), a small share on any machine.
    assert st.total_s == pytest.approx(sum(phases))
    assert st.total_s <= res.t_comp_s
    assert st.total_s >= 0.5 * res.t_comp_s


def test_same_seed_same_result(tok) -> None:
    examples = synthetic_corpus(4, seed=2)
    settings = TrainSettings(local_steps=2, batch_size=2, max_input_tokens=48, max_target_tokens=16, seed=7)
    a, b = build_model("tiny", seed=0), build_model("tiny", seed=0)
    ra = train_local(a, tok, examples, settings, CPU)
    rb = train_local(b, tok, examples, settings, CPU)
    assert ra.losses == rb.losses
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loss_decreases_on_repeated_batch(tok) -> None:
    model = build_model("tiny", seed=0)
    examples = synthetic_corpus(4, seed=3)
    settings = TrainSettings(local_steps=30, batch_size=4, learning_rate=3e-3,
                             max_input_tokens=64, max_target_tokens=32)
    res = train_local(model, tok, examples, settings, CPU)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.25 * first


def test_rejects_empty_input(tok) -> None:
    with pytest.raises(ValueError, match="no training examples"):
        train_local(build_model("tiny"), tok, [], TrainSettings(), CPU)


def test_model_flops_count_each_example_at_its_own_lengths(tok) -> None:
    from fedcore.batching import encode_examples
    from fedcore.flops import T5Shape, training_flops

    model = build_model("tiny", seed=0)
    examples = synthetic_corpus(6, seed=4)
    settings = TrainSettings(local_epochs=1, batch_size=4, max_input_tokens=64, max_target_tokens=24)
    res = train_local(model, tok, examples, settings, CPU)
    shape = T5Shape.from_config(model.config)
    encoded = encode_examples(tok, examples, 64, 24)
    assert res.model_flops == pytest.approx(sum(training_flops(shape, len(e.input_ids), len(e.labels))
                                                for e in encoded))
    assert res.flops_per_token == pytest.approx(res.model_flops / res.tokens)

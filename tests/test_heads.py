"""fedcore.heads: head slices, HeadSlicedLinear's exact outputs and trained-only gradients, state round trips."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedcore.heads import (HeadSlicedLinear, full_state, gather, head_axis, load_full_state, part_index, scatter,
                           slice_heads, unslice_heads)
from fedcore.models import init_model

HEAD_SETS = [(), (0,), (1, 3), (0, 1, 2), (0, 1, 2, 3)]  # tiny has 4 heads of 32


@pytest.fixture(scope="module")
def model():
    return init_model("tiny", seed=3)


def head_parts(model: nn.Module, heads) -> dict:
    d_kv = model.config.d_kv
    return {n: (head_axis(n), d_kv, heads) for n, _ in model.named_parameters() if head_axis(n) is not None}


def batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 12), generator=g), torch.randint(3, vocab, (2, 5), generator=g)


def loss_of(model: nn.Module, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids, labels=labels, use_cache=False).logits
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


def test_head_axis_names():
    assert head_axis("encoder.block.0.layer.0.SelfAttention.q.weight") == 0
    assert head_axis("decoder.block.1.layer.0.SelfAttention.k.weight") == 0
    assert head_axis("decoder.block.0.layer.1.EncDecAttention.v.weight") == 0
    assert head_axis("decoder.block.0.layer.1.EncDecAttention.o.weight") == 1
    assert head_axis("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") is None
    assert head_axis("encoder.block.0.layer.1.DenseReluDense.wo.weight") is None
    assert head_axis("shared.weight") is None


def test_gather_scatter_round_trip_matches_hand_slicing():
    t = torch.arange(6 * 4 * 5, dtype=torch.float32).reshape(24, 5)
    got = gather(t, 0, 4, [1, 4])
    assert torch.equal(got, torch.cat([t[4:8], t[16:20]]))
    assert torch.equal(gather(t.t(), 1, 4, [1, 4]), torch.cat([t.t()[:, 4:8], t.t()[:, 16:20]], 1))
    assert torch.equal(part_index(4, [1, 4]), torch.tensor([4, 5, 6, 7, 16, 17, 18, 19]))
    assert gather(t, 0, 4, []).shape == (0, 5)
    dest = torch.zeros_like(t)
    scatter(dest, 0, 4, [1, 4], got)
    want = torch.zeros_like(t)
    want[4:8], want[16:20] = t[4:8], t[16:20]
    assert torch.equal(dest, want)
    dest_t = torch.zeros_like(t.t())
    scatter(dest_t, 1, 4, [0, 2, 5], gather(t.t(), 1, 4, [0, 2, 5]))
    assert torch.equal(dest_t[:, 8:12], t.t()[:, 8:12]) and not dest_t[:, 4:8].any()


@pytest.mark.parametrize("heads", HEAD_SETS)
def test_sliced_logits_equal_plain(model, heads, one_torch_thread):
    ids, labels = batch(model.config.vocab_size)
    sliced = copy.deepcopy(model)
    slice_heads(sliced, head_parts(sliced, heads))
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels, use_cache=False).logits
        got = sliced(input_ids=ids, labels=labels, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# (no heads, nothing else) trains nothing: no backward to check
@pytest.mark.parametrize("heads,rest_trains", [(h, r) for h in HEAD_SETS for r in (True, False) if h or r])
def test_only_trained_slices_get_gradients_and_they_match(model, heads, rest_trains, one_torch_thread):
    ids, labels = batch(model.config.vocab_size, seed=1)
    plain = copy.deepcopy(model)
    plain.requires_grad_(True)
    loss_of(plain, ids, labels).backward()
    grads = dict(plain.named_parameters())

    sliced = copy.deepcopy(model)
    for n, p in sliced.named_parameters():
        p.requires_grad_(rest_trains and head_axis(n) is None)
    mods = slice_heads(sliced, head_parts(sliced, heads))
    loss_of(sliced, ids, labels).backward()
    for name, m in mods.items():
        assert m.frozen.grad is None
        if heads:
            want = gather(grads[name].grad, head_axis(name), model.config.d_kv, heads)
            torch.testing.assert_close(m.trained.grad, want, atol=1e-5, rtol=1e-4)
        else:
            assert m.trained.grad is None
    for n, p in sliced.named_parameters():
        if n.endswith((".trained", ".frozen")):
            continue
        if rest_trains:  # also checks the input gradients the sliced Linears pass back
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4)
        else:
            assert p.grad is None


def test_adamw_weight_decay_leaves_frozen_heads_bit_identical(model):
    ids, labels = batch(model.config.vocab_size, seed=2)
    sliced = copy.deepcopy(model)
    sliced.requires_grad_(True)
    mods = slice_heads(sliced, head_parts(sliced, (1, 2)))
    before = full_state(sliced)
    opt = torch.optim.AdamW([p for p in sliced.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    loss_of(sliced, ids, labels).backward()
    opt.step()
    after = full_state(sliced)
    d_kv = model.config.d_kv
    for name in mods:
        axis = head_axis(name)
        assert torch.equal(gather(after[name], axis, d_kv, (0, 3)), gather(before[name], axis, d_kv, (0, 3)))
        assert not torch.equal(gather(after[name], axis, d_kv, (1, 2)), gather(before[name], axis, d_kv, (1, 2)))


def test_unslice_restores_linear_with_the_full_weight_and_can_reslice(model):
    ids, labels = batch(model.config.vocab_size, seed=3)
    sliced = copy.deepcopy(model)
    mods = slice_heads(sliced, head_parts(sliced, (0, 2)))
    with torch.no_grad():
        for m in mods.values():
            m.trained.add_(0.5)  # as if it had trained
        want_logits = sliced(input_ids=ids, labels=labels, use_cache=False).logits
    want = {n: m.weight() for n, m in mods.items()}
    unslice_heads(sliced)
    for name, w in want.items():
        linear = sliced.get_submodule(name[: -len(".weight")])
        assert type(linear) is nn.Linear and linear.bias is None
        assert torch.equal(linear.weight, w) and linear.weight.requires_grad
    assert set(sliced.state_dict()) == set(model.state_dict())
    slice_heads(sliced, head_parts(sliced, (3,)))
    with torch.no_grad():
        got = sliced(input_ids=ids, labels=labels, use_cache=False).logits
    torch.testing.assert_close(got, want_logits, atol=1e-5, rtol=1e-5)


def test_full_state_and_load_full_state_round_trip(model):
    ids, labels = batch(model.config.vocab_size, seed=4)
    sliced = copy.deepcopy(model)
    slice_heads(sliced, head_parts(sliced, (1,)))
    plain = model.state_dict()
    state = full_state(sliced)
    assert list(state) == list(plain)
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    other = init_model("tiny", seed=4)
    load_full_state(sliced, other.state_dict())
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in full_state(sliced).items())
    with torch.no_grad():
        got = sliced(input_ids=ids, labels=labels, use_cache=False).logits
        want = other(input_ids=ids, labels=labels, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    bad = dict(other.state_dict())
    name = next(iter(head_parts(model, (1,))))
    bad[name] = bad[name][:-1]
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_full_state(sliced, bad)
    del bad[name]
    with pytest.raises(RuntimeError, match="Missing"):
        load_full_state(sliced, bad)


def test_only_trained_heads_reach_the_optimizer(model):
    sliced = copy.deepcopy(model)
    sliced.requires_grad_(False)
    mods = slice_heads(sliced, head_parts(sliced, (2,)))
    trainable = [p for p in sliced.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(m.trained) for m in mods.values()}
    assert sum(p.numel() for p in trainable) == sum(
        p.numel() for n, p in model.named_parameters() if head_axis(n) is not None) // 4


def test_bad_slices_are_refused(model):
    with pytest.raises(ValueError, match="without bias"):
        HeadSlicedLinear(nn.Linear(8, 8), 0, 4, [0])
    with pytest.raises(ValueError, match="ascending"):
        HeadSlicedLinear(nn.Linear(8, 8, bias=False), 0, 4, [1, 0])
    with pytest.raises(ValueError, match="ascending"):
        HeadSlicedLinear(nn.Linear(8, 8, bias=False), 0, 4, [2])
    with pytest.raises(ValueError, match="divide"):
        HeadSlicedLinear(nn.Linear(8, 6, bias=False), 0, 4, [0])
    sliced = copy.deepcopy(model)
    parts = head_parts(sliced, (0,))
    slice_heads(sliced, parts)
    with pytest.raises(ValueError, match="only once"):
        slice_heads(sliced, parts)


@pytest.mark.parametrize("axis", [0, 1])
def test_sliced_linear_gradcheck(axis):
    torch.manual_seed(0)
    linear = nn.Linear(6, 8, bias=False).double() if axis == 0 else nn.Linear(8, 6, bias=False).double()
    m = HeadSlicedLinear(linear, axis, 2, [1, 3])
    x = torch.randn(3, 2, linear.in_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, tr: torch.func.functional_call(m, {"trained": tr}, (x,)),
                                    (x, m.trained.detach().clone().requires_grad_()))
    torch.testing.assert_close(m(x), linear(x))

"""Server aggregation: RunningMean and the server optimizers, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedserver.strategy import (
    FedAdam,
    FedAdamW,
    FedAvg,
    FedYogi,
    RunningMean,
    UpdateMismatchError,
    make_strategy,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- RunningMean


def test_fedavg_weights_one_and_three() -> None:
    rm = RunningMean({"w": torch.zeros(2)})
    rm.add({"w": t(1.0, 2.0)}, weight=1)
    rm.add({"w": t(5.0, -2.0)}, weight=3)
    assert rm.count == 2 and rm.total_weight == 4.0
    # (1*[1, 2] + 3*[5, -2]) / 4 = [16, -4] / 4 = [4, -1]
    mean = rm.mean()
    assert_close(mean["w"], [4.0, -1.0])

    x = {"w": t(10.0, 10.0)}
    assert_close(FedAvg().apply(x, mean)["w"], [14.0, 9.0])
    # server_lr 0.5: [10, 10] + 0.5 * [4, -1] = [12, 9.5]
    assert_close(FedAvg(server_lr=0.5).apply(x, mean)["w"], [12.0, 9.5])


def test_add_and_add_slice_agree() -> None:
    g = torch.Generator().manual_seed(0)
    template = {
        "w": torch.zeros(3, 4),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "steps": torch.zeros(2, dtype=torch.int64),
        "empty": torch.zeros(0),
    }
    deltas = [
        {"w": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).bfloat16(), "empty": torch.zeros(0)}
        for _ in range(3)
    ]
    weights = [1.0, 2.5, 0.5]

    whole = RunningMean(template)
    for d, w in zip(deltas, weights):
        whole.add(d, w)

    chunked = RunningMean(template)
    for d, w in zip(deltas, weights):
        # Out of order and unevenly sized, as chunks may come after a resume.
        chunked.add_slice("w", 7, d["w"].reshape(-1)[7:], w)
        chunked.add_slice("b", 0, d["b"][:2], w)
        chunked.add_slice("w", 0, d["w"].reshape(-1)[:3], w)
        chunked.add_slice("b", 2, d["b"][2:], w)
        chunked.add_slice("w", 3, d["w"].reshape(-1)[3:7], w)
        assert chunked.pending
        chunked.finish_update()

    assert chunked.count == whole.count == 3
    assert chunked.total_weight == whole.total_weight == 4.0
    a, b = whole.mean(), chunked.mean()
    assert set(a) == {"w", "b", "empty"}  # the int tensor is not averaged
    for k in a:
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_running_mean_errors() -> None:
    rm = RunningMean({"w": torch.zeros(2, 2), "n": torch.zeros(1, dtype=torch.int32)})
    with pytest.raises(ValueError, match="no updates"):
        rm.mean()
    with pytest.raises(UpdateMismatchError, match="shape"):
        rm.add({"w": torch.zeros(4)}, 1.0)
    with pytest.raises(UpdateMismatchError, match="not in the model"):
        rm.add({"w": torch.zeros(2, 2), "extra": torch.zeros(1)}, 1.0)
    with pytest.raises(UpdateMismatchError, match="lacks"):
        rm.add({}, 1.0)
    with pytest.raises(UpdateMismatchError, match="NaN"):
        rm.add({"w": torch.tensor([[0.0, float("nan")], [0.0, 0.0]])}, 1.0)
    with pytest.raises(UpdateMismatchError, match="floating-point"):
        rm.add({"w": torch.zeros(2, 2, dtype=torch.int64)}, 1.0)
    with pytest.raises(ValueError, match="weight"):
        rm.add({"w": torch.zeros(2, 2)}, -1.0)
    assert rm.count == 0  # rejected updates were not folded

    with pytest.raises(UpdateMismatchError, match="outside"):
        rm.add_slice("w", 3, torch.zeros(2), 1.0)
    with pytest.raises(UpdateMismatchError, match="non-float"):
        rm.add_slice("n", 0, torch.zeros(1), 1.0)
    rm.add_slice("w", 0, torch.ones(3), 1.0)
    with pytest.raises(UpdateMismatchError, match="overlaps"):
        rm.add_slice("w", 2, torch.ones(2), 1.0)
    with pytest.raises(UpdateMismatchError, match="weight"):
        rm.add_slice("w", 3, torch.ones(1), 2.0)
    with pytest.raises(UpdateMismatchError, match="incomplete"):
        rm.finish_update()
    with pytest.raises(ValueError, match="pending"):
        rm.mean()
    rm.add_slice("w", 3, torch.ones(1), 1.0)
    rm.finish_update()
    assert_close(rm.mean()["w"].reshape(-1), [1.0, 1.0, 1.0, 1.0])

    zero = RunningMean({"w": torch.zeros(1)})
    zero.add({"w": t(1.0)}, 0.0)
    with pytest.raises(ValueError, match="total weight 0"):
        zero.mean()


# ---------------------------------------------------------------- strategies


def test_fedadam_two_rounds_by_hand() -> None:
    s = FedAdam(server_lr=0.1, beta1=0.5, beta2=0.5, tau=1.0)
    x0 = {"w": t(1.0, -2.0)}
    # v starts at tau^2 = 1, m at 0.
    # Round 1, Δ = [1, 7]:
    #   m1 = 0.5*0 + 0.5*[1, 7]          = [0.5, 3.5]
    #   v1 = 0.5*1 + 0.5*[1, 49]         = [1, 25]      -> sqrt = [1, 5]
    #   x1 = [1, -2] + 0.1*[0.5/(1+1), 3.5/(5+1)]
    x1 = s.apply(x0, {"w": t(1.0, 7.0)})
    e1 = [1.0 + 0.1 * 0.5 / 2.0, -2.0 + 0.1 * 3.5 / 6.0]
    assert_close(x1["w"], e1)
    # Round 2, Δ = [-1, 1]:
    #   m2 = 0.5*[0.5, 3.5] + 0.5*[-1, 1] = [-0.25, 2.25]
    #   v2 = 0.5*[1, 25] + 0.5*[1, 1]    = [1, 13]
    #   x2 = x1 + 0.1*[-0.25/(1+1), 2.25/(sqrt(13)+1)]
    x2 = s.apply(x1, {"w": t(-1.0, 1.0)})
    assert_close(x2["w"], [e1[0] + 0.1 * -0.25 / 2.0, e1[1] + 0.1 * 2.25 / (math.sqrt(13.0) + 1.0)])
    assert s.step == 2
    assert_close(x0["w"], [1.0, -2.0])  # the input was not modified


def test_fedyogi_two_rounds_by_hand() -> None:
    s = FedYogi(server_lr=0.1, beta1=0.5, beta2=0.5, tau=1.0)
    x0 = {"w": t(1.0, -2.0)}
    # Round 1, Δ = [1, 7], Δ² = [1, 49], v0 = [1, 1]:
    #   sign(v0 - Δ²) = [0, -1]
    #   v1 = v0 - 0.5*Δ²*sign = [1 - 0, 1 + 24.5] = [1, 25.5]
    #   m1 = [0.5, 3.5]
    #   x1 = [1, -2] + 0.1*[0.5/(1+1), 3.5/(sqrt(25.5)+1)]
    x1 = s.apply(x0, {"w": t(1.0, 7.0)})
    e1 = [1.0 + 0.1 * 0.5 / 2.0, -2.0 + 0.1 * 3.5 / (math.sqrt(25.5) + 1.0)]
    assert_close(x1["w"], e1)
    # Round 2, Δ = [-1, 1], Δ² = [1, 1]:
    #   sign(v1 - Δ²) = [0, +1]
    #   v2 = [1, 25.5 - 0.5*1] = [1, 25]  -> sqrt = [1, 5]
    #   m2 = 0.5*[0.5, 3.5] + 0.5*[-1, 1] = [-0.25, 2.25]
    #   x2 = x1 + 0.1*[-0.25/2, 2.25/6]
    x2 = s.apply(x1, {"w": t(-1.0, 1.0)})
    assert_close(x2["w"], [e1[0] - 0.1 * 0.25 / 2.0, e1[1] + 0.1 * 2.25 / 6.0])
    assert_close(s.state_dict()["v.w"], [1.0, 25.0])


def test_fedadamw_by_hand() -> None:
    s = FedAdamW(server_lr=0.1, beta1=0.5, beta2=0.5, tau=1.0, weight_decay=0.5)
    # Decay uses the pre-update x: x1 = (1 - 0.1*0.5) * x0 + 0.1 * m1/(sqrt(v1)+tau)
    #   x0 = [1, -2], Δ = [1, 7]: m1 = [0.5, 3.5], v1 = [1, 25]
    #   x1 = 0.95*[1, -2] + 0.1*[0.25, 3.5/6] = [0.95 + 0.025, -1.9 + 0.0583333]
    x1 = s.apply({"w": t(1.0, -2.0)}, {"w": t(1.0, 7.0)})
    assert_close(x1["w"], [0.95 + 0.025, -1.9 + 0.1 * 3.5 / 6.0])
    # Round 2, Δ = [-1, 1]: m2 = [-0.25, 2.25], v2 = [1, 13]
    x2 = s.apply(x1, {"w": t(-1.0, 1.0)})
    e1 = x1["w"].tolist()
    assert_close(
        x2["w"],
        [0.95 * e1[0] + 0.1 * -0.25 / 2.0, 0.95 * e1[1] + 0.1 * 2.25 / (math.sqrt(13.0) + 1.0)],
    )


def test_default_hyperparameters_and_initial_v() -> None:
    s = make_strategy("FedAdam")
    assert s.params() == {"server_lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    # One round from v = tau^2 with Δ = [0]: m stays 0, v = 0.99 * 1e-6.
    s.apply({"w": t(3.0)}, {"w": t(0.0)})
    torch.testing.assert_close(s.state_dict()["v.w"], t(0.99e-6))
    assert make_strategy("fedadamw").params()["weight_decay"] == 1e-2


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedadamw", "fedyogi"])
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) * 0.1 for k, v in x.items()} for _ in range(3)]

    first = make_strategy(name)
    x = first.apply(x, deltas[0])
    saved = first.state_dict()

    restarted = make_strategy(name)
    restarted.load_state_dict({k: v.clone() for k, v in saved.items()})
    assert restarted.step == 1
    xa, xb = x, x
    for d in deltas[1:]:
        xa = first.apply(xa, d)
        xb = restarted.apply(xb, d)
    for k in x:
        assert torch.equal(xa[k], xb[k])
    for k, v in first.state_dict().items():
        assert torch.equal(v, restarted.state_dict()[k])


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedyogi", "fedadamw"])
def test_bf16_globals_and_non_float_untouched(name: str) -> None:
    x = {
        "w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16),
        "pos": torch.tensor([0, 1, 2], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    delta = {"w": t(0.5, 0.25, -1.0)}
    s = make_strategy(name)
    new = s.apply(x, delta)
    assert list(new) == list(x)
    assert new["w"].dtype == torch.bfloat16
    assert torch.equal(new["pos"], x["pos"]) and new["pos"].dtype == torch.int64
    assert torch.equal(new["mask"], x["mask"])
    assert new["pos"].data_ptr() != x["pos"].data_ptr()  # a copy, not an alias
    # The moments are fp32 even for a bf16 model.
    for k, v in s.state_dict().items():
        if k != "step":
            assert v.dtype == torch.float32
    if name == "fedavg":
        # Computed in fp32, rounded once: [1.5, -1.75, -0.5] are exact in bf16.
        assert new["w"].tolist() == [1.5, -1.75, -0.5]


def test_apply_errors() -> None:
    s = FedAdam()
    x = {"w": torch.zeros(2), "n": torch.zeros(1, dtype=torch.int64)}
    with pytest.raises(UpdateMismatchError, match="shape"):
        s.apply(x, {"w": torch.zeros(3)})
    with pytest.raises(UpdateMismatchError, match="missing"):
        s.apply(x, {})
    with pytest.raises(UpdateMismatchError, match="unexpected"):
        s.apply(x, {"w": torch.zeros(2), "n": torch.zeros(1)})
    s.apply(x, {"w": torch.zeros(2)})
    with pytest.raises(UpdateMismatchError, match="optimizer state"):
        s.apply({"w": torch.zeros(5)}, {"w": torch.zeros(5)})
    with pytest.raises(ValueError, match="unexpected optimizer state"):
        s.load_state_dict({"step": torch.tensor(1), "q.w": torch.zeros(2)})


def test_make_strategy_names_and_params() -> None:
    assert isinstance(make_strategy("FEDYOGI"), FedYogi)
    assert isinstance(make_strategy("fedavg", server_lr=0.5), FedAvg)
    with pytest.raises(ValueError, match="fedavg, fedadam, fedadamw, fedyogi"):
        make_strategy("fedprox")
    with pytest.raises(ValueError, match="does not take 'lr'.*accepted: server_lr"):
        make_strategy("fedadam", lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        make_strategy("fedadam", weight_decay=0.1)
    with pytest.raises(ValueError, match="beta1"):
        make_strategy("fedadam", beta1=1.0)
    with pytest.raises(ValueError, match="server_lr"):
        make_strategy("fedavg", server_lr=0.0)

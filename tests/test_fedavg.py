"""FedAvg is the num-examples-weighted mean of each adapter tensor."""

from __future__ import annotations

import pytest
import torch

from fedlora.config import StrategySection
from fedlora.strategies import ClientUpdate, get_strategy
from fedlora.strategies.update_validation import update_problem


def test_fedavg_equals_hand_computed_weighted_mean():
    updates = [
        ClientUpdate(1, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}, num_examples=10),
        ClientUpdate(2, {"a": torch.tensor([4.0, -2.0]), "b": torch.tensor([[3.0]])}, num_examples=30),
        ClientUpdate(3, {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}, num_examples=60),
    ]
    out = get_strategy(StrategySection()).aggregate({}, updates)
    # a: (10*1 + 30*4 + 60*0)/100 = 1.3 ; (10*2 + 30*-2 + 0)/100 = -0.4 ; b: (0 + 90 + 60)/100 = 1.5
    assert torch.allclose(out["a"], torch.tensor([1.3, -0.4]), atol=1e-7)
    assert torch.allclose(out["b"], torch.tensor([[1.5]]), atol=1e-7)


def test_fedavg_of_identical_updates_is_that_update():
    t = torch.randn(5, 3)
    out = get_strategy(StrategySection()).aggregate({}, [ClientUpdate(i, {"t": t.clone()}, n) for i, n in enumerate([3, 7, 11])])
    assert torch.allclose(out["t"], t, atol=1e-6)


def test_unknown_strategy_names_the_known_ones():
    with pytest.raises(ValueError, match="strategy.name.*fedavg"):
        get_strategy(StrategySection(name="fedmagic"))


def test_update_validation_rejects_bad_updates():
    expected = {"a": torch.zeros(2, 2)}
    assert update_problem({"a": torch.ones(2, 2)}, expected) is None
    assert "non-finite" in update_problem({"a": torch.tensor([[float("nan"), 0], [0, 0]])}, expected)
    assert "shape" in update_problem({"a": torch.ones(3, 2)}, expected)
    assert "keys" in update_problem({"b": torch.ones(2, 2)}, expected)

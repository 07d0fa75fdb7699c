"""User-level (patient-level) DP: each user's whole contribution to a step is clipped."""

from __future__ import annotations

import pytest
import torch

from fedlora.client.local_training import DPPlan, privacy_units, train_locally
from fedlora.adapter_state import adapter_of, put_adapter
from fedlora.base_model import build_peft_model
from fedlora.config import load_config
from fedlora.text_data import Example

C = 1e-3  # small enough that every per-unit gradient is clipped


def clipped_sum(model, initial, examples, config) -> torch.Tensor:
    """Sum of the clipped per-unit gradients of one noiseless step with every unit in
    the batch: SGD with lr 1 moves the adapter by -sum / expected batch size."""
    put_adapter(model, initial)
    train_locally(model, examples, config, DPPlan(0.0, 1.0, 1), pad_id=0, seed=0)
    after = adapter_of(model)
    units = len(privacy_units(examples))
    return torch.cat([(initial[k] - after[k]).flatten() for k in sorted(initial)]) * units


@pytest.fixture
def setup(tiny_models):
    config = load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "train.optimizer": "sgd", "train.lr": 1.0,
        "train.local_steps": 1, "privacy.max_grad_norm": C, "privacy.user_max_records": 200,
    })
    model = build_peft_model(config.model, config.lora, num_labels=3, seed=0)
    return config, model, {k: v.clone() for k, v in adapter_of(model).items()}


def records(user: str | None, count: int, label: int) -> list[Example]:
    return [Example([101, 2000 + 7 * label, 2500 + label, 102], label, user) for _ in range(count)]


def test_a_user_with_100_records_moves_the_update_no_more_than_a_user_with_one(setup):
    config, model, initial = setup
    others = [e for u in range(5) for e in records(f"user-{u}", 1, u % 3)]
    heavy = records("patient-a", 100, 1)
    light = records("patient-b", 1, 2)

    base = clipped_sum(model, initial, others, config)
    heavy_effect = (clipped_sum(model, initial, others + heavy, config) - base).norm()
    light_effect = (clipped_sum(model, initial, others + light, config) - base).norm()
    assert heavy_effect <= C * (1 + 1e-4)
    assert light_effect <= C * (1 + 1e-4)
    assert heavy_effect > 0.9 * C  # clipped, not dropped

    # Example-level DP on the same data: each of patient A's records is its own unit.
    strip = [Example(e.input_ids, e.labels, None) for e in others + heavy]
    base_examples = [Example(e.input_ids, e.labels, None) for e in others]
    example_effect = (clipped_sum(model, initial, strip, config) - clipped_sum(model, initial, base_examples, config)).norm()
    assert example_effect > 50 * C  # what user-level DP protects against


def test_users_are_sampled_as_units(setup):
    config, _, _ = setup
    examples = records("a", 3, 0) + records("b", 2, 1) + records(None, 1, 2)[:0]
    assert sorted(map(len, privacy_units(examples))) == [2, 3]
    assert privacy_units(records(None, 4, 0)) == [[0], [1], [2], [3]]

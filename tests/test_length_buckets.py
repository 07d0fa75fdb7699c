"""Length-sorted micro-batches of a DP-SGD batch (client/length_buckets.py, privacy/
per_example_parts.py): a partition of the sampled rows, and exactly the same summed
clipped gradient (so the same step) as the batch padded as one."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizer

import fedlora.client.local_training as local_training
from fedlora.adapter_state import adapter_of
from fedlora.base_model import build_peft_model
from fedlora.client.length_buckets import length_sorted_parts
from fedlora.client.local_training import DPPlan, train_locally
from fedlora.config import load_config
from fedlora.privacy.per_example_parts import PerExampleParts
from fedlora.text_data import Example

UPPER = r".*encoder\.layer\.1\.attention\.self\.(query|value)$"


def test_parts_are_a_length_sorted_partition():
    lengths = [30, 7, 19, 7, 64, 12, 41, 25, 9, 50]
    for parts in (1, 2, 3, 4, 10, 25):
        groups = length_sorted_parts(lengths, parts)
        flat = [i for g in groups for i in g]
        assert sorted(flat) == list(range(len(lengths)))  # every row exactly once
        assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first, across groups
        assert len(groups) == min(parts, len(lengths))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert length_sorted_parts([], 4) == []
    with pytest.raises(ValueError, match="at least 1"):
        length_sorted_parts(lengths, 0)


def test_parts_put_back_are_one_batch_to_opacus():
    """Rows from three passes come back as one tensor in the order taken, so Opacus's
    DPOptimizer sees one pass (a list would divide the sum by the passes as well)."""
    p = torch.nn.Parameter(torch.zeros(2, 3))
    gathered = PerExampleParts([p])
    chunks = [torch.randn(n, 2, 3) for n in (3, 1, 4)]
    for chunk in chunks:
        p.grad_sample = chunk
        gathered.take()
        assert p.grad_sample is None
    gathered.put_back()
    torch.testing.assert_close(p.grad_sample, torch.cat(chunks), rtol=0, atol=0)
    optimizer = DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=8)
    assert optimizer.accumulated_iterations == 1


def _data(count: int, users: bool) -> list[Example]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(count):
        length = int(torch.randint(2, 22, (1,), generator=g))  # lengths 4-23: a padded batch wastes much
        ids = [101] + torch.randint(200, 900, (length,), generator=g).tolist() + [102]
        out.append(Example(ids, i % 3, unit=f"user-{i % 7}" if users else None))
    return out


@pytest.mark.parametrize("impl,users", [("fast", False), ("opacus", False), ("fast", True)])
def test_buckets_take_the_same_clipped_step_as_one_padded_batch(tiny_models, monkeypatch, impl, users):
    """The same Poisson sample (a seeded generator stands in for the secret one), no noise,
    a clipping norm that clips every row: one SGD step at lr 1 moves the adapter by the
    summed clipped gradient over the expected batch, and that is the same with the batch
    as one padded batch and as 1-row to 5-row length-sorted micro-batches."""
    data = _data(40, users)
    overrides = {"model.path": str(tiny_models["bert"]), "model.pooling": "mean", "lora.target_modules": UPPER,
                 "model.max_length": 24, "privacy.dp_impl": impl, "train.batch_size": 16, "train.lr": 1.0,
                 "privacy.max_grad_norm": 1e-3, **({"privacy.unit": "user"} if users else {})}
    steps = {}
    for buckets in (1, 3, 16):
        config = load_config(None, {**overrides, "train.length_buckets": buckets})
        model = build_peft_model(config.model, config.lora, num_labels=3, seed=0)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # dropout draws masks per micro-batch; the test compares exact gradients
        with torch.no_grad():  # a non-zero adapter, so both LoRA factors get gradients
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
        before = adapter_of(model)
        monkeypatch.setattr(local_training, "secret_generator", lambda device="cpu": torch.Generator(device=device).manual_seed(7))
        units = len({e.unit for e in data}) if users else len(data)
        plan = DPPlan(noise_multiplier=0.0, sample_rate=0.4, steps=1, unit="user" if users else "example", units=units)
        train_locally(model, data, config, plan, 0, seed=0)
        after = adapter_of(model)
        steps[buckets] = {k: after[k] - before[k] for k in before}
    assert any(v.abs().max() > 0 for v in steps[1].values())
    for buckets in (3, 16):
        for key, moved in steps[1].items():
            torch.testing.assert_close(steps[buckets][key], moved, rtol=1e-4, atol=1e-9)

"""The per-example invariant: before every DP step, each trainable parameter's
`grad_sample` has one row per sampled unit (rows, or users after merging; 0 for an
empty Poisson batch), on both per-sample-gradient paths.

The trap it guards against: a trainable nn.Linear that sees flattened tokens
([B*T, d], as MoE layers do) gets one `grad_sample` row per token from either path, and
Opacus's DPOptimizer would then clip per token, without any error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedlora.client.local_training import DPPlan, forward_logits, sequence_losses, train_locally
from fedlora.config import Config, PrivacySection, TrainSection
from fedlora.text_data import Example, collate
from fedlora.privacy.dp_sgd import (
    CheckedDPOptimizer,
    PerExampleError,
    check_at_most,
    check_per_example,
    grad_sample_rows,
    private_optimizer,
)
from fedlora.privacy.user_level import merge_rows_by_unit

IMPLS = ["fast", "opacus"]
B, T, D, CLASSES = 4, 5, 6, 3


class PerTokenLinear(nn.Module):
    """Applies its Linear to the tokens flattened to [B*T, d], as MoE expert layers do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        return self.proj(h.reshape(b * t, d)).reshape(b, t, d)


class Tiny(nn.Module):
    """Frozen embedding -> trainable mixing layer -> mean over tokens -> head, called
    like a Hugging Face classifier (keyword inputs, `.logits` out)."""

    def __init__(self, per_token: bool, train_head: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, D).requires_grad_(False)
        self.mix = PerTokenLinear(D) if per_token else nn.Linear(D, D)  # nn.Linear on [B, T, d]: per example
        self.head = nn.Linear(D, CLASSES).requires_grad_(train_head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> SimpleNamespace:
        h = torch.tanh(self.mix(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return SimpleNamespace(logits=self.head((h * mask).sum(1) / mask.sum(1)))


def examples(users: list[str | None]) -> list[Example]:
    return [Example([1 + (3 * i + j) % 19 for j in range(T)], i % CLASSES, u) for i, u in enumerate(users)]


def config(impl: str, unit: str = "example") -> Config:
    return Config(train=TrainSection(lr=0.5, local_steps=3),
                  privacy=PrivacySection(dp_impl=impl, unit=unit, max_grad_norm=1.0, user_max_records=16))


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def loss(forward_model: nn.Module, rows: list[Example]) -> torch.Tensor:
    batch = collate(rows, pad_id=0)
    return sequence_losses(forward_logits(forward_model, batch), batch["labels"], "classification").mean()


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_linear_stops_training_before_any_step(impl):
    model = Tiny(per_token=True, train_head=False)
    before = trainable(model)
    with pytest.raises(PerExampleError) as caught:
        train_locally(model, examples([None] * B), config(impl), DPPlan(1.0, 1.0, 3), pad_id=0, seed=0)
    message = str(caught.value)
    assert f"mix.proj.weight have leading dimension {B * T}, expected {B}" in message, message
    assert "\n" not in message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_trap_is_real_and_the_step_is_refused(impl):
    """Both paths do produce one row per token (so Opacus alone would clip per token);
    step() refuses before clipping, noising or updating anything."""
    model = Tiny(per_token=True, train_head=False)
    before = trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with private_optimizer(model, torch.optim.SGD(params, lr=1.0), 1.0, 1.0, B, impl=impl) as (fm, dp_optimizer):
        loss(fm, examples([None] * B)).backward()
        assert [grad_sample_rows(p) for p in dp_optimizer.params] == [B * T, B * T]  # weight, bias
        # Nothing declared (as in `fedlora bench dp`): bounded by the B rows fed to forward.
        with pytest.raises(PerExampleError, match=rf"mix\.proj\.weight have leading dimension {B * T}, expected at most {B} "):
            dp_optimizer.step()
        assert all(getattr(p, "summed_grad", None) is None for p in params)  # nothing was clipped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("impl", IMPLS)
def test_per_example_model_trains(impl):
    model = Tiny(per_token=False, train_head=True)
    before = trainable(model)
    result = train_locally(model, examples([None] * 8), config(impl), DPPlan(0.5, 0.5, 4), pad_id=0, seed=0)
    assert result.steps == 4 and changed(model, before)


def spy_on_declarations(monkeypatch) -> list[int]:
    declared: list[int] = []
    original = CheckedDPOptimizer.expect_units

    def expect_units(self, units: int) -> None:
        declared.append(units)
        original(self, units)

    monkeypatch.setattr(CheckedDPOptimizer, "expect_units", expect_units)
    return declared


@pytest.mark.parametrize("impl", IMPLS)
def test_user_level_merging_passes_the_check(impl, monkeypatch):
    """8 rows from 3 users, every user sampled: the loop merges rows into users and
    declares 3 units each step, which grad_sample then has exactly."""
    declared = spy_on_declarations(monkeypatch)
    model = Tiny(per_token=False, train_head=True)
    before = trainable(model)
    users = ["ann", "ann", "bob", "cy", "cy", "cy", "bob", "ann"]
    result = train_locally(model, examples(users), config(impl, unit="user"), DPPlan(0.5, 1.0, 2, unit="user"),
                           pad_id=0, seed=0)
    assert result.steps == 2 and changed(model, before)
    assert declared == [3, 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_declared_units_are_exact(impl):
    """Declared users but rows not merged: refused. Merged: passes. Without a declaration
    a merge still passes (fewer rows than fed to forward: bounded, not exact)."""
    model = Tiny(per_token=False, train_head=True)
    params = [p for p in model.parameters() if p.requires_grad]
    with private_optimizer(model, torch.optim.SGD(params, lr=1.0), 1.0, 1.0, 2, impl=impl) as (fm, dp_optimizer):
        loss(fm, examples([None] * B)).backward()
        dp_optimizer.expect_units(2)
        with pytest.raises(PerExampleError, match=rf"mix\.weight have leading dimension {B}, expected 2 "):
            dp_optimizer.step()
        merge_rows_by_unit(dp_optimizer.params, torch.tensor([0, 0, 1, 1]), 2)
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)

        loss(fm, examples([None] * B)).backward()
        merge_rows_by_unit(dp_optimizer.params, torch.tensor([0, 0, 1, 1]), 2)
        dp_optimizer.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_poisson_batches_pass_the_check(impl, monkeypatch):
    """Every batch empty (q tiny): noise-only steps, each checked against 0 units."""
    declared = spy_on_declarations(monkeypatch)
    model = Tiny(per_token=False, train_head=True)
    before = trainable(model)
    result = train_locally(model, examples([None] * B), config(impl), DPPlan(1.0, 1e-12, 3), pad_id=0, seed=0)
    assert result.steps == 3 and changed(model, before)  # moved by noise alone
    assert declared == [0, 0, 0]


def test_opacus_list_of_grad_samples_counts_all_rows():
    """Two backward passes before one step: Opacus keeps a list and concatenates it at
    step(); the check adds the rows up and counts both forwards."""
    model = Tiny(per_token=False, train_head=True)
    params = [p for p in model.parameters() if p.requires_grad]
    with private_optimizer(model, torch.optim.SGD(params, lr=1.0), 1.0, 1.0, B, impl="opacus") as (fm, dp_optimizer):
        loss(fm, examples([None] * B)).backward()
        loss(fm, examples([None] * 3)).backward()
        assert all(isinstance(p.grad_sample, list) for p in params)
        assert [grad_sample_rows(p) for p in params] == [B + 3] * len(params)
        dp_optimizer.step()
        with pytest.raises(PerExampleError, match="unknown"):  # the count was reset by step()
            dp_optimizer.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_forwards_without_grad_are_not_counted(impl):
    """An evaluation forward feeds no backward: counting its rows would let 1 example's
    5 per-token rows pass under a bound of 1 + 4."""
    model = Tiny(per_token=True, train_head=False)
    params = [p for p in model.parameters() if p.requires_grad]
    with private_optimizer(model, torch.optim.SGD(params, lr=1.0), 1.0, 1.0, 1, impl=impl) as (fm, dp_optimizer):
        loss(fm, examples([None])).backward()
        with torch.no_grad():
            loss(fm, examples([None] * 4))
        with pytest.raises(PerExampleError, match=rf"leading dimension {T}, expected at most 1 "):
            dp_optimizer.step()


def test_check_per_example_names_the_parameter_and_counts_only():
    p = nn.Parameter(torch.zeros(2, 2))
    p.grad_sample = [torch.full((3, 2, 2), 123.0), torch.full((2, 2, 2), 456.0)]
    check_per_example([("layer.weight", p)], 5)
    with pytest.raises(PerExampleError) as caught:
        check_per_example([("layer.weight", p)], 4)
    assert str(caught.value).startswith("per-example gradients of layer.weight have leading dimension 5, expected 4 ")
    assert "123" not in str(caught.value) and "456" not in str(caught.value)
    del p.grad_sample
    with pytest.raises(PerExampleError, match="no per-example gradients for trainable parameter layer.weight"):
        check_per_example([("layer.weight", p)], 4)


def test_check_at_most_requires_one_count_for_all_parameters():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad_sample, b.grad_sample = torch.zeros(3, 2), torch.zeros(3, 3)
    check_at_most([("a", a), ("b", b)], 4)
    with pytest.raises(PerExampleError, match="of a have leading dimension 3, expected at most 2 "):
        check_at_most([("a", a), ("b", b)], 2)
    b.grad_sample = torch.zeros(2, 3)
    with pytest.raises(PerExampleError, match="of b have leading dimension 2, expected 3 "):
        check_at_most([("a", a), ("b", b)], 4)

"""CheckedDPOptimizer's step (privacy/dp_sgd.py) runs Opacus's clip, sum, noise and scale
on one flat buffer instead of Opacus's per-parameter loops. Here it is compared with
stock `opacus.optimizers.DPOptimizer` on the same per-example gradients: without noise
the gradients handed to the optimizer agree to float rounding; with noise the difference
is Gaussian with Opacus's standard deviation, independent across values."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedlora.privacy.dp_sgd import CheckedDPOptimizer

SHAPES = [(16, 64), (64, 16), (6, 64), (6,), (3, 5, 7)]  # LoRA factors, a head with bias, an odd shape
UNITS = 9
CLIP = 0.7
EXPECTED_BATCH = 8


def params_with_grad_samples(seed: int, passes: int = 1) -> list[torch.nn.Parameter]:
    """Parameters holding per-example gradients: some units far above the clip, some
    below it; with passes > 1, Opacus's list of one tensor per backward pass."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.01, 0.05, 3.0, 0.2, 10.0, 0.001, 1.0, 0.02, 50.0])[:UNITS]
    params = []
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.zeros(shape))
        sample = torch.randn((UNITS, *shape), generator=generator) * scale.view(-1, *[1] * len(shape)) / len(SHAPES)
        p.grad_sample = list(sample.chunk(passes)) if passes > 1 else sample
        params.append(p)
    return params


def stepped_grads(optimizer_class: type, params: list[torch.nn.Parameter], noise: float, seed: int = 3,
                  units: int = UNITS) -> torch.Tensor:
    """The gradient each optimizer hands to SGD (clipped, summed, noised, scaled), flat."""
    kwargs = dict(noise_multiplier=noise, max_grad_norm=CLIP, expected_batch_size=EXPECTED_BATCH,
                  loss_reduction="mean", generator=torch.Generator().manual_seed(seed))
    sgd = torch.optim.SGD(params, lr=0.0)
    if optimizer_class is CheckedDPOptimizer:
        optimizer = CheckedDPOptimizer(sgd, names={}, **kwargs)
        optimizer.expect_units(units)
    else:
        optimizer = optimizer_class(sgd, **kwargs)
    seen = {}
    optimizer.step_hook = lambda opt: seen.update(grad=torch.cat([p.grad.flatten() for p in opt.params]).double())
    optimizer.step()
    return seen["grad"]


@pytest.mark.parametrize("passes", [1, 3])
def test_without_noise_the_flat_step_is_opacus_step(passes):
    stock = stepped_grads(DPOptimizer, params_with_grad_samples(0, passes), 0.0)
    flat = stepped_grads(CheckedDPOptimizer, params_with_grad_samples(0, passes), 0.0)
    # Some units are clipped (norm > CLIP) and some are not, so both branches count.
    per_unit = torch.cat([p.grad_sample.reshape(UNITS, -1) for p in params_with_grad_samples(0)], dim=1).norm(dim=1)
    assert (per_unit > CLIP).any() and (per_unit < CLIP).any()
    assert torch.allclose(flat, stock, rtol=1e-5, atol=1e-7)
    assert stock.abs().max() > 0


def test_with_noise_the_difference_is_gaussian_with_opacus_std():
    """Same clipped sum; the noise is N(0, (sigma*C)^2) per value before the division by the
    expected batch, so (flat - noiseless) * B / (sigma*C) is standard normal. Many values are
    needed for a tight check, so the parameters here are large."""
    sigma = 1.3
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(64, 512), (512, 64), (300,)]]

    def filled() -> list[torch.nn.Parameter]:
        generator = torch.Generator().manual_seed(5)  # the same per-example gradients every time
        for p in params:
            p.grad_sample = torch.randn((4, *p.shape), generator=generator)
        return params

    noiseless = stepped_grads(CheckedDPOptimizer, filled(), 0.0, units=4)
    noisy = stepped_grads(CheckedDPOptimizer, filled(), sigma, seed=11, units=4)
    z = (noisy - noiseless) * EXPECTED_BATCH / (sigma * CLIP)
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.std()) - 1.0) < 5 / math.sqrt(2 * n)
    # Independent across values, also across parameter boundaries (one flat draw, split).
    assert abs(float((z[1:] * z[:-1]).mean())) < 5 / math.sqrt(n)
    # And a different generator seed draws different noise.
    other = stepped_grads(CheckedDPOptimizer, filled(), sigma, seed=12, units=4)
    assert not torch.allclose(other, noisy)


def test_a_unit_with_a_non_finite_value_adds_nothing():
    params = params_with_grad_samples(1)
    without = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    for p, q in zip(params, without):
        q.grad_sample = p.grad_sample[:UNITS - 1].clone()
    params[2].grad_sample[UNITS - 1].view(-1)[0] = float("nan")
    params[4].grad_sample[UNITS - 1].view(-1)[1] = float("inf")
    stepped = stepped_grads(CheckedDPOptimizer, params, 0.0)

    def expected_without_last_unit() -> torch.Tensor:
        sgd = torch.optim.SGD(without, lr=0.0)
        optimizer = CheckedDPOptimizer(sgd, names={}, noise_multiplier=0.0, max_grad_norm=CLIP,
                                       expected_batch_size=EXPECTED_BATCH, loss_reduction="mean")
        optimizer.expect_units(UNITS - 1)
        optimizer.step()
        return torch.cat([p.grad.flatten() for p in without]).double()

    assert torch.isfinite(stepped).all()
    assert torch.allclose(stepped, expected_without_last_unit(), rtol=1e-6, atol=1e-9)


def test_parameters_of_two_dtypes_are_refused():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="several dtypes or devices"):
        CheckedDPOptimizer(torch.optim.SGD(params, lr=0.0), names={}, noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=1)

"""DP-SGD on a (cached) model with Opacus: per-sample gradients, clipping, noise.

`private_optimizer` attaches Opacus's per-sample-gradient hooks for the duration
of one local training run and always removes them afterwards, because a cached
model is privatized again by the next client (hooks cannot be attached twice).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

# The frozen base's inputs never require grad, so torch warns on every backward
# that Opacus's full backward hooks see only output gradients, which is all they need.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


@contextmanager
def private_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[GradSampleModule, DPOptimizer]]:
    """Yield (model with per-sample-gradient hooks, DP optimizer).

    The loss must be a mean over the batch of per-sequence losses; the DP optimizer
    clips each example's gradient over all trainable parameters to `max_grad_norm`,
    sums, adds N(0, (noise_multiplier * max_grad_norm)^2), and divides by the
    expected (not the realised) Poisson batch size, as Opacus does.
    """
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")  # hooks mode
    try:
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        yield gsm, dp_optimizer
    finally:
        gsm.to_standard_module()  # removes hooks and grad_sample attributes
        for p in model.parameters():
            p.grad = None


def mark_empty_batch(dp_optimizer: DPOptimizer) -> None:
    """An empty Poisson batch still takes an (accounted) noise-only step:
    give every parameter zero per-sample gradients so Opacus adds only noise."""
    for p in dp_optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

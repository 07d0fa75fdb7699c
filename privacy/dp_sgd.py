"""DP-SGD on a (cached) model: per-sample gradients, clipping, noise.

`private_optimizer` attaches per-sample-gradient hooks for the duration of one local
training run and always removes them afterwards, because a cached model is
privatized again by the next client (hooks cannot be attached twice).

Two ways to get per-sample gradients into `p.grad_sample`, chosen by `impl`:
"opacus" (Opacus's GradSampleModule, any layer type) and "fast" (privacy/
lora_grad_sample.py: tensor hooks on trainable nn.Linear layers only, i.e. LoRA
factors and a classifier head). "auto" takes "fast" when it covers every trainable
parameter, else Opacus for the whole model. Either way Opacus's DPOptimizer clips,
sums, noises and scales at `step()`, so the mathematics and the noise are Opacus's.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from privacy.lora_grad_sample import lora_grad_sample_hooks, uncovered_parameters

# The frozen base's inputs never require grad, so torch warns on every backward
# that Opacus's full backward hooks see only output gradients, which is all they need.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

log = logging.getLogger("fedlora.privacy")

DP_IMPLS = ("auto", "fast", "opacus")


def choose_impl(model: torch.nn.Module, impl: str = "auto") -> str:
    """"fast" or "opacus" for this model. "fast" on a model it does not cover is an
    error; "auto" falls back to Opacus and logs the parameters that need it."""
    if impl not in DP_IMPLS:
        raise ValueError(f"DP implementation must be one of {', '.join(DP_IMPLS)}, got {impl!r}")
    if impl == "opacus":
        return impl
    uncovered = uncovered_parameters(model)
    if not uncovered:
        return "fast"
    shown = ", ".join(uncovered[:5]) + (f" (+{len(uncovered) - 5} more)" if len(uncovered) > 5 else "")
    if impl == "fast":
        raise ValueError(f"the fast DP path covers only trainable nn.Linear layers; not: {shown}")
    log.info("DP-SGD via Opacus GradSampleModule: trainable parameters outside nn.Linear: %s", shown)
    return "opacus"


@contextmanager
def private_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> Iterator[tuple[torch.nn.Module, DPOptimizer]]:
    """Yield (model to run forward with, DP optimizer).

    The loss must be a mean over the batch of per-sequence losses. After backward every
    trainable parameter holds its per-example gradients in `p.grad_sample` ([B, *shape]);
    the DP optimizer's step() clips each example's gradient over all trainable parameters
    to `max_grad_norm`, sums, adds N(0, (noise_multiplier * max_grad_norm)^2), and divides
    by the expected (not the realised) Poisson batch size, as Opacus does.
    """
    chosen = choose_impl(model, impl)
    with ExitStack() as stack:
        if chosen == "fast":
            stack.enter_context(lora_grad_sample_hooks(model))
            forward_model = model
        else:
            forward_model = GradSampleModule(model, batch_first=True, loss_reduction="mean")  # hooks mode
            stack.callback(forward_model.to_standard_module)  # removes hooks and grad_sample attributes
        stack.callback(_clear_grads, model)
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        yield forward_model, dp_optimizer


def _clear_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        if hasattr(p, "summed_grad"):
            del p.summed_grad


def mark_empty_batch(dp_optimizer: DPOptimizer) -> None:
    """An empty Poisson batch still takes an (accounted) noise-only step:
    give every parameter zero per-sample gradients so Opacus adds only noise."""
    for p in dp_optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

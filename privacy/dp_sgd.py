"""DP-SGD on a (cached) model: per-sample gradients, clipping, noise.

`private_optimizer` attaches per-sample-gradient hooks for the duration of one local
training run and always removes them afterwards, because a cached model is
privatized again by the next client (hooks cannot be attached twice).

Two ways to get per-sample gradients into `p.grad_sample`, chosen by `impl`:
"opacus" (Opacus's GradSampleModule, any layer type) and "fast" (privacy/
lora_grad_sample.py: tensor hooks on trainable nn.Linear layers only, i.e. LoRA
factors and a classifier head). "auto" takes "fast" when it covers every trainable
parameter, else Opacus for the whole model. Either way Opacus's DPOptimizer runs
`step()`: clip, sum, noise, scale, in its order and with its formulas. Its per-parameter
loops (about ten kernels per trainable tensor) are replaced by the same arithmetic on one
flat [units, parameters] buffer (`CheckedDPOptimizer.clip_and_accumulate`), because on a GPU
those launches made the DP step launch-bound (docs/performance.md).

Clipping bounds one privacy unit's influence only if each row of `p.grad_sample` is one
unit's gradient. Both paths take the leading dimension of a layer's own input as the
batch, so a trainable Linear that sees flattened tokens ([B*T, d], as MoE layers do)
yields one row per token and would be clipped per token, silently. The optimizer
returned here therefore refuses to step (`PerExampleError`) unless every trainable
parameter's `grad_sample` has one row per sampled unit: exactly the count the training
loop declares each step, or, where none is declared, one count for all parameters that
is no larger than the rows fed to forward. A unit whose gradient rows hold any NaN or
inf gets clip factor 0: it adds nothing, where it would otherwise make the whole noised
step NaN exactly when it was sampled.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from fedlora.privacy.finite import clip_factors
from fedlora.privacy.lora_grad_sample import lora_grad_sample_hooks, uncovered_parameters

# The frozen base's inputs never require grad, so torch warns on every backward
# that Opacus's full backward hooks see only output gradients, which is all they need.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

log = logging.getLogger("fedlora.privacy")

DP_IMPLS = ("auto", "fast", "opacus")


class PerExampleError(ValueError):
    """Per-example gradients that are not one row per sampled unit. Clipping them would
    bound something other than one unit's contribution, so DP would not hold."""


def grad_sample_rows(p: torch.nn.Parameter) -> int | None:
    """The leading dimension of `p.grad_sample` (None if it has none). Opacus keeps a list
    after several backward passes and concatenates it at step(), so the rows add up."""
    samples = getattr(p, "grad_sample", None)
    if samples is None:
        return None
    if isinstance(samples, list):
        return sum(s.shape[0] for s in samples)
    return samples.shape[0]  # not len(): Tensor.__len__ is several times slower


def check_per_example(named_params: Iterable[tuple[str, torch.nn.Parameter]], units: int) -> None:
    """Raise PerExampleError unless every parameter holds exactly `units` per-example
    gradient rows. The message names the parameter and the counts, never a value."""
    for name, p in named_params:
        rows = grad_sample_rows(p)
        if rows != units:
            raise _mismatch(name, rows, str(units))


def check_at_most(named_params: list[tuple[str, torch.nn.Parameter]], bound: int) -> None:
    """All parameters hold the same number of per-example gradient rows, at most `bound`."""
    name, first = named_params[0]
    rows = grad_sample_rows(first)
    if rows is not None and rows > bound:
        raise _mismatch(name, rows, f"at most {bound}")
    check_per_example(named_params, bound if rows is None else rows)


def _mismatch(name: str, rows: int | None, expected: str) -> PerExampleError:
    if rows is None:
        return PerExampleError(f"no per-example gradients for trainable parameter {name} (expected {expected} rows)")
    return PerExampleError(
        f"per-example gradients of {name} have leading dimension {rows}, expected {expected} (one per sampled "
        "unit): a layer that flattens or mixes the batch (e.g. tokens as [B*T, d]) is clipped per row"
    )


def _leading_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Batch-first inputs: the leading dimension of the forward's first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class CheckedDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer that checks the per-example invariant at every step(), before
    anything is clipped or applied (`check_per_example`).

    Exact when the caller declares the step's sampled units (`expect_units`: users after
    merging rows, 0 for an empty Poisson batch), as the training loop does every step.
    Otherwise (the benchmark, direct use) the bound is the rows fed to the model's forward
    passes since the last step, counted by a forward pre-hook that `private_optimizer`
    attaches: every unit has at least one row, and merging rows into users between
    backward and step is legitimate, so all parameters must agree on one count no larger
    than that. Either way the count comes from the model's input, never from a layer's,
    which is what catches a per-token layer (B*T rows for B examples). It is reset at every
    step() and zero_grad(), so a stale count cannot carry over.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str], **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        if self.secure_mode:
            raise ValueError("secure_mode is not supported: fedlora seeds its noise generator from the OS (client/local_training.py secret_generator)")
        # The trainable parameters never change, so the named list and each one's span
        # in the flat buffer are built once.
        self._named = [(names.get(id(p), "<unnamed>"), p) for p in self.params]
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            raise ValueError(f"trainable parameters of several dtypes or devices {sorted(map(str, kinds))}: "
                             "DP-SGD needs one (adapters are kept fp32 on one device)")
        self._spans: list[tuple[int, int]] = []
        end = 0
        for p in self.params:
            self._spans.append((end, end + p.numel()))
            end += p.numel()
        self._summed_flat: torch.Tensor | None = None
        self._grad_flat: torch.Tensor | None = None
        self._reset_count()

    def _reset_count(self) -> None:
        self._declared_units: int | None = None
        self._forward_rows: int | None = 0  # None: a forward whose batch size was not found

    def expect_units(self, units: int) -> None:
        """Declare how many units this step sampled (rows merged into users: the users)."""
        self._declared_units = units

    def count_forward(self, rows: int | None) -> None:
        self._forward_rows = None if rows is None or self._forward_rows is None else self._forward_rows + rows

    def pre_step(self, closure: Any = None) -> bool:
        if self._declared_units is not None:
            check_per_example(self._named, self._declared_units)
        elif self._named:
            if not self._forward_rows:  # no counted forward since the last step
                raise PerExampleError("the number of sampled units of this step is unknown: call expect_units() before step()")
            check_at_most(self._named, self._forward_rows)
        self._reset_count()
        return super().pre_step(closure)

    # Opacus's clip_and_accumulate, add_noise and scale_grad, on one flat buffer. Same
    # formulas, in the same order; each parameter's summed_grad and grad are views into
    # the buffer. tests/test_dp_step_against_opacus.py compares the step with stock
    # Opacus's DPOptimizer, so an Opacus upgrade that changes it fails there first.

    def clip_and_accumulate(self) -> None:
        rows = []
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            sample = self._get_flat_grad_sample(p)  # Opacus's: a list of passes is concatenated
            rows.append(sample.reshape(sample.shape[0], p.numel()).to(p.dtype))
            _mark_as_processed(p.grad_sample)
        flat = torch.cat(rows, dim=1)  # [units, all trainable values], a copy of its own
        # A unit with a NaN or inf in any row gets factor 0; its values are zeroed in the
        # copy so that 0 times them is 0.
        factor = clip_factors(torch.linalg.vector_norm(flat, dim=1), self.max_grad_norm)
        summed = factor @ flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        for p, (start, end) in zip(self.params, self._spans):
            if p.summed_grad is not None:  # kept from a skipped step, as Opacus keeps it
                summed[start:end] += p.summed_grad.reshape(-1)
            p.summed_grad = summed[start:end].view_as(p)
        self._summed_flat = summed

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        summed = self._summed_flat
        std = self.noise_multiplier * self.max_grad_norm
        # Opacus's _generate_noise without secure_mode (refused above): N(0, std^2) per value.
        noise = torch.normal(0.0, std, size=summed.shape, device=summed.device, generator=self.generator) if std else 0.0
        self._grad_flat = summed + noise
        for p, (start, end) in zip(self.params, self._spans):
            p.grad = self._grad_flat[start:end].view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            self._grad_flat.div_(self.expected_batch_size * self.accumulated_iterations)

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        self._grad_flat = None  # each p.grad, if kept, still holds its view
        if not self._is_last_step_skipped:
            self._summed_flat = None
        self._reset_count()


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
) -> Iterator[tuple[torch.nn.Module, CheckedDPOptimizer]]:
    """Yield (model to run forward with, DP optimizer).

    The loss must be a mean over the batch of per-sequence losses. After backward every
    trainable parameter holds its per-example gradients in `p.grad_sample` ([B, *shape]);
    the DP optimizer's step() clips each example's gradient over all trainable parameters
    to `max_grad_norm`, sums, adds N(0, (noise_multiplier * max_grad_norm)^2), and divides
    by the expected (not the realised) Poisson batch size, as Opacus does. Before that,
    step() checks that each `grad_sample` has one row per sampled unit (CheckedDPOptimizer):
    exactly the units declared with `expect_units`, else no more than the rows fed to forward.
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
        dp_optimizer = CheckedDPOptimizer(
            optimizer,
            names={id(p): name for name, p in model.named_parameters()},
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )

        def count_rows(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if torch.is_grad_enabled():  # an evaluation forward feeds no backward
                dp_optimizer.count_forward(_leading_rows(args, kwargs))

        # On `model` itself: GradSampleModule.forward calls it, so both paths count.
        stack.callback(model.register_forward_pre_hook(count_rows, with_kwargs=True).remove)
        yield forward_model, dp_optimizer


def _clear_grads(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
        if hasattr(p, "summed_grad"):
            del p.summed_grad


def mark_empty_batch(dp_optimizer: CheckedDPOptimizer) -> None:
    """An empty Poisson batch still takes an (accounted) noise-only step:
    give every parameter zero per-sample gradients so Opacus adds only noise."""
    for p in dp_optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    dp_optimizer.expect_units(0)

"""Per-example gradients of LoRA (and other trainable nn.Linear) layers, without Opacus's
GradSampleModule.

For a Linear y = x W^T + b, example i's weight gradient is sum_t g_it x_it^T, where x is
the layer's input and g the gradient of the loss at its output. For LoRA both factors
are small in the low-rank dimension (lora_A: [r, in], lora_B: [out, r]), so this is
about as cheap as the ordinary weight gradient. A forward hook keeps the input (autograd
keeps it anyway for the weight gradient, so no extra memory) and puts a tensor hook on
the output; when backward reaches the output, the hook forms the per-example gradient
with one batched matmul over tokens and stores it in `p.grad_sample`, exactly where Opacus
would. Clipping and noise happen at `step()` in privacy/dp_sgd.py's DPOptimizer (Opacus's
formulas on one flat buffer, compared with stock Opacus in the tests), and whatever
rewrites `p.grad_sample` between backward and step (user-level DP merges rows per user)
is honoured.

Compared with GradSampleModule this avoids full module backward hooks (which wrap every
hooked layer's inputs and outputs in extra autograd nodes), scales the small
per-example result instead of the full output gradient for a mean loss, and skips
Opacus's per-call bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def uncovered_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters the fast path cannot handle: those not owned by
    exactly one plain nn.Linear (LayerNorm, embeddings, Conv1D, tied weights, ...)."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    uncovered = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        mods = owners.get(id(p), [])
        if len(mods) != 1 or type(mods[0]) is not nn.Linear:  # a subclass may compute something else
            uncovered.append(name)
    return uncovered


def trainable_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear and any(p.requires_grad for p in m.parameters(recurse=False))]


class _Pass:
    """Counts forward passes, so a second backward before `step()` (gradient
    accumulation, which Poisson sampling forbids as in Opacus) is caught."""

    def __init__(self) -> None:
        self.number = 0


def _store(p: nn.Parameter, grad_sample: torch.Tensor, pass_number: int) -> None:
    if getattr(p, "grad_sample", None) is not None:
        if getattr(p, "_fast_dp_pass", None) != pass_number:
            raise ValueError(
                "Poisson sampling is not compatible with grad accumulation: call the DP optimizer's step() "
                "after every forward/backward pass"
            )
        p.grad_sample = p.grad_sample + grad_sample  # the layer ran twice in one forward (shared module)
    else:
        p.grad_sample = grad_sample
    p._fast_dp_pass = pass_number


def _per_example_grads(layer: nn.Linear, x: torch.Tensor, grad_out: torch.Tensor, batch_size: int, pass_number: int) -> None:
    """Example i's gradient of the batch-mean loss, times the batch size (Opacus's
    `loss_reduction="mean"`), for the layer's weight and bias."""
    n = grad_out.shape[0]
    grad_out = grad_out.detach().reshape(n, -1, grad_out.shape[-1])  # [B, tokens, out]
    weight, bias = layer.weight, layer.bias
    if weight.requires_grad:
        # [B, tokens, out]^T x [B, tokens, in] -> [B, out, in]: one batched matmul over the
        # tokens, in the activations' dtype, then the parameter's (fp32 adapters on a bf16
        # base). bmm itself, not einsum: einsum's planning costs host time on every layer.
        g = torch.bmm(grad_out.transpose(1, 2), x.to(grad_out.dtype).reshape(n, -1, x.shape[-1]))
        _store(weight, g.to(weight.dtype).mul_(batch_size), pass_number)
    if bias is not None and bias.requires_grad:
        _store(bias, grad_out.sum(dim=1).to(bias.dtype).mul_(batch_size), pass_number)


@contextmanager
def lora_grad_sample_hooks(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Attach the per-example-gradient hooks to every trainable nn.Linear of `model`
    (batch first), yield the hooked parameters, and always remove the hooks and any
    `grad_sample` left behind on exit. The caller checks `uncovered_parameters` first."""
    layers = trainable_linears(model)
    current = _Pass()

    def new_pass(_module: nn.Module, _args: tuple) -> None:
        current.number += 1

    def capture(layer: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        # Under no_grad (evaluation, or the first pass of reentrant activation
        # checkpointing) there is nothing to differentiate; the recomputation is hooked.
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        x = inputs[0].detach()
        pass_number = current.number
        output.register_hook(lambda grad: _per_example_grads(layer, x, grad, x.shape[0], pass_number))

    handles = [model.register_forward_pre_hook(new_pass)]
    handles += [layer.register_forward_hook(capture) for layer in layers]
    params = [p for layer in layers for p in layer.parameters(recurse=False) if p.requires_grad]
    try:
        yield params
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            for attr in ("grad_sample", "_fast_dp_pass"):
                if hasattr(p, attr):
                    delattr(p, attr)

"""The fast LoRA DP path (privacy/lora_grad_sample.py) against Opacus's GradSampleModule:
same per-example gradient norms, same clipped sum, same noised gradient (same noise
generator seed), on tiny Llama, GPT-2 and BERT models with padded batches of varying
lengths, for causal LM and classification."""

from __future__ import annotations

import logging

import pytest
import torch

from fedlora.client.local_training import forward_logits, sequence_losses
from fedlora.client.model_cache import cached_model
from fedlora.config import Config, DataSection, LoraSection, ModelSection
from fedlora.text_data import collate, encode
from fedlora.privacy.dp_sgd import choose_impl, mark_empty_batch, private_optimizer
from fedlora.privacy.user_level import merge_rows_by_unit
from tests.helpers.causal_lm import ROWS as DP_TRAINING_ROWS

ROWS = [*DP_TRAINING_ROWS, {"prompt": "knee swelling after a run", "response": "orthopedics"}]  # lengths vary
CASES = [("llama", "causal-lm"), ("gpt2", "causal-lm"), ("bert", "classification")]


def setup(tiny_models, kind: str, task: str, seed: int = 1):
    """The cached tiny model with random (non-zero) adapter values and a padded batch."""
    config = Config(
        model=ModelSection(path=str(tiny_models[kind]), task=task, max_length=32),
        data=DataSection(labels=["a", "b", "c"] if task == "classification" else []),
        lora=LoraSection(rank=4, alpha=8, target_modules="auto"),
    )
    cached = cached_model(config, config.data.labels)
    torch.manual_seed(seed)
    for p in cached.model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    rows = [{"text": r["prompt"] + " " + r["response"], "label": "abc"[i % 3], **r} for i, r in enumerate(ROWS)]
    examples = encode(rows, cached.tokenizer, config, config.data.labels, "rows")
    batch = collate(examples, cached.tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
    cached.model.train()
    return cached.model, batch


def dp_step(model, batch, task: str, impl: str, noise: float, clip: float, merge=None, empty: bool = False):
    """One DP step; returns (per-example norms after backward, the gradient handed to
    the optimizer, i.e. clipped + noised + scaled, flattened)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    out = {}
    with private_optimizer(model, optimizer, noise, clip, expected_batch_size=4,
                           generator=torch.Generator().manual_seed(7), impl=impl) as (forward_model, dp_optimizer):
        assert (forward_model is model) == (impl == "fast")
        if empty:
            mark_empty_batch(dp_optimizer)
        else:
            sequence_losses(forward_logits(forward_model, batch), batch["labels"], task).mean().backward()
            if merge is not None:
                merge_rows_by_unit(dp_optimizer.params, *merge)
            samples = [p.grad_sample for p in dp_optimizer.params]
            n = len(samples[0])
            out["norms"] = torch.sqrt(sum((g.double().reshape(n, -1) ** 2).sum(dim=1) for g in samples))
        dp_optimizer.step_hook = lambda opt: out.update(grad=torch.cat([p.grad.flatten() for p in opt.params]).double())
        dp_optimizer.step()
        dp_optimizer.zero_grad(set_to_none=True)
    return out.get("norms"), out["grad"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind,task", CASES)
def test_fast_path_matches_opacus(tiny_models, kind, task):
    model, batch = setup(tiny_models, kind, task)
    assert choose_impl(model) == "fast"
    norms, _ = dp_step(model, batch, task, "opacus", noise=0.0, clip=1e9)
    fast_norms, _ = dp_step(model, batch, task, "fast", noise=0.0, clip=1e9)
    assert torch.allclose(fast_norms, norms, rtol=1e-5, atol=0), (kind, fast_norms, norms)

    clip = float(norms.median())  # about half the examples are clipped
    assert (norms > clip).any() and (norms < clip).any()
    for noise in (0.0, 1.3):  # the clipped sum alone, then with the same noise draws
        _, grad = dp_step(model, batch, task, "opacus", noise, clip)
        _, fast_grad = dp_step(model, batch, task, "fast", noise, clip)
        assert rel(fast_grad, grad) < 1e-5, (kind, noise, rel(fast_grad, grad))
    assert rel(grad, dp_step(model, batch, task, "opacus", 0.0, clip)[1]) > 1e-2, "the noise must matter"


def test_classifier_head_is_covered_and_clipped_with_the_adapter(tiny_models):
    """BERT classification: the head (PEFT modules_to_save, weight and bias) is part of
    the one per-example norm; dropping it would change the clip factors."""
    model, batch = setup(tiny_models, "bert", "classification")
    head = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    assert any(n.endswith("bias") for n in head) and any(n.endswith("weight") for n in head)
    norms, grad = dp_step(model, batch, "classification", "fast", 0.0, 0.5)
    head_params = {id(p) for n, p in model.named_parameters() if n in head}
    for p in model.parameters():
        if id(p) in head_params:
            p.requires_grad_(False)
    try:
        lora_only, _ = dp_step(model, batch, "classification", "fast", 0.0, 0.5)
    finally:
        for p in model.parameters():
            if id(p) in head_params:
                p.requires_grad_(True)
    assert (norms > lora_only + 1e-6).all()


def test_user_rows_merged_after_backward_and_empty_batches(tiny_models):
    """The loop rewrites p.grad_sample between backward and step (user-level DP); the
    fast path clips whatever it then holds, as Opacus does. An empty batch is noise only."""
    model, batch = setup(tiny_models, "llama", "causal-lm")
    merge = (torch.tensor([0, 0, 1, 2, 2, 2]), 3)
    norms, grad = dp_step(model, batch, "causal-lm", "opacus", 1.0, 0.3, merge=merge)
    fast_norms, fast_grad = dp_step(model, batch, "causal-lm", "fast", 1.0, 0.3, merge=merge)
    assert norms.shape == (3,) and torch.allclose(fast_norms, norms, rtol=1e-5, atol=0)
    assert rel(fast_grad, grad) < 1e-5
    _, noise_only = dp_step(model, batch, "causal-lm", "opacus", 1.0, 0.3, empty=True)
    _, fast_noise_only = dp_step(model, batch, "causal-lm", "fast", 1.0, 0.3, empty=True)
    assert torch.equal(fast_noise_only, noise_only) and noise_only.abs().sum() > 0


def test_hooks_removed_on_exit_and_accumulation_refused(tiny_models):
    model, batch = setup(tiny_models, "gpt2", "causal-lm")
    params = [p for p in model.parameters() if p.requires_grad]
    with private_optimizer(model, torch.optim.SGD(params, lr=0.1), 1.0, 1.0, 4, impl="fast") as (fm, dp_optimizer):
        sequence_losses(forward_logits(fm, batch), batch["labels"], "causal-lm").mean().backward()
        assert all(p.grad_sample.shape == (len(ROWS), *p.shape) for p in dp_optimizer.params)
        with pytest.raises(ValueError, match="grad accumulation"):
            sequence_losses(forward_logits(fm, batch), batch["labels"], "causal-lm").mean().backward()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m)
    for p in model.parameters():
        assert p.grad is None and not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_fast_dp_pass"))
    # The cached model can be privatized again, either way.
    for impl in ("fast", "opacus", "fast"):
        assert dp_step(model, batch, "causal-lm", impl, 0.0, 1.0)[0].shape == (len(ROWS),)


def test_uncovered_parameters_fall_back_to_opacus(tiny_models, caplog):
    model, batch = setup(tiny_models, "llama", "causal-lm")
    norm = model.base_model.model.model.norm.weight  # a trainable RMSNorm is not an nn.Linear
    norm.requires_grad_(True)
    try:
        with caplog.at_level(logging.INFO, logger="fedlora.privacy"):
            assert choose_impl(model, "auto") == "opacus"
        assert "model.norm.weight" in caplog.text
        with pytest.raises(ValueError, match="model.norm.weight"):
            choose_impl(model, "fast")
        norms, _ = dp_step(model, batch, "causal-lm", "opacus", 0.0, 1e9)
        assert norms.shape == (len(ROWS),)
    finally:
        norm.requires_grad_(False)
    assert choose_impl(model, "auto") == "fast"


@pytest.mark.parametrize("kind,task", [("llama", "causal-lm"), ("bert", "classification")])
def test_activation_checkpointing_gives_the_same_per_example_norms(tiny_models, kind, task):
    """Reentrant checkpointing recomputes each layer's forward during backward; the
    hooks skip the no-grad first pass and capture the recomputation."""
    model, batch = setup(tiny_models, kind, task)
    plain_norms, plain_grad = dp_step(model, batch, task, "fast", 0.0, 0.5)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()  # reentrant checkpoints only backprop into inputs that require grad
    try:
        assert base.is_gradient_checkpointing
        for impl in ("fast", "opacus"):
            norms, grad = dp_step(model, batch, task, impl, 0.0, 0.5)
            assert torch.allclose(norms, plain_norms, rtol=1e-5, atol=0), (impl, norms, plain_norms)
            assert rel(grad, plain_grad) < 1e-5
    finally:
        base.gradient_checkpointing_disable()
        base.disable_input_require_grads()

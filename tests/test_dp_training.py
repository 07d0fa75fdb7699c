"""DP-SGD on LoRA: per-example gradients are truly per example, and a tiny causal LM
loaded from disk trains under DP with loss on response tokens only."""

from __future__ import annotations

import torch

from fedlora.client.local_training import DPPlan, forward_logits, sequence_losses, train_locally
from fedlora.client.model_cache import cached_model
from fedlora.adapter_state import adapter_of
from fedlora.config import Config, DataSection, LoraSection, ModelSection
from fedlora.text_data import IGNORE_INDEX, collate, encode
from fedlora.privacy.dp_sgd import private_optimizer
from tests.helpers.causal_lm import ROWS, causal_config


def test_prompt_tokens_carry_no_loss(tiny_models):
    config = causal_config(tiny_models["llama"])
    cached = cached_model(config, [])
    examples = encode(ROWS, cached.tokenizer, config, [], "rows")
    prompt_len = len(cached.tokenizer(ROWS[0]["prompt"], add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert examples[0].labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert all(t != IGNORE_INDEX for t in examples[0].labels[prompt_len:])

    batch = collate(examples, cached.tokenizer.pad_token_id)
    logits = forward_logits(cached.model, batch)
    losses = sequence_losses(logits, batch["labels"], "causal-lm")
    # Independent computation: mean next-token NLL over each row's response tokens only.
    for i, e in enumerate(examples):
        logp = torch.log_softmax(logits[i].float(), dim=-1)
        terms = [-logp[t - 1, e.labels[t]] for t in range(1, len(e.labels)) if e.labels[t] != IGNORE_INDEX]
        assert torch.allclose(losses[i], torch.stack(terms).mean(), atol=1e-5)


def test_tiny_llama_trains_under_dp_from_a_saved_folder(tiny_models):
    config = causal_config(tiny_models["llama"])
    cached = cached_model(config, [])
    examples = encode(ROWS * 8, cached.tokenizer, config, [], "rows")
    before = adapter_of(cached.model)
    result = train_locally(cached.model, examples, config, DPPlan(noise_multiplier=0.5, sample_rate=0.2, steps=3),
                           cached.tokenizer.pad_token_id, seed=0)
    after = adapter_of(cached.model)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.loss))
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k), "LoRA B must have moved"
    # Hooks are removed afterwards, so the cached model can be privatized again.
    assert not any(hasattr(p, "grad_sample") for p in cached.model.parameters())
    train_locally(cached.model, examples, config, DPPlan(0.5, 0.2, 1), cached.tokenizer.pad_token_id, seed=1)


def test_per_example_gradient_norms_match_a_per_example_loop(tiny_models):
    """With padding and different lengths, each example's gradient (over all LoRA
    parameters) under Opacus equals the gradient of that example alone."""
    for kind, task in (("llama", "causal-lm"), ("bert", "classification"), ("gpt2", "causal-lm")):
        config = Config(
            model=ModelSection(path=str(tiny_models[kind]), task=task, max_length=32),
            data=DataSection(labels=["a", "b", "c"] if task == "classification" else []),
            lora=LoraSection(rank=4, alpha=8),
        )
        labels = config.data.labels
        cached = cached_model(config, labels)
        model = cached.model
        torch.manual_seed(1)
        for name, p in model.named_parameters():  # non-zero B so every LoRA factor has a gradient
            if p.requires_grad:
                p.data.normal_(0, 0.2)
        rows = [{"text": r["prompt"] + " " + r["response"], "label": "abc"[i % 3], **r} for i, r in enumerate(ROWS)]
        examples = encode(rows, cached.tokenizer, config, labels, "rows")
        assert len({len(e.input_ids) for e in examples}) > 1, "lengths must differ so padding is exercised"
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()  # Opacus records activations in train mode; the tiny models have no dropout

        loop_norms = []
        for e in examples:
            model.zero_grad()
            batch = collate([e], cached.tokenizer.pad_token_id)
            sequence_losses(forward_logits(model, batch), batch["labels"], task).mean().backward()
            loop_norms.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
        model.zero_grad()

        optimizer = torch.optim.SGD(params, lr=0.0)
        with private_optimizer(model, optimizer, noise_multiplier=0.0, max_grad_norm=1e9, expected_batch_size=len(examples)) as (gsm, _):
            batch = collate(examples, cached.tokenizer.pad_token_id)
            sequence_losses(forward_logits(gsm, batch), batch["labels"], task).mean().backward()
            per_example = torch.sqrt(sum((p.grad_sample.double().reshape(len(examples), -1) ** 2).sum(dim=1) for p in params))
        assert torch.allclose(per_example, torch.stack(loop_norms), rtol=1e-4), (kind, per_example, loop_norms)


def test_fedprox_term_is_added_after_dp_clipping_and_noise(tiny_models):
    """Plain SGD, no noise, q = 1 (deterministic). Two steps with lr*mu = 1 must give
    w2 = w1 - lr*g(w1) - (w1 - w0) = w0 - lr*g(w1), where lr*g(w1) is measured
    independently by one mu = 0 step from w1. A proximal term fed through Opacus's
    per-sample hooks would be dropped or clipped and fail this."""
    from fedlora.adapter_state import put_adapter

    config = causal_config(tiny_models["llama"])
    config.train.optimizer, config.train.lr = "sgd", 0.5
    cached = cached_model(config, [])
    examples = encode(ROWS * 4, cached.tokenizer, config, [], "rows")
    torch.manual_seed(3)
    for name, p in cached.model.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    pad = cached.tokenizer.pad_token_id
    w0 = adapter_of(cached.model)

    def run(start, steps: int, mu: float):
        put_adapter(cached.model, start)
        config.train.prox_mu = mu
        train_locally(cached.model, examples, config, DPPlan(0.0, 1.0, steps), pad, seed=0)
        return adapter_of(cached.model)

    try:
        w1 = run(w0, 1, 0.0)  # at the anchor the proximal gradient is zero
        step_at_w1 = {k: w1[k] - v for k, v in run(w1, 1, 0.0).items()}  # = lr * g(w1)
        w2 = run(w0, 2, 1.0 / config.train.lr)
    finally:
        config.train.prox_mu = 0.0
    for k in w0:
        assert torch.allclose(w2[k], w0[k] - step_at_w1[k], atol=1e-5), k
    assert any(not torch.allclose(w2[k], w1[k] - step_at_w1[k], atol=1e-5) for k in w0), "mu must matter"

"""The GPU settings on the real training path, checked on CPU: a bf16 base with fp32
adapters, reentrant activation checkpointing under DP, and the device choice."""

from __future__ import annotations

import pytest
import torch

from fedlora.client.local_training import DPPlan, train_locally
from fedlora.client.model_cache import cached_model
from fedlora.adapter_state import adapter_of
from fedlora.base_model import ModelError, resolve_device
from fedlora.config import load_config
from fedlora.text_data import Example


@pytest.mark.parametrize("kind, task", [("llama", "causal-lm"), ("bert", "classification")])
def test_bf16_base_fp32_adapter_and_checkpointing_train_under_dp(tiny_models, kind, task):
    config = load_config(None, {
        "model.path": str(tiny_models[kind]), "model.task": task, "model.dtype": "bfloat16", "data.labels": ["a", "b", "c"],
        "train.gradient_checkpointing": True, "train.device": "cpu", "train.local_steps": 2, "train.lr": 0.5,
    })
    cached = cached_model(config, config.data.labels)
    model = cached.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # adapters (and a head) in fp32
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)  # the base in bf16
    assert model.get_base_model().is_gradient_checkpointing

    examples = [Example([101, 2000 + i, 2001 + i, 102], i % 3 if task == "classification" else [101, 2000 + i, 2001 + i, 102])
                for i in range(32)]
    before = adapter_of(model)
    result = train_locally(model, examples, config, DPPlan(noise_multiplier=0.5, sample_rate=0.5, steps=2), pad_id=0, seed=0)
    after = adapter_of(model)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.loss))
    changed = [k for k in after if "lora_B" in k and not torch.equal(before[k], after[k])]
    assert changed, "DP training with checkpointing must reach the LoRA layers"
    assert all(torch.isfinite(v).all() for v in after.values())


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="train.device = 'cuda'"):
            resolve_device("cuda")

"""The tripwire for silent no-op training (opacus #820): when the optimizer's steps do
not reach the model's own parameters, the site fails with a clear error instead of
replying with the adapter it was sent while its ledger accrues epsilon."""

from __future__ import annotations

import pytest
import torch

import fedlora.client.local_training as local_training
from fedlora.client.local_training import DPPlan, NoOpTrainingError, train_locally
from fedlora.client.model_cache import cached_model
from fedlora.client.reply_guard import error_category
from fedlora.adapter_state import adapter_of
from fedlora.text_data import encode
from tests.helpers.causal_lm import ROWS, causal_config


def frozen_adapter_optimizer(make_optimizer):
    """An optimizer that steps, then puts every parameter back: the adapter is frozen,
    as in the no-op failure, while the loop runs and DP noise is drawn as usual."""
    def make(params, config):
        optimizer = make_optimizer(params, config)
        start = [p.detach().clone() for p in params]

        def restore(_optimizer, _args, _kwargs):
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
        optimizer.register_step_post_hook(restore)
        return optimizer
    return make


@pytest.mark.parametrize("dp", [True, False])
def test_a_frozen_adapter_trips_the_wire(tiny_models, monkeypatch, dp):
    config = causal_config(tiny_models["llama"])
    cached = cached_model(config, [])
    examples = encode(ROWS * 8, cached.tokenizer, config, [], "rows")
    plan = DPPlan(noise_multiplier=0.5, sample_rate=0.2, steps=3) if dp else None
    monkeypatch.setattr(local_training, "make_optimizer", frozen_adapter_optimizer(local_training.make_optimizer))
    before = adapter_of(cached.model)
    with pytest.raises(NoOpTrainingError, match="no trainable tensor changed") as info:
        train_locally(cached.model, examples, config, plan, cached.tokenizer.pad_token_id, seed=0)
    assert all(torch.equal(before[k], v) for k, v in adapter_of(cached.model).items())
    # It leaves the site as a fixed category, never as free text.
    assert error_category(info.value) == "model error"


def test_real_training_passes_the_wire(tiny_models):
    config = causal_config(tiny_models["llama"])
    cached = cached_model(config, [])
    examples = encode(ROWS * 8, cached.tokenizer, config, [], "rows")
    before = adapter_of(cached.model)
    train_locally(cached.model, examples, config, DPPlan(noise_multiplier=0.5, sample_rate=0.2, steps=3),
                  cached.tokenizer.pad_token_id, seed=0)
    assert any(not torch.equal(before[k], v) for k, v in adapter_of(cached.model).items())

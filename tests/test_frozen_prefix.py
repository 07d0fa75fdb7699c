"""Frozen lower layers kept per example (client/frozen_prefix.py): the same logits and the
same per-example gradients as the full model, the lower layers run once per example,
and no prefix where the lower layers can change (LoRA there, trainable or frozen)."""

from __future__ import annotations


import pytest
import torch

from fedlora.base_model import build_peft_model
from fedlora.client.frozen_prefix import frozen_prefix
from fedlora.client.local_evaluation import evaluate_locally
from fedlora.client.local_training import forward_logits, frozen, train_locally
from fedlora.adapter_state import adapter_of
from fedlora.config import load_config
from fedlora.text_data import Example, collate

UPPER = r".*encoder\.layer\.1\.attention\.self\.(query|value)$"


def model_and_config(path: str, targets: str, pooling: str = "mean", **extra):
    config = load_config(None, {"model.path": path, "model.pooling": pooling, "lora.target_modules": targets,
                                "model.max_length": 24, **extra})
    model = build_peft_model(config.model, config.lora, num_labels=3, seed=0)
    with torch.no_grad():  # a non-zero adapter, so the upper layers' LoRA matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model, config


def examples(count: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = [101] + torch.randint(200, 900, (length,), generator=g).tolist() + [102]
        out.append(Example(ids, i % 3))
    return out


def assert_logits_match(model, prefix, data: list[Example]) -> None:
    """The prefix's logits for `data` are the full model's (no gradients)."""
    batch = collate(data, 0)
    with torch.no_grad():
        torch.testing.assert_close(prefix.logits([e.input_ids for e in data], batch), forward_logits(model, batch),
                                   atol=1e-5, rtol=1e-4)


def assert_gradients_match(model, prefix, data: list[Example]) -> None:
    """Each example's gradient of its loss through the prefix is the full model's."""
    params = [p for p in model.parameters() if p.requires_grad]
    for example in data:
        batch = collate([example], 0)
        grads = []
        for logits in (lambda: forward_logits(model, batch), lambda: prefix.logits([example.input_ids], batch)):
            loss = torch.nn.functional.cross_entropy(logits(), batch["labels"])
            grads.append(torch.autograd.grad(loss, params))
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_logits_equal_the_full_model_and_lower_layers_run_once(tiny_models):
    model, _ = model_and_config(str(tiny_models["bert"]), UPPER)
    prefix = frozen_prefix(model)
    assert prefix is not None and prefix.first == 1
    model.eval()
    data = examples(12)
    batch = collate(data, 0)
    with torch.no_grad():
        full = forward_logits(model, batch)
        kept = prefix.logits([e.input_ids for e in data], batch)
        assert prefix.store.computed == 12
        again = frozen_prefix(model).logits([e.input_ids for e in data[3:9]], collate(data[3:9], 0))
    torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-5)
    assert prefix.store.computed == 12  # a second model view of the same base reuses the kept states
    torch.testing.assert_close(again, full[3:9], atol=1e-5, rtol=1e-5)


def test_per_example_gradients_equal_the_full_model(tiny_models):
    model, _ = model_and_config(str(tiny_models["bert"]), UPPER)
    prefix = frozen_prefix(model)
    model.eval()
    assert_gradients_match(model, prefix, examples(5, seed=1))


def test_no_prefix_where_the_lower_layers_can_change(tiny_models):
    everywhere, _ = model_and_config(str(tiny_models["bert"]), "qv", **{"lora.top_layers": 0})
    assert frozen_prefix(everywhere) is None  # LoRA in layer 0
    with frozen(everywhere, ("lora_A", "lora_B")):
        assert frozen_prefix(everywhere) is None  # frozen LoRA still changes between rounds
    own_head, _ = model_and_config(str(tiny_models["bert"]), UPPER, pooling="model")
    assert frozen_prefix(own_head) is None  # only the mean-pooling head is supported


def test_training_and_evaluation_match_with_the_cache_off(tiny_models):
    """Plain seeded training and evaluation give the same adapter and sums either way
    (the tiny model has no dropout, so the two paths compute the same function)."""
    data = examples(40, seed=2)
    results = []
    for cache in (True, False):
        model, config = model_and_config(str(tiny_models["bert"]), UPPER, **{"train.cache_frozen_layers": cache,
                                                                           "train.batch_size": 8, "train.lr": 0.5})
        result = train_locally(model, data, config, None, 0, seed=3)
        sums = evaluate_locally(model, data, config, 0)
        results.append((adapter_of(model), result.loss, sums))
    (a, loss_a, sums_a), (b, loss_b, sums_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert sums_a.correct == sums_b.correct and sums_a.loss == pytest.approx(sums_b.loss, rel=1e-5)


def test_the_default_encoder_keeps_its_lower_four_layers():
    """The embedded all-MiniLM-L6-v2 with lora.top_layers = 2: LoRA on query and value of
    layers 4 and 5 only, layers 0-3 are kept, and the logits in eval mode are the full model's."""
    model, _ = model_and_config("default", "qv", **{"lora.top_layers": 2})
    lora_modules = sorted({n.split(".lora_")[0].split("backbone.")[1] for n, _ in model.named_parameters() if "lora_" in n})
    assert lora_modules == [f"encoder.layer.{i}.attention.self.{m}" for i in (4, 5) for m in ("query", "value")]
    prefix = frozen_prefix(model)
    assert prefix is not None and prefix.first == 4
    model.eval()
    assert_logits_match(model, prefix, examples(6, seed=4))
    assert prefix.store.computed == 6


@pytest.mark.parametrize("impl", ["fast", "opacus"])
def test_dp_training_through_the_kept_prefix(tiny_models, impl):
    """DP-SGD through the prefix on either per-example path: the per-example invariant holds
    (step() would refuse otherwise), only the upper layers' adapter moves, and the lower
    layers ran once per distinct example."""
    from fedlora.client.local_training import DPPlan

    model, config = model_and_config(str(tiny_models["bert"]), UPPER, **{"privacy.dp_impl": impl, "train.batch_size": 8})
    data = examples(40, seed=5)
    before = adapter_of(model)
    result = train_locally(model, data, config, DPPlan(noise_multiplier=1.0, sample_rate=0.25, steps=6), 0, seed=0)
    after = adapter_of(model)
    assert result.steps == 6 and all(not torch.equal(before[k], after[k]) for k in before)
    assert frozen_prefix(model).store.computed <= 40


def test_top_layers_selects_the_upper_layers_of_any_preset(tiny_models):
    """lora.top_layers filters what the preset or list selects to the top k layers, for a
    regex preset (bert "auto") and a list one (llama "qv") alike; k above the depth is refused."""
    from fedlora.base_model import ModelError

    bert, _ = model_and_config(str(tiny_models["bert"]), "auto", **{"lora.top_layers": 1})
    layers = {n.split("encoder.layer.")[1].split(".")[0] for n, _ in bert.named_parameters() if "lora_" in n}
    assert layers == {"1"} and frozen_prefix(bert).first == 1
    llama_config = load_config(None, {"model.path": str(tiny_models["llama"]), "model.task": "causal-lm", "lora.top_layers": 1})
    llama = build_peft_model(llama_config.model, llama_config.lora, num_labels=1, seed=0)
    adapted = sorted({n.split(".lora_")[0].split("model.layers.")[1] for n, _ in llama.named_parameters() if "lora_" in n})
    assert adapted == ["1.self_attn.q_proj", "1.self_attn.v_proj"]
    assert frozen_prefix(llama) is None  # a decoder trains through the full model
    deep = load_config(None, {"model.path": str(tiny_models["bert"]), "model.pooling": "mean", "lora.top_layers": 3})
    with pytest.raises(ModelError, match="lora.top_layers = 3: the model has 2 layers"):
        build_peft_model(deep.model, deep.lora, num_labels=3, seed=0)


def test_bench_local_training_reports_every_variant(capsys):
    """`fedlora bench local-training` on a small site: three variants, the top-k ones train
    a third of the values, and bad options are one-line errors."""
    from fedlora.cli import main

    assert main(["bench", "local-training", "--notes", "60", "--rounds", "2", "--steps", "1", "--batch", "8",
                 "--seq", "24", "--json"]) == 0
    import json

    results = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in results] == ["every layer", "top k, no cache", "top k, kept prefix"]
    assert results[1]["trainable"] == results[2]["trainable"] < results[0]["trainable"]
    assert all(r["train_s"] > 0 and r["eval_s"] > 0 for r in results)
    assert main(["bench", "local-training", "--rounds", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


MLP_OUT = r".*encoder\.layer\.1\.output\.dense$"


def test_kept_inside_the_layer_when_lora_sits_on_its_output_projection(tiny_models):
    """LoRA on the top layer's feed-forward output projection only: the kept point moves
    into that layer, and logits and per-example gradients are the full model's."""
    model, _ = model_and_config(str(tiny_models["bert"]), MLP_OUT)
    prefix = frozen_prefix(model)
    assert prefix is not None and (prefix.first, prefix.point) == (1, "mlp_out")
    model.eval()
    data = examples(9, seed=6)
    assert_logits_match(model, prefix, data)
    assert prefix.store.computed == 9
    assert_gradients_match(model, prefix, data[:4])
    assert prefix.store.computed == 9


def test_the_mlp_out_preset_on_the_default_encoder_keeps_all_but_the_top_projection():
    """`lora.target_modules = "mlp_out"`, top 1 layer: LoRA on layer 5's output.dense alone
    (not its attention's output.dense); the block above the kept point keeps the caller's
    training mode (its dropout draws), as the layers above a kept layer do."""
    model, _ = model_and_config("default", "mlp_out", **{"lora.top_layers": 1})
    lora_modules = sorted({n.split(".lora_")[0].split("backbone.")[1] for n, _ in model.named_parameters() if "lora_" in n})
    assert lora_modules == ["encoder.layer.5.output.dense"]
    prefix = frozen_prefix(model)
    assert (prefix.first, prefix.point) == (5, "mlp_out")
    data = examples(6, seed=7)
    batch = collate(data, 0)
    model.eval()
    assert_logits_match(model, prefix, data)
    model.train()
    with torch.no_grad():
        first, second = (prefix.logits([e.input_ids for e in data], batch) for _ in range(2))
    assert not torch.allclose(first, second)  # the output block's dropout (p = 0.1) is on
    assert prefix.store.computed == 6


@pytest.mark.parametrize("kind, expected", [("llama", ["1.mlp.down_proj"]), ("gpt2", ["1.mlp.c_proj"])])
def test_the_mlp_out_preset_picks_the_feed_forward_output_projection(tiny_models, kind, expected):
    """The decoders' "mlp_out": down_proj (llama) and the MLP's c_proj, not attention's (gpt2)."""
    config = load_config(None, {"model.path": str(tiny_models[kind]), "model.task": "causal-lm",
                                "lora.target_modules": "mlp_out", "lora.top_layers": 1})
    model = build_peft_model(config.model, config.lora, num_labels=1, seed=0)
    adapted = sorted({n.split(".lora_")[0].split(".layers.")[-1].split(".h.")[-1] for n, _ in model.named_parameters()
                      if "lora_" in n})
    assert adapted == expected

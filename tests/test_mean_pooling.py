"""The mean-pooling classifier: what `model.pooling` picks, that the head reads the
masked mean of the real tokens, that it trains under the fast DP path like the
architecture's head, and that its merged export loads and predicts the same."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedlora.client.local_training import DPPlan, forward_logits, train_locally
from fedlora.client.model_cache import cached_model
from fedlora.adapter_state import adapter_of, write_peft_dir
from fedlora.base_model import ModelError, build_peft_model, default_model_dir, load_base_model, resolved_pooling
from fedlora.cli import main
from fedlora.config import ModelSection, load_config, write_config
from fedlora.mean_pooling import MeanPoolingClassifier, load_exported, masked_mean
from fedlora.text_data import collate, encode
from fedlora.privacy.dp_sgd import choose_impl


@pytest.fixture
def sentence_bert(tiny_models, tmp_path):
    """The tiny BERT as a sentence-transformers folder trained for mean pooling."""
    folder = tmp_path / "sentence-bert"
    shutil.copytree(tiny_models["bert"], folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    return folder


def test_auto_pooling_follows_the_folder(tiny_models, sentence_bert):
    assert resolved_pooling(ModelSection(path="default"), default_model_dir()) == "mean"  # all-MiniLM-L6-v2
    assert resolved_pooling(ModelSection(path=str(tiny_models["bert"])), tiny_models["bert"]) == "model"
    assert resolved_pooling(ModelSection(path=str(sentence_bert)), sentence_bert) == "mean"
    assert resolved_pooling(ModelSection(path=str(sentence_bert), pooling="model"), sentence_bert) == "model"
    assert resolved_pooling(ModelSection(path=str(sentence_bert), task="causal-lm"), sentence_bert) == "model"
    (sentence_bert / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="1_Pooling"):
        resolved_pooling(ModelSection(path=str(sentence_bert)), sentence_bert)


def test_masked_mean_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = masked_mean(hidden, mask)
    assert torch.equal(out[0], hidden[0, :2].mean(0)) and torch.equal(out[1], hidden[1].mean(0))


def test_padding_does_not_change_a_prediction(sentence_bert):
    config = load_config(None, {"model.path": str(sentence_bert), "data.labels": ["a", "b", "c"]})
    model = build_peft_model(config.model, config.lora, num_labels=3, seed=0).eval()
    assert isinstance(model.get_base_model(), MeanPoolingClassifier)
    short = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    padded = {"input_ids": torch.tensor([[101, 2000, 102, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    with torch.no_grad():
        assert torch.allclose(model(**short).logits, model(**padded).logits, atol=1e-6)


def test_the_head_and_lora_train_under_the_fast_dp_path(sentence_bert):
    config = load_config(None, {"model.path": str(sentence_bert), "data.labels": ["a", "b"], "train.local_steps": 2,
                                "train.batch_size": 4})
    cached = cached_model(config, ["a", "b"])
    assert choose_impl(cached.model) == "fast"
    rows = [{"text": f"note {i} about {'chest' if i % 2 else 'skin'}", "label": "ab"[i % 2]} for i in range(16)]
    examples = encode(rows, cached.tokenizer, config, ["a", "b"], "rows")
    before = adapter_of(cached.model)
    assert any(k.endswith("classifier.weight") for k in before) and any("lora_A" in k for k in before)
    train_locally(cached.model, examples, config, DPPlan(0.5, 0.25, 2), cached.tokenizer.pad_token_id, seed=0)
    after = adapter_of(cached.model)
    assert not torch.equal(before[next(k for k in before if k.endswith("classifier.weight"))],
                           after[next(k for k in after if k.endswith("classifier.weight"))])


def test_merged_export_loads_and_predicts_the_same(sentence_bert, tmp_path):
    from peft import PeftModel

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = load_config(None, {"model.path": str(sentence_bert), "data.labels": ["a", "b", "c"], "run.output_dir": str(run_dir)})
    write_config(config, run_dir / "config.toml")
    model = build_peft_model(config.model, config.lora, num_labels=3, seed=0)
    adapter = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_of(model).items()}  # a trained-looking adapter
    write_peft_dir(model, adapter, run_dir / "adapter", sentence_bert)
    batch = collate(encode([{"text": "chest pain and sweating", "label": "a"}], model_tokenizer(sentence_bert), config,
                           ["a", "b", "c"], "x"), 0)
    reference = PeftModel.from_pretrained(load_base_model(config.model, 3, 0), str(run_dir / "adapter")).eval()

    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = load_exported(tmp_path / "merged")
    assert merged.config.id2label == {0: "a", 1: "b", 2: "c"}
    with torch.no_grad():
        assert torch.allclose(forward_logits(merged, batch), forward_logits(reference, batch), atol=1e-5)


def model_tokenizer(folder):
    from fedlora.base_model import load_tokenizer

    return load_tokenizer(folder)

"""Adapter tensors cross the wire exactly, and only fit a model of the same shape."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.common.serde import array_record_from_proto, array_record_to_proto

from fedlora.adapter_state import AdapterMismatch, adapter_of, from_record, put_adapter, record_nbytes, to_record
from fedlora.base_model import build_peft_model
from fedlora.config import Config, LoraSection, ModelSection


def test_adapter_round_trips_through_flower_records_exactly():
    gen = torch.Generator().manual_seed(0)
    adapter = {
        "base_model.model.layer.0.q_proj.lora_A.weight": torch.randn(8, 32, generator=gen),
        "base_model.model.layer.0.q_proj.lora_B.weight": torch.randn(32, 8, generator=gen) * 1e-7,
        "base_model.model.classifier.bias": torch.tensor([1e30, -0.0, 3.0]),
    }
    record = to_record(adapter)
    # Through Flower's wire format (protobuf bytes), as it crosses the network.
    wire = array_record_to_proto(record).SerializeToString()
    proto = type(array_record_to_proto(record))()
    proto.ParseFromString(wire)
    back = from_record(array_record_from_proto(proto))
    assert set(back) == set(adapter)
    for key, value in adapter.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key], value), key
    raw = sum(v.numel() * 4 for v in adapter.values())
    assert raw <= record_nbytes(record) <= raw + 256 * len(adapter)  # tensor bytes + a small .npy header each


def test_bf16_adapters_are_cast_to_fp32_for_the_wire():
    adapter = {"w": torch.randn(4, 4).to(torch.bfloat16)}
    with pytest.raises(TypeError):
        ArrayRecord(adapter)  # the trap this module exists to avoid
    back = from_record(to_record(adapter))
    assert torch.equal(back["w"], adapter["w"].float())


def test_put_adapter_is_exact_and_refuses_other_shapes(tiny_models):
    config = Config(model=ModelSection(path=str(tiny_models["llama"]), task="causal-lm"))
    model = build_peft_model(config.model, LoraSection(rank=4, alpha=8), num_labels=1, seed=0)
    adapter = {k: torch.randn_like(v) for k, v in adapter_of(model).items()}
    put_adapter(model, adapter)
    assert all(torch.equal(adapter_of(model)[k], v) for k, v in adapter.items())

    key = next(k for k in adapter if "lora_A" in k)
    wrong_rank = dict(adapter, **{key: torch.zeros(8, adapter[key].shape[1])})
    with pytest.raises(AdapterMismatch, match="shape"):
        put_adapter(model, wrong_rank)
    with pytest.raises(AdapterMismatch, match="missing"):
        put_adapter(model, {k: v for k, v in adapter.items() if k != key})


def test_initial_adapter_is_identical_for_the_same_seed(tiny_models):
    model_section = ModelSection(path=str(tiny_models["bert"]), task="classification")
    a = adapter_of(build_peft_model(model_section, LoraSection(), num_labels=3, seed=7))
    b = adapter_of(build_peft_model(model_section, LoraSection(), num_labels=3, seed=7))
    c = adapter_of(build_peft_model(model_section, LoraSection(), num_labels=3, seed=8))
    assert any("classifier" in k for k in a), "the new classification head travels with the adapter"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

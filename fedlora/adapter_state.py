"""Adapter tensors: PEFT's adapter state dict, Flower ArrayRecords, and files.

An adapter is a plain ``dict[str, Tensor]`` keyed by PEFT's names without the
adapter name (``...query.lora_A.weight``), plus any ``modules_to_save`` weights
such as a classifier head. It always travels as fp32 (ArrayRecord refuses bf16).
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedlora.adapter_digest import digest_of

Adapter = dict[str, torch.Tensor]


class AdapterMismatch(ValueError):
    """Received adapter tensors do not fit the model (keys, shapes, or non-finite values)."""


def adapter_of(model: PeftModel) -> Adapter:
    """A detached fp32 copy of the model's adapter tensors."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(model).items()}


def adapter_keys(model: PeftModel, params: list[torch.nn.Parameter]) -> list[str]:
    """The adapter key of each of `params` (they share storage with PEFT's state dict)."""
    by_storage = {v.data_ptr(): k for k, v in get_peft_model_state_dict(model).items()}
    keys = [by_storage.get(p.data_ptr()) for p in params]
    if None in keys:
        raise AdapterMismatch("a trainable parameter is not part of the adapter")
    return keys


def put_adapter(model: PeftModel, adapter: Adapter) -> None:
    """Load `adapter` into the model; every key and shape must match exactly, and every
    value must be finite (a NaN or inf the coordinator sends would pass every DP bound)."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(adapter))
    unexpected = sorted(set(adapter) - set(expected))
    if missing or unexpected:
        raise AdapterMismatch(f"adapter keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in adapter.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise AdapterMismatch(f"adapter tensor {key}: shape {tuple(value.shape)}, model expects {tuple(expected[key].shape)}")
        if not bool(torch.isfinite(value).all()):
            raise AdapterMismatch(f"adapter tensor {key} holds non-finite values")
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise AdapterMismatch(f"adapter keys not used by the model: {result.unexpected_keys[:3]}")


def to_record(adapter: Adapter) -> ArrayRecord:
    return ArrayRecord({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.items()})


def from_record(record: ArrayRecord) -> Adapter:
    return {k: v.to(torch.float32) for k, v in record.to_torch_state_dict().items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Serialized bytes of the tensors in a record (fp32 data plus a small .npy header
    per tensor): what crosses the wire, without gRPC framing."""
    return sum(len(array.data) for array in record.values())


def save_adapter_file(adapter: Adapter, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(path))


def load_adapter_file(path: Path) -> Adapter:
    return load_file(str(path))


def adapter_digest(adapter: Adapter) -> str:
    """The adapter digest (fedlora/adapter_digest.py) of tensors in memory."""
    return digest_of({key: value.detach().to("cpu", torch.float32).numpy() for key, value in adapter.items()})


def write_peft_dir(model: PeftModel, adapter: Adapter, folder: Path, model_path: str | Path) -> None:
    """Write `adapter` in PEFT format, loadable with PeftModel.from_pretrained(base, folder),
    its base model (`model.path`) recorded by a portable name and fingerprint
    (fedlora/portable_adapter.py)."""
    from fedlora.portable_adapter import write_base_record

    put_adapter(model, adapter)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    local, config.base_model_name_or_path = config.base_model_name_or_path, write_base_record(folder, str(model_path))
    try:
        # No embedding layer carries LoRA here (base_model.py refuses it), and PEFT's "auto"
        # check would look the base's portable name up on the Hub.
        model.save_pretrained(str(folder), save_embedding_layers=False)
    finally:
        # The portable name is for the files; in memory the model keeps its local folder, or
        # PEFT's state-dict calls would look the name up on the Hub.
        config.base_model_name_or_path = local

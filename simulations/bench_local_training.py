"""`fedlora bench local-training`: one site's rounds on the default task, by where LoRA sits.

Three variants of the same site (the embedded MiniLM, real triage notes, DP-SGD on the
fast path at a fixed noise multiplier, the default evaluation batch) run round by
round, interleaved in one process so that load from other work hits all alike:

- LoRA on query and value of every layer (the default before `lora.top_layers`);
- LoRA on the top k layers, every step through the whole model (`train.cache_frozen_layers = false`);
- LoRA on the top k layers with the frozen lower layers kept per example (client/frozen_prefix.py).

Each round is what a site does per round: `train.local_steps` DP-SGD steps, then one
evaluation of its validation notes. The first round fills the kept states, so it is
reported apart from the median of the later rounds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from fedlora.base_model import build_peft_model, load_tokenizer, resolve_model_dir
from fedlora.client.local_evaluation import evaluate_locally
from fedlora.client.local_training import DPPlan, train_locally
from fedlora.config import load_config
from fedlora.simulations.triage_notes import DEPARTMENTS, generate_notes
from fedlora.text_data import encode, split_train_validation


@dataclass
class LocalBenchOptions:
    notes: int = 1200  # one default site's share of the demo's 6,000
    rounds: int = 4
    steps: int = 4
    batch: int = 64
    seq: int = 64
    top: int = 2


VARIANTS = ("every layer", "top k, no cache", "top k, kept prefix")


def bench_local_training(options: LocalBenchOptions, progress=print) -> list[dict]:
    labels = sorted(DEPARTMENTS)
    base = {"model.max_length": options.seq, "train.local_steps": options.steps, "train.batch_size": options.batch}
    configs = {
        VARIANTS[0]: load_config(None, {**base, "lora.top_layers": 0}),
        VARIANTS[1]: load_config(None, {**base, "lora.top_layers": options.top, "train.cache_frozen_layers": False}),
        VARIANTS[2]: load_config(None, {**base, "lora.top_layers": options.top}),
    }
    tokenizer = load_tokenizer(resolve_model_dir("default"))
    rows = generate_notes(options.notes, 0)
    train_rows, validation_rows = split_train_validation(rows, 0.2, 0)
    train = encode(train_rows, tokenizer, configs[VARIANTS[0]], labels, "default")
    validation = encode(validation_rows, tokenizer, configs[VARIANTS[0]], labels, "default")
    models = {name: build_peft_model(c.model, c.lora, len(labels), seed=0) for name, c in configs.items()}
    plan = DPPlan(noise_multiplier=1.0, sample_rate=options.batch / len(train), steps=options.steps, units=len(train))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for r in range(options.rounds):
        for name in VARIANTS[r % 3:] + VARIANTS[: r % 3]:  # the order rotates each round
            start = time.perf_counter()
            train_locally(models[name], train, configs[name], plan, tokenizer.pad_token_id, seed=r)
            trained = time.perf_counter()
            evaluate_locally(models[name], validation, configs[name], tokenizer.pad_token_id)
            times[name].append((trained - start, time.perf_counter() - trained))
            progress(f"round {r + 1}/{options.rounds} {name}: train {times[name][-1][0]:.1f} s, evaluate {times[name][-1][1]:.1f} s")
    results = []
    for name in VARIANTS:
        later = times[name][1:] or times[name]
        trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        results.append({
            "variant": name, "trainable": trainable,
            "first_round_train_s": times[name][0][0], "first_round_eval_s": times[name][0][1],
            "train_s": statistics.median(t for t, _ in later), "eval_s": statistics.median(e for _, e in later),
        })
    return results


def format_table(results: list[dict], options: LocalBenchOptions) -> str:
    base = results[0]["train_s"] + results[0]["eval_s"]
    lines = [f"one site: {options.notes} notes, {options.steps} DP-SGD steps of {options.batch} + one evaluation per round, "
             f"seq <= {options.seq}, k = {options.top}, torch threads {torch.get_num_threads()}",
             "| variant | trainable | round 1: train s / eval s | later rounds (median): train s / eval s | round vs every layer |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        total = r["train_s"] + r["eval_s"]
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['first_round_train_s']:.1f} / {r['first_round_eval_s']:.1f} "
                     f"| {r['train_s']:.1f} / {r['eval_s']:.1f} | {base / total:.2f}x faster |")
    return "\n".join(lines)

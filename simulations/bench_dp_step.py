"""The cost of one DP-SGD step of the default recipe, by where LoRA sits and how its
batch is grouped.

    python -m fedlora.simulations.bench_dp_step --targets qv,mlp_out --buckets 1,4

One default site (the embedded MiniLM, LoRA on the top layer with the frozen layers
kept, the site's share of the triage notes, batch 64, the fast per-example path) trains
`--rounds` times `--steps` DP-SGD steps with each `lora.target_modules` and
`train.length_buckets` value, interleaved round by round in one process so that load
from other work hits all alike (the kept states are filled first). Prints the median
seconds per step of each and the padding a batch padded as one would compute on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from fedlora.base_model import build_peft_model, load_tokenizer, resolve_model_dir
from fedlora.client.length_buckets import length_sorted_parts
from fedlora.client.local_training import DPPlan, train_locally
from fedlora.config import load_config
from fedlora.simulations.triage_notes import DEPARTMENTS, generate_notes
from fedlora.text_data import encode


def padding_share(lengths: list[int], batch: int, buckets: int, draws: int = 200) -> float:
    """The share of padded token positions in random batches of `batch` rows cut into `buckets`."""
    g = torch.Generator().manual_seed(0)
    padded = real = 0
    for _ in range(draws):
        rows = [lengths[i] for i in torch.randperm(len(lengths), generator=g)[:batch].tolist()]
        for part in length_sorted_parts(rows, buckets):
            padded += len(part) * max(rows[j] for j in part)
            real += sum(rows[j] for j in part)
    return 1 - real / padded


def bench_dp_step(buckets: list[int], notes: int, rounds: int, steps: int, targets: list[str] | None = None,
                  progress=print) -> list[dict]:
    labels = sorted(DEPARTMENTS)
    config = load_config(None, {})
    targets = targets or [config.lora.target_modules]
    tokenizer = load_tokenizer(resolve_model_dir("default"))
    train = encode(generate_notes(notes, 0), tokenizer, config, labels, "default")
    plan = DPPlan(noise_multiplier=1.0, sample_rate=config.train.batch_size / len(train), steps=steps, units=len(train))
    models = {}
    for target in targets:
        models[target] = build_peft_model(config.model, replace(config.lora, target_modules=target), len(labels), seed=0)
        # Fill the kept states of (nearly) every note first: later steps only read them.
        train_locally(models[target], train, config, replace(plan, steps=4 * len(train) // config.train.batch_size),
                      tokenizer.pad_token_id, seed=0)
    cells = [(t, b) for t in targets for b in buckets]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for r in range(rounds):
        for target, b in cells[r % len(cells):] + cells[: r % len(cells)]:  # the order rotates each round
            bucketed = replace(config, train=replace(config.train, length_buckets=b))
            start = time.perf_counter()
            train_locally(models[target], train, bucketed, plan, tokenizer.pad_token_id, seed=r)
            times[target, b].append((time.perf_counter() - start) / steps)
        progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{t} {b} buckets {times[t, b][-1]:.3f} s/step" for t, b in cells))
    lengths = [len(e.input_ids) for e in train]
    return [{"target_modules": t, "length_buckets": b, "step_s": statistics.median(times[t, b]),
             "padding_share": padding_share(lengths, config.train.batch_size, b)} for t, b in cells]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.bench_dp_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="", help="lora.target_modules presets, comma-separated (default: the config's default)")
    parser.add_argument("--buckets", default="1,2,4,8", help="train.length_buckets values, comma-separated (default: 1,2,4,8)")
    parser.add_argument("--notes", type=int, default=1000, help="the site's training notes (default: 1000, a default site's)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per value (default: 6)")
    parser.add_argument("--steps", type=int, default=3, help="DP-SGD steps per round (default: 3, the default's)")
    args = parser.parse_args(argv)
    try:
        buckets = [int(b) for b in args.buckets.split(",")]
    except ValueError:
        parser.error(f"--buckets: comma-separated integers, got {args.buckets!r}")
    if min(buckets) < 1 or args.notes < 64 or args.rounds < 1 or args.steps < 1:
        parser.error("--buckets values and --rounds, --steps must be >= 1, --notes >= 64")
    targets = [t for t in args.targets.split(",") if t]
    results = bench_dp_step(buckets, args.notes, args.rounds, args.steps, targets,
                            progress=lambda s: print(s, file=sys.stderr, flush=True))
    base = results[0]["step_s"]
    print(f"torch threads {torch.get_num_threads()}; batch 64, top layer, kept prefix, fast per-example path")
    print("| LoRA targets | length buckets | padding share | s per step | vs first |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['target_modules']} | {r['length_buckets']} | {r['padding_share']:.3f} | {r['step_s']:.3f} | {base / r['step_s']:.2f}x |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

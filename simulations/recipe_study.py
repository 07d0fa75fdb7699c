"""The recipe study: the federation's arithmetic in one process, for searching cheaply.

A cell is one configuration of the default task (the triage notes, 5 sites,
Dirichlet(0.5) label skew, epsilon per site with evaluation's share accounted) run
without Ray or Flower messages: every site trains with the project's own
`train_locally` and DP plan (`calibrated_plan`, the same noise a real site draws),
the project's strategy aggregates, and the final adapter is scored exactly on fresh
notes from another seed (as `simulation.test_notes` does). The federated evaluations
are not run (their epsilon is still reserved in each site's plan), which is why a
cell takes seconds to a few minutes instead of a `fedlora simulate` run's minutes.
The few best cells are then confirmed with `fedlora simulate` (docs/strategies.md).
Distributed DP cells (`--set privacy.mode=distributed`) run each site's noisy integer sum
and the coordinator's step as the real ones do, summed in the clear (`distributed_round`).

    python -m fedlora.simulations.recipe_study --set train.lr=4 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedlora.adapter_state import adapter_of, put_adapter
from fedlora.base_model import build_peft_model, load_tokenizer, resolve_model_dir
from fedlora.client.local_evaluation import evaluate_locally
from fedlora.client.local_training import distributed_gradient_sum, frozen, train_locally
from fedlora.client.site_privacy import calibrated_plan, distributed_plan
from fedlora.config import Config, load_config, parse_override
from fedlora.privacy import secure_aggregation_records as records
from fedlora.privacy.distributed_dp import DistributedPlan, coordinator_step, noisy_input
from fedlora.round_schedule import frozen_in_round, round_lr, with_round_lr
from fedlora.server.secure_round import SecureSum
from fedlora.simulations.held_out_test import TEST_SEED_OFFSET
from fedlora.simulations.triage_notes import DEPARTMENTS, generate_notes
from fedlora.simulations.virtual_sites import partition_rows
from fedlora.strategies import ClientUpdate, get_strategy, trained_part
from fedlora.text_data import Example, encode, split_train_validation


@dataclass
class Site:
    train: list[Example]
    validation: list[Example]


def study_sites(config: Config, labels: list[str], tokenizer) -> list[Site]:
    """The virtual sites of `fedlora simulate` (its own partition), each split as a site splits its rows."""
    sites = []
    for number in range(config.simulation.clients):
        rows = partition_rows(config, number, config.simulation.clients)
        train, validation = split_train_validation(rows, config.data.validation_fraction, config.run.seed + number)
        sites.append(Site(encode(train, tokenizer, config, labels, "default"),
                          encode(validation, tokenizer, config, labels, "default")))
    return sites


def federate(config: Config, model, sites: list[Site], plans: list, pad: int, progress=print,
             tail_from: int | None = None, distributed: DistributedPlan | None = None,
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The federation's rounds in this process: every site trains from the global adapter with
    its own plan (None: no DP), the project's strategy aggregates; or, with a `distributed`
    plan, each round is one distributed DP step. Returns the final global adapter and the
    mean of the global adapters from round `tail_from` on (default: the last half)."""
    start = time.perf_counter()
    strategy = get_strategy(config.strategy)
    global_adapter = adapter_of(model)
    tail_sum: dict[str, torch.Tensor] = {}  # the global adapters of the last rounds, summed
    tail_from = config.federation.rounds // 2 + 1 if tail_from is None else tail_from
    for server_round in range(1, config.federation.rounds + 1):
        if distributed is not None:
            global_adapter = distributed_round(config, model, sites, distributed, strategy, global_adapter, server_round, pad)
        else:
            updates = []
            for number, (site, plan) in enumerate(zip(sites, plans)):
                put_adapter(model, global_adapter)
                with frozen(model, strategy.frozen_factors + frozen_in_round(config.train, server_round)):
                    train_locally(model, site.train, with_round_lr(config, server_round), plan, pad, seed=server_round * 1000 + number)
                sent = trained_part(adapter_of(model), strategy.frozen_factors)
                updates.append(ClientUpdate(node_id=number, adapter=sent, num_examples=len(site.train)))
            global_adapter = strategy.aggregate(global_adapter, updates)
        if server_round >= tail_from:
            for key, value in global_adapter.items():
                tail_sum[key] = tail_sum.get(key, 0) + value
        if server_round % max(1, config.federation.rounds // 4) == 0:
            progress(f"  round {server_round}/{config.federation.rounds}: {time.perf_counter() - start:.0f} s")
    tail = {key: value / (config.federation.rounds - tail_from + 1) for key, value in tail_sum.items()}
    return global_adapter, tail


def distributed_round(config: Config, model, sites: list[Site], plan: DistributedPlan, strategy,
                      global_adapter: dict[str, torch.Tensor], server_round: int, pad: int) -> dict[str, torch.Tensor]:
    """One round of distributed DP (`privacy.mode = "distributed"`, privacy/distributed_dp.py):
    every site's noisy integer sum of clipped gradients at the global adapter, with its Skellam
    share, exactly as a site computes it (client/local_training.distributed_gradient_sum,
    noisy_input), summed modulo 2^bits, and the coordinator's SGD step on the sum. Secure
    aggregation reveals exactly that modular sum (tests/test_secure_rounds.py), so the
    study adds the inputs in the clear, without the masking exchanges."""
    spec = records.quantization(True, records.run_clip(config), len(sites))
    modulus, rng, total = np.uint64((1 << spec.modulus_bits) - 1), np.random.default_rng(), None
    put_adapter(model, global_adapter)
    with frozen(model, strategy.frozen_factors):
        for site in sites:
            sums, _ = distributed_gradient_sum(model, site.train, config, plan.sample_rate, records.LEVELS, pad)
            integer_sum = np.concatenate([sums[k].flatten().numpy() for k in sorted(sums)])
            noisy = noisy_input(integer_sum, len(site.train), plan.share(len(sites)), spec, rng)
            total = noisy if total is None else (total + noisy) & modulus
    change, _ = coordinator_step(total, spec, plan.sample_rate, round_lr(config.train, server_round, config.federation.rounds))
    step = SecureSum()
    step.add(change, 1)
    return strategy.aggregate(global_adapter, [step.update(global_adapter, strategy.frozen_factors)])


def run_distributed_plan(config: Config, model) -> DistributedPlan | None:
    """Distributed DP's plan (the same at every site) for a distributed cell, else None."""
    if not (config.privacy.enabled and config.privacy.mode == "distributed"):
        return None
    trained = trained_part(adapter_of(model), get_strategy(config.strategy).frozen_factors)
    return distributed_plan(config, sum(t.numel() for t in trained.values()))


def run_cell(config: Config, progress=print) -> dict:
    """One cell: the federation's rounds in this process; the held-out accuracy at the end."""
    start = time.perf_counter()
    labels = sorted(DEPARTMENTS)
    config = replace(config, data=replace(config.data, labels=labels))
    tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
    sites = study_sites(config, labels, tokenizer)
    model = build_peft_model(config.model, config.lora, len(labels), seed=config.run.seed)
    distributed = run_distributed_plan(config, model)
    plans = [calibrated_plan(config, site.train) if config.privacy.enabled and not distributed else None for site in sites]
    pad = tokenizer.pad_token_id
    global_adapter, tail_average = federate(config, model, sites, plans, pad, progress, distributed=distributed)
    test = encode(generate_notes(config.simulation.test_notes or 1000, config.run.seed + TEST_SEED_OFFSET),
                  tokenizer, replace(config, privacy=replace(config.privacy, enabled=False)), labels, "test notes")
    put_adapter(model, global_adapter)
    sums = evaluate_locally(model, test, config, pad)
    put_adapter(model, tail_average)
    tail = evaluate_locally(model, test, config, pad)
    return {
        "seed": config.run.seed, "accuracy": sums.correct / sums.units, "loss": sums.loss / sums.units,
        "tail_average_accuracy": tail.correct / tail.units,
        "noise_multiplier": [round(p.noise_multiplier, 3) for p in plans if p] or ([round(distributed.noise_multiplier, 3)] if distributed else []),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.recipe_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key, as in fedlora simulate")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds: run.seed FIRST..FIRST+N-1 (data, split and initial adapter)")
    parser.add_argument("--first-seed", type=int, default=0, metavar="FIRST",
                        help="the first run.seed (default 0): two processes can run one cell's seeds side by side")
    parser.add_argument("--name", default="", help="the cell's name in the printed JSON line")
    args = parser.parse_args(argv)
    overrides = dict(parse_override(item) for item in args.set)
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        config = load_config(None, {**overrides, "run.seed": seed})
        result = run_cell(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"seed {seed}: accuracy {result['accuracy']:.3f} (tail average {result['tail_average_accuracy']:.3f}), "
              f"{result['seconds']:.0f} s, "
              f"sigma {result['noise_multiplier'][:1]}", file=sys.stderr, flush=True)
        results.append(result)
    accuracies = [r["accuracy"] for r in results]
    summary = {
        "cell": args.name or " ".join(args.set), "mean": statistics.mean(accuracies),
        "sd": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "per_seed": [round(a, 3) for a in accuracies],
        "tail_average": [round(r["tail_average_accuracy"], 3) for r in results], "seconds": [round(r["seconds"]) for r in results],
        "sigma": results[0]["noise_multiplier"],
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

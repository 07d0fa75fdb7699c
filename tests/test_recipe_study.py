"""The recipe study's distributed DP round (simulations/recipe_study.distributed_round)
takes the coordinator's step: with the Skellam noise set to zero and every record
sampled, the new global adapter is the old one minus lr times the mean of the records'
clipped gradients, computed here one record at a time. And `--first-seed` starts a cell's seeds where asked."""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.adapter_state import adapter_of
from fedlora.base_model import build_peft_model
from fedlora.config import load_config
from fedlora.simulations.recipe_study import Site, distributed_round, run_distributed_plan
from fedlora.strategies import get_strategy
from fedlora.text_data import Example


def test_a_noise_free_distributed_round_steps_by_the_mean_clipped_gradient(tiny_models, monkeypatch):
    monkeypatch.setattr("fedlora.privacy.skellam.skellam_noise", lambda lam, size, rng: np.zeros(size, dtype=np.int64))
    lr, clip = 0.5, 1.01  # record gradients here have norms 0.96-1.05: some are clipped, some not
    config = load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "federation.rounds": 1,
        "federation.secure_aggregation": True, "privacy.mode": "distributed", "privacy.distributed_sample_rate": 1.0,
        "privacy.max_grad_norm": clip, "train.lr": lr, "train.lr_schedule": "constant",
    })
    model = build_peft_model(config.model, config.lora, 3, seed=0)
    generator = torch.Generator().manual_seed(1)
    records = [Example(torch.randint(5, 90, (9,), generator=generator).tolist(), i % 3) for i in range(10)]
    sites = [Site(records[:4], []), Site(records[4:], [])]
    start = {k: v.clone() for k, v in adapter_of(model).items()}

    plan = run_distributed_plan(config, model)
    got = distributed_round(config, model, sites, plan, get_strategy(config.strategy), start, 1, pad=0)

    # The reference: each record alone, its gradient over every trainable tensor clipped to `clip`.
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    clipped = 0
    model.train()
    for record in records:
        model.zero_grad()
        logits = model(input_ids=torch.tensor([record.input_ids])).logits
        F.cross_entropy(logits, torch.tensor([record.labels])).backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        clipped += factor < 1.0
        for t, p in zip(total, params):
            t += p.grad.double() * factor
    assert 0 < clipped < len(records)
    with torch.no_grad():
        for t, p in zip(total, params):
            p.add_((-lr * t / len(records)).to(p.dtype))
    want = adapter_of(model)
    assert set(got) == set(want)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    assert any(not torch.equal(got[k], start[k]) for k in start)  # the step moved the adapter


def test_first_seed_runs_the_seeds_from_there(monkeypatch, capsys):
    """`--first-seed 3 --seeds 2` runs run.seed 3 and 4 (two processes share a cell's seeds)."""
    from fedlora.simulations import recipe_study

    seen = []

    def cell(config, progress):
        seen.append(config.run.seed)
        return {"accuracy": 0.5 + config.run.seed / 100, "tail_average_accuracy": 0.5, "seconds": 1.0, "noise_multiplier": [1.0]}

    monkeypatch.setattr(recipe_study, "run_cell", cell)
    assert recipe_study.main(["--seeds", "2", "--first-seed", "3", "--name", "c"]) == 0
    assert seen == [3, 4]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["per_seed"] == [0.53, 0.54]

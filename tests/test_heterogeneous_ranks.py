"""Heterogeneous LoRA ranks: sites of rank 4, 8 and 16 in one federation; the
coordinator aggregates products and re-factorizes to each site's rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from client import model_cache
from client.model_cache import cached_model
from fedlora.adapter_state import adapter_of
from fedlora.config import Config, LoraSection, ModelSection, StrategySection
from strategies import ClientUpdate, get_strategy
from strategies.lora_rank import to_rank

A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.score.weight"


def adapter(rank: int, out: int = 12, inp: int = 10, seed: int = 0, zero_b: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b = torch.zeros(out, rank) if zero_b else torch.randn(out, rank, generator=gen)
    return {A: torch.randn(rank, inp, generator=gen), B: b, HEAD: torch.randn(2, out, generator=gen)}


def product(ad: dict[str, torch.Tensor]) -> torch.Tensor:
    return ad[B].double() @ ad[A].double()


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_down_to_a_smaller_rank_is_the_best_approximation():
    g = adapter(8)
    small = to_rank(g, 4, seed=0)
    assert small[A].shape == (4, 10) and small[B].shape == (12, 4)
    assert torch.allclose(product(small), best_rank(product(g), 4), atol=1e-5)
    assert torch.equal(small[HEAD], g[HEAD])


def test_up_to_a_larger_rank_keeps_the_product_and_can_still_learn():
    g = adapter(8)
    big = to_rank(g, 16, seed=0)
    assert big[A].shape == (16, 10) and big[B].shape == (12, 16)
    assert torch.allclose(product(big), product(g), atol=1e-5)
    assert torch.all(big[B][:, 8:] == 0) and torch.all(big[A][8:].norm(dim=1) > 0)
    assert torch.equal(to_rank(g, 8, seed=0)[A], g[A])  # same rank: untouched


def test_the_initial_adapter_at_another_rank_is_a_valid_lora_init():
    g = adapter(8, zero_b=True)  # B = 0, as PEFT initialises it
    small = to_rank(g, 4, seed=0)
    assert torch.all(small[B] == 0) and torch.equal(small[A], g[A][:4])


def test_exact_aggregates_mixed_ranks_to_the_coordinators_rank():
    updates = [ClientUpdate(i, adapter(r, seed=i), num_examples=n) for i, (r, n) in enumerate([(4, 30), (8, 50), (16, 20)])]
    g = adapter(8, seed=9)
    out = get_strategy(StrategySection(name="exact")).aggregate(g, updates)
    assert out[A].shape == (8, 10) and out[B].shape == (12, 8)
    mean = sum(u.num_examples / 100 * product(u.adapter) for u in updates)
    assert torch.allclose(product(out), best_rank(mean, 8), atol=1e-5)
    # Round trip to each site's rank: shapes match what that site trains.
    for r in (4, 8, 16):
        site = to_rank(out, r, seed=0)
        assert site[A].shape == (r, 10) and site[B].shape == (12, r)


def test_a_worker_swaps_lora_rank_without_reloading_the_base(tiny_models):
    config = Config(model=ModelSection(path=str(tiny_models["llama"]), task="causal-lm"), lora=LoraSection(rank=8, alpha=16))
    cached_model(config, [])
    loads = model_cache.loads_in_process
    for rank in (4, 16, 8):
        config.lora.rank, config.lora.alpha = rank, 2.0 * rank
        model = cached_model(config, []).model
        shapes = {tuple(v.shape) for k, v in adapter_of(model).items() if "lora_A" in k}
        assert all(s[0] == rank for s in shapes)
        assert model.peft_config["default"].lora_alpha / rank == 2.0
    assert model_cache.loads_in_process == loads


@pytest.mark.slow
def test_simulation_with_sites_of_ranks_4_8_16(tmp_path):
    out, load_log = tmp_path / "run", tmp_path / "loads.txt"
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", "2", "--output", str(out),
           "--set", "strategy.name=exact", "--set", "simulation.client_ranks=[4, 8, 16]",
           "--set", "simulation.dataset_size=300", "--set", "train.local_steps=1", "--set", "train.batch_size=16",
           "--set", "simulation.cpus_per_client=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "FEDLORA_MODEL_LOAD_LOG": str(load_log)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3] and all(r["updates_rejected"] == 0 for r in rows)
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in final.items() if "lora_A" in k} == {8}  # the coordinator's rank
    assert max(Counter(load_log.read_text().split()).values()) == 1  # rank swaps never reload the base

"""Heterogeneous LoRA ranks: sites of rank 2, 4, 8 and 16 in one federation; the
coordinator aggregates each site's change to the product (against what it was
sent), keeps the global adapter at the largest rank, and re-factorizes it to each
site's rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from fedlora.client import model_cache
from fedlora.client.model_cache import cached_model
from fedlora.adapter_state import adapter_of
from fedlora.config import Config, LoraSection, ModelSection, PrivacySection, StrategySection
from fedlora.private_network import TEST_UNAVAILABLE_ENV
from fedlora.server.federation import aggregate
from fedlora.server.round_policy import RoundTraining
from fedlora.strategies.central_dp import CentralDP
from fedlora.strategies import ClientUpdate, get_strategy, trained_part
from fedlora.strategies.lora_rank import row_scale, to_rank

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


def test_up_to_a_larger_rank_keeps_the_factors_and_can_still_learn():
    g = adapter(8)
    big = to_rank(g, 16, seed=0)
    assert big[A].shape == (16, 10) and big[B].shape == (12, 16)
    assert torch.equal(big[A][:8], g[A]) and torch.equal(big[B][:, :8], g[B])
    assert torch.equal(product(big), product(g))
    assert torch.all(big[B][:, 8:] == 0) and torch.all(big[A][8:].norm(dim=1) > 0)
    assert abs(row_scale(big[A][8:]) / row_scale(g[A]) - 1) < 0.5  # new rows at A's scale
    assert torch.equal(to_rank(g, 16, seed=0)[A], big[A])  # the same seeded rows every time
    assert torch.equal(to_rank(g, 8, seed=0)[A], g[A])  # same rank: untouched
    # Row k is the same seeded row from any starting rank: no duplicated directions.
    from_4 = to_rank(to_rank(g, 4, seed=0), 16, seed=0)
    assert torch.linalg.matrix_rank(from_4[A]) == 10  # = in_features: 16 rows in R^10, none repeated


def test_the_initial_adapter_at_another_rank_is_a_valid_lora_init():
    g = adapter(8, zero_b=True)  # B = 0, as PEFT initialises it
    small = to_rank(g, 4, seed=0)
    assert torch.all(small[B] == 0) and torch.equal(small[A], g[A][:4])


def trained_from(sent: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A site's reply: what it was sent, every tensor moved a little."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in sent.items()}


def test_exact_aggregates_changes_of_mixed_ranks_at_the_largest_rank():
    g = to_rank(adapter(8, out=24, inp=20, seed=9), 16, seed=0)  # the coordinator lifts the global adapter to the largest rank
    sites = [(2, 30), (8, 50), (16, 20)]
    sent = [to_rank(g, r, seed=0) for r, _ in sites]
    updates = [ClientUpdate(i, trained_from(s, seed=i), n, sent=s) for i, (s, (_, n)) in enumerate(zip(sent, sites))]
    out = get_strategy(StrategySection(name="exact")).aggregate(g, updates)
    assert out[A].shape == (16, 20) and out[B].shape == (24, 16)
    mean = product(g) + sum(u.num_examples / 100 * (product(u.adapter) - product(s)) for u, s in zip(updates, sent))
    assert torch.allclose(product(out), best_rank(mean, 16), atol=1e-5)
    # The head: the global one plus the weighted mean change.
    assert torch.allclose(out[HEAD].double(), g[HEAD].double() + sum(
        u.num_examples / 100 * (u.adapter[HEAD].double() - s[HEAD].double()) for u, s in zip(updates, sent)), atol=1e-6)
    # Round trip to each site's rank: shapes match what that site trains.
    for r in (2, 8, 16):
        site = to_rank(out, r, seed=0)
        assert site[A].shape == (r, 20) and site[B].shape == (24, r)


def round_of(g: dict[str, torch.Tensor], ranks: list[int], trains: dict[int, int] | None = None) -> RoundTraining:
    """A round as the coordinator holds it: site i (rank ranks[i]) was sent the global
    adapter at its rank; the sites in `trains` (node -> seed) changed it, the others
    returned exactly what they were sent."""
    state = RoundTraining(asked=list(range(len(ranks))), connected=len(ranks))
    for node, rank in enumerate(ranks):
        state.sent[node] = to_rank(g, rank, seed=0)
        reply = trained_part(state.sent[node], ())
        if trains and node in trains:
            reply = trained_from(reply, seed=trains[node])
        state.updates[node] = ClientUpdate(node, reply, num_examples=10 * (node + 1))
    return state


def test_a_round_without_training_leaves_the_global_product_unchanged():
    g = adapter(8, out=24, inp=20, seed=3)
    ranks = [2, 8, 16]
    config = Config(strategy=StrategySection(name="exact"))
    out = aggregate(get_strategy(config.strategy), g, round_of(g, ranks), config.run.seed)
    assert out[A].shape == (16, 20)  # the largest declared rank
    assert torch.allclose(product(out), product(g), rtol=0, atol=1e-5 * float(product(g).abs().max()))
    assert torch.allclose(out[HEAD], g[HEAD])
    # Not vacuous: averaging the sites' absolute products pulls in the rank-2 site's truncation.
    absolute = sum((n + 1) / 6 * product(to_rank(g, r, seed=0)) for n, r in enumerate(ranks))
    assert (absolute - product(g)).norm() > 0.05 * product(g).norm()


def test_only_a_sites_change_moves_the_global_product():
    g = adapter(8, out=24, inp=20, seed=4)
    config = Config(strategy=StrategySection(name="exact"))
    state = round_of(g, [2, 8, 16], trains={0: 7})  # only the rank-2 site learned something
    out = aggregate(get_strategy(config.strategy), g, state, config.run.seed)
    change = product(state.updates[0].adapter) - product(state.sent[0])
    # rank(g) + rank(change) <= 8 + 4 <= 16: nothing is truncated.
    assert torch.allclose(product(out), product(g) + 10 / 60 * change, atol=1e-5)


def test_central_dp_clips_changes_against_what_each_site_was_sent(monkeypatch):
    monkeypatch.setattr("fedlora.strategies.central_dp.add_noise", lambda adapter, keys, std: adapter)  # the clipping alone
    g = adapter(8, seed=5)
    config = Config(strategy=StrategySection(name="fedavg"),
                    privacy=PrivacySection(central=True, central_noise_multiplier=1.0, central_clip_norm=0.1))
    state = round_of(g, [8, 8, 8], trains={0: 1, 1: 2, 2: 3})
    strategy = get_strategy(config.strategy)
    central = CentralDP(strategy, config.privacy)
    out = aggregate(strategy, g, state, config.run.seed, central)
    metrics = central.round_metrics()
    assert metrics["central_noise_std"] == pytest.approx(0.1 / 3) and metrics["central_epsilon"] > 0
    for node, update in state.updates.items():
        norm = torch.sqrt(sum(((update.adapter[k] - g[k]).double() ** 2).sum() for k in g))
        assert norm > 0.1  # each change is clipped
    total = torch.sqrt(sum(((out[k] - g[k]).double() ** 2).sum() for k in g))
    assert total <= 0.1 + 1e-6  # the unweighted mean of clipped changes moves at most clip_norm


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
@pytest.mark.ray
def test_simulation_with_sites_of_ranks_4_8_16_on_the_host_network_where_namespaces_are_unavailable(tmp_path):
    """One engine run checks two things: sites of ranks 4, 8 and 16 in one federation, and
    `--allow-network` where user namespaces are unavailable (the run goes on, on this machine's
    network, and names the ports it opens; tests/test_private_network.py has the isolated runs)."""
    out, load_log = tmp_path / "run", tmp_path / "loads.txt"
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", "2", "--output", str(out),
           "--allow-network",
           "--set", "strategy.name=exact", "--set", "simulation.client_ranks=[4, 8, 16]",
           "--set", "simulation.dataset_size=300", "--set", "train.local_steps=1", "--set", "train.batch_size=16"]
    env = {**os.environ, "FEDLORA_MODEL_LOAD_LOG": str(load_log), TEST_UNAVAILABLE_ENV: "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_ok"] for r in rows[1:]] == [3, 3] and all(r["updates_rejected"] == 0 for r in rows)
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in final.items() if "lora_A" in k} == {16}  # the largest declared rank
    assert max(Counter(load_log.read_text().split()).values()) == 1  # rank swaps never reload the base

    # Without namespaces, --allow-network runs on this machine's network and says so, naming the ports.
    assert "network isolation unavailable" in proc.stderr and "(--allow-network)" in proc.stderr
    assert "fedlora: listening on this machine's network: TCP " in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {out.resolve()}"

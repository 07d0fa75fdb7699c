"""Exact LoRA aggregation: FFA's mean of B with a shared A, and `exact`'s rank-r
re-factorization of the mean product, against independent computations."""

from __future__ import annotations

import torch

from fedlora.client.local_training import DPPlan, frozen, train_locally
from fedlora.client.model_cache import cached_model
from fedlora.adapter_state import adapter_of
from fedlora.config import Config, LoraSection, ModelSection, StrategySection, TrainSection
from fedlora.text_data import encode
from fedlora.strategies import ClientUpdate, get_strategy, trained_part
from fedlora.strategies.lora_rank import row_scale, seeded_a_rows

A_KEY, B_KEY, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight"


def clients(n: int, rank: int, out: int, inp: int, shared_a: torch.Tensor | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ups = []
    for i in range(n):
        adapter = {
            A_KEY: shared_a.clone() if shared_a is not None else torch.randn(rank, inp, generator=gen),
            B_KEY: torch.randn(out, rank, generator=gen),
            HEAD: torch.randn(3, out, generator=gen),
        }
        ups.append(ClientUpdate(i, adapter, num_examples=int(torch.randint(1, 100, (1,), generator=gen))))
    return ups


def weighted_mean_product(ups: list[ClientUpdate]) -> torch.Tensor:
    total = sum(u.num_examples for u in ups)
    return sum((u.num_examples / total) * (u.adapter[B_KEY].double() @ u.adapter[A_KEY].double()) for u in ups)


def test_ffa_mean_of_b_times_shared_a_is_the_mean_product():
    a = torch.randn(4, 12)
    global_adapter = {A_KEY: a, B_KEY: torch.zeros(10, 4), HEAD: torch.zeros(3, 10)}
    strategy = get_strategy(StrategySection(name="ffa"))
    ups = clients(5, 4, 10, 12, shared_a=a)
    sent = [ClientUpdate(u.node_id, trained_part(u.adapter, strategy.frozen_factors), u.num_examples) for u in ups]
    assert all(A_KEY not in u.adapter for u in sent), "sites do not send the frozen A"
    out = strategy.aggregate(global_adapter, sent)
    assert torch.equal(out[A_KEY], a)
    assert torch.allclose(out[B_KEY].double() @ out[A_KEY].double(), weighted_mean_product(ups), atol=1e-5)


def test_fedavg_of_factors_is_not_the_mean_product():
    """Why ffa and exact exist: averaging A and B separately is not averaging B·A."""
    ups = clients(4, 3, 10, 8)
    out = get_strategy(StrategySection(name="fedavg")).aggregate({}, ups)
    err = (out[B_KEY].double() @ out[A_KEY].double() - weighted_mean_product(ups)).norm()
    assert err > 0.1 * weighted_mean_product(ups).norm()


def test_exact_returns_the_best_rank_r_approximation_of_the_mean_update():
    rank, out_dim, in_dim = 3, 10, 8
    ups = clients(4, rank, out_dim, in_dim, seed=1)
    global_adapter = {A_KEY: torch.zeros(rank, in_dim), B_KEY: torch.zeros(out_dim, rank), HEAD: torch.zeros(3, out_dim)}
    strategy = get_strategy(StrategySection(name="exact"))
    out = strategy.aggregate(global_adapter, ups)
    assert out[A_KEY].shape == (rank, in_dim) and out[B_KEY].shape == (out_dim, rank)

    mean = weighted_mean_product(ups)
    u, s, vh = torch.linalg.svd(mean)  # independent dense SVD (Eckart-Young)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert torch.allclose(out[B_KEY].double() @ out[A_KEY].double(), best, atol=1e-5)
    energy = float((s[:rank] ** 2).sum() / (s**2).sum())
    assert abs(strategy.round_metrics()["exact_energy_kept"] - energy) < 1e-9
    assert 0 < energy < 1
    # A keeps the scale of PEFT's initial A (rows of norm 1/sqrt(3); here the global A
    # is zero, so that is the fallback): orthogonal rows of norm c, and B = U·S/c.
    c = 3**-0.5
    assert torch.allclose(out[A_KEY].double() @ out[A_KEY].double().T, c**2 * torch.eye(rank, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out[B_KEY].double().norm(dim=0), s[:rank] / c, rtol=1e-5)
    # Non-LoRA tensors (a classifier head) are num-examples-weighted means.
    total = sum(u.num_examples for u in ups)
    assert torch.allclose(out[HEAD], sum(u.num_examples / total * u.adapter[HEAD] for u in ups), atol=1e-6)


def test_exact_keeps_a_at_its_initial_scale_and_the_product_exact():
    """After a round, A's rows keep the norm of PEFT's initial A (about 0.58), so the
    next round's SGD step on B (which scales with A^T·A) keeps its size; an even split
    of the singular values would shrink A where they are small."""
    rank, out_dim, in_dim = 8, 48, 64
    a0 = seeded_a_rows(rank, in_dim, seed=0, key=A_KEY)  # PEFT's Kaiming-uniform A
    global_adapter = {A_KEY: a0, B_KEY: torch.zeros(out_dim, rank), HEAD: torch.zeros(3, out_dim)}
    gen = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(i, {A_KEY: a0 + 0.01 * torch.randn(rank, in_dim, generator=gen),
                            B_KEY: 0.01 * torch.randn(out_dim, rank, generator=gen),
                            HEAD: torch.zeros(3, out_dim)}, 10) for i in range(5)]
    out = get_strategy(StrategySection(name="exact")).aggregate(global_adapter, ups)
    c = row_scale(a0)
    assert abs(c - 3**-0.5) < 0.05
    assert torch.allclose(out[A_KEY].norm(dim=1), torch.full((rank,), c), rtol=1e-5)
    mean = weighted_mean_product(ups)
    u, s, vh = torch.linalg.svd(mean)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    err = (out[B_KEY].double() @ out[A_KEY].double() - best).norm() / best.norm()
    assert err < 1e-6
    # B's step for a loss gradient G on the product: G·A^T, of the same size as from A0.
    g = torch.randn(out_dim, in_dim, generator=gen)
    step_before, step_after = (g @ a0.T).norm(), (g @ out[A_KEY].T).norm()
    assert 0.5 < step_after / step_before < 2


def test_exact_is_lossless_when_the_mean_has_rank_r():
    a = torch.randn(4, 12)
    ups = clients(3, 4, 10, 12, shared_a=a)  # shared A: the mean product has rank <= 4
    global_adapter = {A_KEY: a, B_KEY: torch.zeros(10, 4), HEAD: torch.zeros(3, 10)}
    strategy = get_strategy(StrategySection(name="exact"))
    out = strategy.aggregate(global_adapter, ups)
    assert torch.allclose(out[B_KEY].double() @ out[A_KEY].double(), weighted_mean_product(ups), atol=1e-5)
    assert strategy.round_metrics()["exact_energy_kept"] > 1 - 1e-9


def test_ffa_site_training_keeps_a_frozen_and_moves_b(tiny_models):
    config = Config(model=ModelSection(path=str(tiny_models["llama"]), task="causal-lm", max_length=32),
                    lora=LoraSection(rank=4, alpha=8), train=TrainSection(local_steps=2, batch_size=4, lr=0.5))
    cached = cached_model(config, [])
    rows = [{"text": f"note {i} about chest pain and cough"} for i in range(16)]
    examples = encode(rows, cached.tokenizer, config, [], "rows")
    before = adapter_of(cached.model)
    with frozen(cached.model, ("lora_A",)):
        train_locally(cached.model, examples, config, DPPlan(1.0, 0.25, 2), cached.tokenizer.pad_token_id, seed=0)
    after = adapter_of(cached.model)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_A" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(p.requires_grad for n, p in cached.model.named_parameters() if "lora_A" in n), "A trainable again afterwards"

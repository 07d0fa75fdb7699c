"""FedSVD: sites train B with A frozen (as ffa); the coordinator averages B and
re-factorizes mean(B)·A_prev by SVD into an orthonormal A and B = U·S."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file

from fedlora.adapter_state import record_nbytes, to_record
from fedlora.config import StrategySection
from fedlora.strategies import ClientUpdate, get_strategy, trained_part
from fedlora.strategies.fedsvd import orthonormal_factors
from fedlora.strategies.lora_rank import seeded_a_rows

A1, B1, A2, B2, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.v.lora_A.weight", "m.v.lora_B.weight", "m.classifier.weight"


def global_adapter(rank: int = 4, out: int = 10, inp: int = 12, zero_b: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """As PEFT initialises it: Kaiming-uniform A, zero B (or random B), and a head."""
    gen = torch.Generator().manual_seed(seed)
    b = (lambda: torch.zeros(out, rank)) if zero_b else (lambda: torch.randn(out, rank, generator=gen))
    return {A1: seeded_a_rows(rank, inp, seed, A1), B1: b(), A2: seeded_a_rows(rank, inp, seed, A2), B2: b(),
            HEAD: torch.randn(3, out, generator=gen)}


def site_updates(g: dict[str, torch.Tensor], n: int = 4, seed: int = 1) -> list[ClientUpdate]:
    """What sites send under fedsvd: B (and the head) only, trained from the global values."""
    gen = torch.Generator().manual_seed(seed)
    strategy = get_strategy(StrategySection(name="fedsvd"))
    ups = []
    for i in range(n):
        trained = {k: v + torch.randn(v.shape, generator=gen) for k, v in trained_part(g, strategy.frozen_factors).items()}
        ups.append(ClientUpdate(i, trained, num_examples=int(torch.randint(1, 100, (1,), generator=gen))))
    return ups


def mean_of(ups: list[ClientUpdate], key: str) -> torch.Tensor:
    total = sum(u.num_examples for u in ups)
    return sum((u.num_examples / total) * u.adapter[key].double() for u in ups)


def test_orthonormal_factors_preserve_the_product_to_float64_precision():
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 6, generator=gen, dtype=torch.float64), torch.randn(6, 30, generator=gen, dtype=torch.float64)
    new_a, new_b = orthonormal_factors(b, a)
    assert new_a.shape == (6, 30) and new_b.shape == (20, 6)
    assert torch.allclose(new_b @ new_a, b @ a, rtol=0, atol=1e-12 * float((b @ a).abs().max()))
    assert torch.allclose(new_a @ new_a.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    # B = U·S: orthogonal columns, by descending singular value.
    gram = new_b.T @ new_b
    assert torch.allclose(gram, torch.diag(gram.diagonal()), atol=1e-9 * float(gram.abs().max()))
    s = torch.linalg.svdvals(b @ a)[:6]
    assert torch.allclose(new_b.norm(dim=0), s, rtol=1e-10)


def test_a_round_preserves_the_mean_product_and_orthonormalizes_a():
    g = global_adapter()
    strategy = get_strategy(StrategySection(name="fedsvd"))
    ups = site_updates(g)
    out = strategy.aggregate(g, ups)
    for a_key, b_key in ((A1, B1), (A2, B2)):
        want = mean_of(ups, b_key) @ g[a_key].double()  # mean(B)·A_prev = mean(B·A_prev): every site had this A
        got = out[b_key].double() @ out[a_key].double()
        assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
        assert torch.allclose(out[a_key].double() @ out[a_key].double().T, torch.eye(4, dtype=torch.float64), atol=1e-6)
        assert not torch.allclose(out[a_key], g[a_key])  # A moved: it is re-oriented every round
    # The head is the num-examples-weighted mean, as under fedavg.
    assert torch.allclose(out[HEAD].double(), mean_of(ups, HEAD), atol=1e-6)
    assert strategy.state() == {}


def test_second_round_uses_the_new_a():
    strategy = get_strategy(StrategySection(name="fedsvd"))
    g1 = strategy.aggregate(global_adapter(), site_updates(global_adapter()))
    ups = site_updates(g1, seed=2)
    g2 = strategy.aggregate(g1, ups)
    want = mean_of(ups, B1) @ g1[A1].double()
    assert torch.allclose(g2[B1].double() @ g2[A1].double(), want, atol=1e-5 * float(want.abs().max()))
    # A's row space never leaves the initial one: B·A_prev lies in it.
    a0 = global_adapter()[A1].double()
    projector = a0.T @ torch.linalg.pinv(a0.T)
    assert torch.allclose(g2[A1].double() @ projector, g2[A1].double(), atol=1e-5)


def test_no_signal_keeps_a_orthonormal_and_b_zero():
    """A round in which every site sends B = 0 (nothing learned yet)."""
    g = global_adapter()
    ups = [ClientUpdate(i, trained_part(g, ("lora_A",)), 10) for i in range(3)]
    out = get_strategy(StrategySection(name="fedsvd")).aggregate(g, ups)
    assert torch.all(out[B1] == 0)
    assert torch.allclose(out[A1] @ out[A1].T, torch.eye(4), atol=1e-6)


def test_a_rank_deficient_mean_keeps_the_product_and_orthonormal_a():
    g = global_adapter(zero_b=False)
    g[B1][:, 2:] = 0  # the product has rank 2 < r = 4
    ups = [ClientUpdate(0, trained_part(g, ("lora_A",)), 10)]
    out = get_strategy(StrategySection(name="fedsvd")).aggregate(g, ups)
    want = g[B1].double() @ g[A1].double()
    assert torch.allclose(out[B1].double() @ out[A1].double(), want, atol=1e-6)
    assert torch.allclose(out[A1] @ out[A1].T, torch.eye(4), atol=1e-6)
    assert torch.all(out[B1][:, 2:].abs() < 1e-6)  # the components with no signal: zero B columns


def test_bytes_up_equal_ffa():
    g = global_adapter(rank=8, out=32, inp=32)
    fedsvd, ffa = get_strategy(StrategySection(name="fedsvd")), get_strategy(StrategySection(name="ffa"))
    assert fedsvd.frozen_factors == ffa.frozen_factors == ("lora_A",)
    up_svd, up_ffa = trained_part(g, fedsvd.frozen_factors), trained_part(g, ffa.frozen_factors)
    assert sorted(up_svd) == sorted(up_ffa) == sorted([B1, B2, HEAD])
    assert record_nbytes(to_record(up_svd)) == record_nbytes(to_record(up_ffa)) < record_nbytes(to_record(g))


def test_updates_that_carry_a_are_aggregated_with_the_global_a():
    """A site's A is frozen at the global value: an A in an update is not used."""
    g = global_adapter(zero_b=False)
    ups = [ClientUpdate(0, {**trained_part(g, ("lora_A",)), A1: torch.randn(4, 12), A2: torch.randn(4, 12)}, 10)]
    out = get_strategy(StrategySection(name="fedsvd")).aggregate(g, ups)
    assert torch.allclose(out[B1].double() @ out[A1].double(), g[B1].double() @ g[A1].double(), atol=1e-6)


def test_rank_above_the_input_features_is_refused():
    with pytest.raises(ValueError, match="rank 5 exceeds"):
        orthonormal_factors(torch.randn(10, 5), torch.randn(5, 4))


@pytest.mark.slow
def test_a_federation_sends_b_only_and_reorients_a(tmp_path, monkeypatch):
    """The real coordinator and the simulation's site ClientApp at three virtual sites, in process."""
    from fedlora.simulations.virtual_sites import simulated_site_app
    from tests.helpers.client_apps import run_in_process

    out = tmp_path / "fedsvd"
    rows = run_in_process(simulated_site_app(), out, monkeypatch, 3, {"federation.rounds": 2, "strategy.name": "fedsvd"})
    assert all(r["clients_ok"] == 3 for r in rows[1:])
    first = load_file(str(out / "checkpoints" / "round-0001" / "adapter.safetensors"))
    second = load_file(str(out / "checkpoints" / "round-0002" / "adapter.safetensors"))
    for k in (k for k in first if "lora_A" in k):
        for adapter in (first, second):
            a = adapter[k].double()
            assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5)
        assert not torch.equal(first[k], second[k])
    # Up: everything but A, from each of the three sites (plus small .npy headers).
    full = sum(t.numel() * 4 for t in first.values())
    lora_a = sum(t.numel() * 4 for k, t in first.items() if "lora_A" in k)
    assert 3 * (full - lora_a) <= rows[1]["bytes_up"] < 3 * (full - lora_a) * 1.02

"""Aggregation strategies and update screening, against independent numpy computations."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedlora.config import ConfigError, StrategySection, load_config
from fedlora.strategies import STRATEGIES, ClientUpdate, get_strategy
from fedlora.strategies.update_validation import reason_category, screen_updates

SHAPES = {"q.lora_A.weight": (2, 3), "q.lora_B.weight": (3, 2), "head.bias": (4,)}
# Per-coordinate scales spanning 1e-3 .. 1, so that Yogi's sign(v - delta^2) takes both signs.
SCALES = {k: np.logspace(-3, 0, int(np.prod(s))).reshape(s) for k, s in SHAPES.items()}


def initial_global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def to_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}


def drive(strategy, rounds: int = 3, clients: int = 3, seed: int = 1):
    """Run `rounds` rounds; client c's adapter = global + its own random offset.
    Returns per round (the clients' float32 arrays, their weights, the strategy's output)."""
    rng = np.random.default_rng(seed)
    x = to_torch(initial_global())
    history = []
    for _ in range(rounds):
        arrays = [{k: (x[k].numpy() + rng.normal(size=SHAPES[k]) * SCALES[k]).astype(np.float32) for k in SHAPES} for _ in range(clients)]
        weights = [int(w) for w in rng.integers(1, 100, size=clients)]
        updates = [ClientUpdate(i, to_torch(a), w) for i, (a, w) in enumerate(zip(arrays, weights))]
        x = strategy.aggregate(x, updates)
        history.append((arrays, weights, {k: v.numpy().copy() for k, v in x.items()}))
    return history


def numpy_reference(rule: str, history, s: StrategySection) -> list[dict[str, np.ndarray]]:
    """The update rules written out in numpy float64, from the same client arrays."""
    x = {k: v.astype(np.float64) for k, v in initial_global().items()}
    m = {k: np.zeros(SHAPES[k]) for k in SHAPES}
    v = {k: np.full(SHAPES[k], 0.0 if rule == "fedavgm" else s.tau**2) for k in SHAPES}
    outs = []
    for arrays, weights, _ in history:
        w = np.asarray(weights, dtype=np.float64)
        new = {}
        for k in SHAPES:
            mean = sum(wi * a[k].astype(np.float64) for wi, a in zip(w, arrays)) / w.sum()
            d = mean - x[k]
            if rule == "fedavgm":
                v[k] = s.momentum * v[k] + d
                step = v[k]
            else:
                m[k] = s.beta1 * m[k] + (1 - s.beta1) * d
                if rule == "fedadam":
                    v[k] = s.beta2 * v[k] + (1 - s.beta2) * d**2
                else:
                    v[k] = v[k] - (1 - s.beta2) * d**2 * np.sign(v[k] - d**2)
                step = m[k] / (np.sqrt(v[k]) + s.tau)
            new[k] = (x[k] + s.server_lr * step).astype(np.float32)
        outs.append(new)
        x = {k: a.astype(np.float64) for k, a in new.items()}
    return outs


SECTION = StrategySection(server_lr=0.3, momentum=0.8, beta1=0.85, beta2=0.95, tau=1e-2)


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_follow_their_update_rule(rule):
    section = replace(SECTION, name=rule)
    history = drive(get_strategy(section))
    reference = numpy_reference(rule, history, section)
    for (_, _, got), want in zip(history, reference):
        for k in SHAPES:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
    # not vacuous: the three rules give different trajectories, all different from fedavg
    fedavg_last = drive(get_strategy(StrategySection()))[-1][2]
    assert not np.allclose(history[-1][2]["q.lora_A.weight"], fedavg_last["q.lora_A.weight"], atol=1e-4)


def test_yogi_differs_from_adam_and_its_sign_takes_both_values():
    adam = drive(get_strategy(replace(SECTION, name="fedadam")))[-1][2]
    yogi = drive(get_strategy(replace(SECTION, name="fedyogi")))[-1][2]
    assert not all(np.allclose(adam[k], yogi[k], rtol=1e-4) for k in SHAPES)
    strategy = get_strategy(replace(SECTION, name="fedyogi"))
    drive(strategy, rounds=3)
    v = strategy.state()["v/q.lora_A.weight"]
    # large-delta coordinates grew above tau^2, tiny-delta ones were pulled toward delta^2 < tau^2
    assert (v > SECTION.tau**2).any() and (v < SECTION.tau**2).any()


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg():
    section = StrategySection(name="fedavgm", server_lr=1.0, momentum=0.0)
    got = drive(get_strategy(section))
    want = drive(get_strategy(StrategySection()))
    for (_, _, a), (_, _, b) in zip(got, want):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)


def test_the_configs_strategy_names_are_the_strategies():
    """fedlora.config checks strategy.name (and `fedlora compare --strategies`) without importing torch."""
    from fedlora.config import CHOICES, ConfigError, load_config

    assert sorted(CHOICES["strategy.name"]) == sorted(STRATEGIES)
    with pytest.raises(ConfigError, match="key 'strategy.name' must be one of"):
        load_config(None, {"strategy.name": "fedprox"})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trips_through_safetensors(name, tmp_path):
    section = replace(SECTION, name=name)
    rng = np.random.default_rng(3)
    rounds = [
        [ClientUpdate(i, to_torch({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}), 10 + i) for i in range(4)]
        for _ in range(2)
    ]
    x0 = to_torch(initial_global())
    original = get_strategy(section)
    x1 = original.aggregate(x0, rounds[0])
    state = original.state()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    if name in ("fedavgm", "fedadam", "fedyogi"):
        assert state["step"].ndim == 0 and int(state["step"]) == 1
        assert {key.split("/", 1)[1] for key in state if key != "step"} == set(SHAPES)
    save_file(state, str(tmp_path / "strategy.safetensors"))
    restored = get_strategy(section)
    restored.load_state(load_file(str(tmp_path / "strategy.safetensors")))
    a, b = original.aggregate(x1, rounds[1]), restored.aggregate(x1, rounds[1])
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert all(torch.equal(t, restored.state()[key]) for key, t in original.state().items())


def test_load_state_refuses_another_strategys_state():
    adam = get_strategy(replace(SECTION, name="fedadam"))
    drive(adam, rounds=1)
    with pytest.raises(ValueError, match="fedavgm.*'m/"):
        get_strategy(replace(SECTION, name="fedavgm")).load_state(adam.state())
    with pytest.raises(ValueError, match="stateless"):
        get_strategy(StrategySection()).load_state(adam.state())


def clients_from(values: np.ndarray) -> list[ClientUpdate]:
    """One client per row of `values` ([n, *shape] per key), with very unequal weights."""
    return [ClientUpdate(i, to_torch({k: values[k][i] for k in SHAPES}), num_examples=10**i) for i in range(len(values[next(iter(SHAPES))]))]


@pytest.mark.parametrize("n", [5, 6])
def test_median_and_trimmed_mean_match_numpy(n):
    rng = np.random.default_rng(n)
    values = {k: rng.normal(size=(n, *s)).astype(np.float32) for k, s in SHAPES.items()}
    median = get_strategy(StrategySection(name="median")).aggregate(to_torch(initial_global()), clients_from(values))
    for fraction in (0.0, 0.2, 0.4):
        trimmed = get_strategy(StrategySection(name="trimmed-mean", trim_fraction=fraction)).aggregate(to_torch(initial_global()), clients_from(values))
        cut = int(np.floor(fraction * n))
        for k in SHAPES:
            want = np.sort(values[k].astype(np.float64), axis=0)[cut : n - cut].mean(axis=0)
            np.testing.assert_allclose(trimmed[k].numpy(), want.astype(np.float32), rtol=1e-6)
    for k in SHAPES:
        np.testing.assert_allclose(median[k].numpy(), np.median(values[k].astype(np.float64), axis=0).astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("attack", [1e6, -1e6])
def test_robust_aggregates_bound_one_attackers_influence(attack):
    rng = np.random.default_rng(7)
    honest = {k: rng.normal(size=(5, *s)).astype(np.float32) for k, s in SHAPES.items()}
    values = {k: np.concatenate([v, np.full((1, *SHAPES[k]), attack, dtype=np.float32)]) for k, v in honest.items()}
    low = {k: v.min(axis=0) for k, v in honest.items()}
    high = {k: v.max(axis=0) for k, v in honest.items()}
    for section in (StrategySection(name="median"), StrategySection(name="trimmed-mean", trim_fraction=0.2)):
        out = get_strategy(section).aggregate(to_torch(initial_global()), clients_from(values))
        for k in SHAPES:
            assert (out[k].numpy() >= low[k]).all() and (out[k].numpy() <= high[k]).all(), section.name
    fedavg = get_strategy(StrategySection()).aggregate(to_torch(initial_global()), clients_from(values))
    assert not all(((fedavg[k].numpy() >= low[k]) & (fedavg[k].numpy() <= high[k])).all() for k in SHAPES)


def screening_round() -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    torch.manual_seed(0)
    g = {k: torch.randn(s) for k, s in SHAPES.items()}
    honest = [ClientUpdate(i, {k: t + 0.1 * torch.randn_like(t) for k, t in g.items()}, 50) for i in range(5)]
    nan = {k: t.clone() for k, t in g.items()}
    nan["q.lora_A.weight"][0, 0] = float("nan")
    shape = {**g, "head.bias": torch.zeros(5)}
    keys = {**{k: t for k, t in g.items() if k != "head.bias"}, "head.weight": torch.zeros(4)}
    huge = {k: t + 1e3 for k, t in g.items()}
    large = {k: t + 5.0 for k, t in g.items()}  # norm ~ 5 * sqrt(16) = 20: under 100, over 10 x median (~0.4)
    bad = [ClientUpdate(10, nan, 50), ClientUpdate(11, shape, 50), ClientUpdate(12, keys, 50),
           ClientUpdate(13, huge, 50), ClientUpdate(14, large, 50), ClientUpdate(15, dict(g), 0)]
    return g, honest[:3] + bad + honest[3:]


def test_screen_updates_rejects_bad_updates_by_category():
    g, updates = screening_round()
    accepted, rejected = screen_updates(updates, {u.node_id: g for u in updates}, StrategySection(max_update_norm=100.0, outlier_factor=10.0))
    assert [u.node_id for u in accepted] == [0, 1, 2, 3, 4]
    assert {node: reason_category(reason) for node, reason in rejected} == {
        10: "non-finite", 11: "wrong shape", 12: "wrong keys", 13: "norm", 14: "outlier", 15: "num-examples",
    }
    assert "max_update_norm 100" in dict(rejected)[13] and "median" in dict(rejected)[14]


def test_screen_updates_outlier_rule_alone_and_both_off():
    g, updates = screening_round()
    accepted, rejected = screen_updates(updates, {u.node_id: g for u in updates}, StrategySection(max_update_norm=0.0, outlier_factor=10.0))
    assert [u.node_id for u in accepted] == [0, 1, 2, 3, 4]
    assert reason_category(dict(rejected)[13]) == "outlier" and reason_category(dict(rejected)[14]) == "outlier"
    accepted, rejected = screen_updates(updates, {u.node_id: g for u in updates}, StrategySection(max_update_norm=0.0, outlier_factor=0.0))
    assert [u.node_id for u in accepted] == [0, 1, 2, 13, 14, 3, 4]
    assert {reason_category(r) for _, r in rejected} == {"non-finite", "wrong shape", "wrong keys", "num-examples"}


def test_unknown_strategy_lists_every_known_name():
    with pytest.raises(ValueError, match="strategy.name") as err:
        get_strategy(StrategySection(name="krum"))
    assert all(name in str(err.value) for name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "median", "trimmed-mean"))


@pytest.mark.parametrize("key, value", [
    ("strategy.trim_fraction", 0.5), ("strategy.trim_fraction", -0.1),
    ("strategy.beta1", 1.0), ("strategy.beta2", -0.1), ("strategy.momentum", 1.0),
    ("strategy.tau", 0.0), ("strategy.server_lr", -1.0), ("strategy.server_lr", float("inf")),
    ("strategy.max_update_norm", -1.0), ("strategy.outlier_factor", -1.0), ("strategy.outlier_factor", 0.5),
    ("strategy.beta1", float("nan")),
])
def test_bad_strategy_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(None, {key: value})
    assert len(str(err.value).splitlines()) == 1


def test_strategy_boundary_values_are_accepted():
    config = load_config(None, {"strategy.name": "trimmed-mean", "strategy.trim_fraction": 0, "strategy.momentum": 0,
                                "strategy.max_update_norm": 0, "strategy.outlier_factor": 0})
    assert config.strategy.trim_fraction == 0.0 and isinstance(config.strategy.trim_fraction, float)


def test_server_lr_zero_means_the_strategys_own_default():
    g = {"w": torch.zeros(3)}
    ups = [ClientUpdate(0, {"w": torch.tensor([1.0, -2.0, 0.5])}, 1)]
    assert torch.allclose(get_strategy(StrategySection(name="fedavgm", momentum=0.0)).aggregate(g, ups)["w"], ups[0].adapter["w"])
    adam = get_strategy(StrategySection(name="fedadam"))
    step = adam.aggregate(g, ups)["w"]
    # First fedadam step: m = (1-b1)d, v = b2*tau^2 + (1-b2)d^2, x = 0.01 * m / (sqrt(v) + tau): |x| < 0.01.
    assert torch.all(step.abs() < 0.01) and torch.all(step.sign() == ups[0].adapter["w"].sign())


@pytest.mark.parametrize("section", [StrategySection(name="median"), StrategySection(name="trimmed-mean", trim_fraction=0.2)])
def test_robust_aggregates_work_on_changes(section):
    """global + robust aggregate of (update - what that site was sent)."""
    rng = np.random.default_rng(11)
    g = to_torch(initial_global(5))
    sent = [to_torch({k: rng.normal(size=s) for k, s in SHAPES.items()}) for _ in range(5)]
    changes = {k: rng.normal(size=(5, *s)) for k, s in SHAPES.items()}
    updates = [ClientUpdate(i, {k: sent[i][k] + torch.from_numpy(changes[k][i]).float() for k in SHAPES}, 1, sent=sent[i])
               for i in range(5)]
    out = get_strategy(section).aggregate(g, updates)
    for k in SHAPES:
        moved = np.stack([(updates[i].adapter[k].double() - sent[i][k].double()).numpy() for i in range(5)])
        robust = np.median(moved, axis=0) if section.name == "median" else np.sort(moved, axis=0)[1:4].mean(axis=0)
        np.testing.assert_allclose(out[k].numpy(), (g[k].double().numpy() + robust).astype(np.float32), rtol=1e-6, atol=1e-7)
    # A round in which nobody changed anything leaves the global adapter as it was.
    still = get_strategy(section).aggregate(g, [ClientUpdate(i, dict(sent[i]), 1, sent=sent[i]) for i in range(5)])
    assert all(torch.equal(still[k], g[k]) for k in SHAPES)

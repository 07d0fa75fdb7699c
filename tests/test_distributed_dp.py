"""Distributed DP (`privacy.mode = "distributed"`): the Skellam accounting against
independent computations, the site's rounded clipped sum, and whole rounds through the
real site ClientApp and coordinator code (the in-process grid of tests/helpers/in_process.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType
from opacus.accountants.analysis.rdp import compute_rdp
from scipy.special import logsumexp
from scipy.stats import skellam as scipy_skellam

from fedlora.adapter_state import adapter_of
from fedlora.base_model import build_peft_model
from fedlora.config import ConfigError, load_config
from fedlora.privacy import distributed_dp, skellam
from fedlora.privacy import secure_aggregation_records as records
from fedlora.privacy.accounting import calibrate_noise, epsilon_of
from fedlora.privacy.site_ledger import SiteLedger
from fedlora.server.secure_round import UNMASK_FAILED
from tests.helpers.in_process import NODES, attempt, coordinator_identity, federation  # noqa: F401 (fixtures)


def exact_skellam_divergence(alpha: float, lam: float, shift: int) -> float:
    """D_alpha(Sk(lam) + shift || Sk(lam)), summed over the support from scipy's pmf."""
    width = int(shift + 30 * math.sqrt(2 * lam) + 100)
    x = np.arange(-width, width + 1)
    p, q = scipy_skellam.logpmf(x - shift, lam, lam), scipy_skellam.logpmf(x, lam, lam)
    finite = np.isfinite(p) & np.isfinite(q)
    return float(logsumexp(alpha * p[finite] + (1 - alpha) * q[finite]) / (alpha - 1))


@pytest.mark.parametrize("lam", [0.5, 3.0, 40.0, 2000.0])
def test_the_skellam_rdp_bound_holds_against_exact_divergences(lam):
    worst = 0.0
    for shift in (1, 2, 5, 20):
        for alpha in (1.5, 2, 4, 16, 64):
            exact = exact_skellam_divergence(alpha, lam, shift)
            bound = skellam.skellam_rdp(alpha, lam, shift, shift)  # one coordinate: l1 = l2 = |shift|
            assert exact <= bound * (1 + 1e-9), (lam, shift, alpha, exact, bound)
            worst = max(worst, exact / bound)
    if lam >= 2000:
        assert worst > 0.99  # at large lam the bound is the Gaussian's, and tight


@pytest.mark.parametrize("sigma,q", [(0.8, 0.01), (1.0, 0.067), (2.0, 0.2), (1.2, 0.001)])
def test_zhu_wang_subsampling_bounds_opacus_exact_sampled_gaussian(sigma, q):
    """An upper bound on any mechanism's subsampled RDP must bound the Gaussian's exact one
    (Opacus, Mironov et al. 2019), and at order 2 Zhu and Wang's bound is tight."""
    gaussian = np.array([a / (2 * sigma**2) for a in skellam.ORDERS])
    bound = skellam.poisson_subsampled_rdp(q, gaussian)
    exact = np.array(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(skellam.ORDERS)))
    assert np.all(bound >= exact * (1 - 1e-9))
    assert bound[0] == pytest.approx(exact[0], rel=1e-9)
    assert np.all(skellam.poisson_subsampled_rdp(1.0, gaussian) == gaussian)


def test_distributed_accounting_composes_skellam_and_gaussian_entries_in_rdp():
    l2, l1 = skellam.sensitivities(10_000, records.LEVELS)
    step, evaluation = (1.1, 0.05, 1, l2, l1), (5.0, 1.0, 3)
    history = [step] * 10 + [evaluation] * 11
    # Independently: Zhu-Wang over the Skellam bound, Opacus for the evaluations, Opacus's conversion.
    lam = skellam.skellam_lambda(1.1, l2)
    base = np.array([skellam.skellam_rdp(a, lam, l2, l1) for a in skellam.ORDERS])
    rdp = 10 * skellam.poisson_subsampled_rdp(0.05, base) + np.array(
        compute_rdp(q=1.0, noise_multiplier=5.0, steps=33, orders=list(skellam.ORDERS)))
    from opacus.accountants.analysis.rdp import get_privacy_spent

    independent, _ = get_privacy_spent(orders=list(skellam.ORDERS), rdp=rdp, delta=1e-5)
    assert epsilon_of(history, 1e-5, "prv") == pytest.approx(independent, rel=1e-9)
    # With lam this large the Skellam step costs what a Gaussian step would under the same bound, no less.
    gaussian = epsilon_of([(1.1, 0.05, 10), (5.0, 1.0, 33)], 1e-5, "rdp")
    assert gaussian <= epsilon_of(history, 1e-5, "rdp") <= gaussian * 1.5

    quiet = (20.0, 1.0, 33)
    sigma = calibrate_noise(4.0, 1e-5, 0.05, 10, "prv", [quiet], (l2, l1))
    assert 4.0 - 0.02 <= epsilon_of([(sigma, 0.05, 10, l2, l1), quiet], 1e-5, "prv") <= 4.0


def test_the_gaussian_entries_of_a_distributed_ledger_compose_as_dp_accounting_says():
    """A site that took part in distributed DP states its whole total in RDP at ORDERS: its
    Gaussian entries (evaluations, local DP rounds of other runs) against Google's
    dp-accounting RDP accountant at the same orders."""
    from dp_accounting import dp_event, rdp

    history = [(0.8, 0.02, 100), (1.1, 0.05, 40), (13.0, 1.0, 12)]
    reference = rdp.RdpAccountant(orders=list(skellam.ORDERS))
    reference.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in history]))
    assert skellam.epsilon_of_rdp_history(history, 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-2)


def test_the_rounded_clipped_sum_is_each_records_clipped_gradient_within_rounding():
    torch.manual_seed(0)
    grads = [torch.randn(64, 3, 5) * 3, torch.randn(64, 7) * 0.01]  # large and tiny per-record norms
    levels, clip = 1 << 12, 1.0
    sums = distributed_dp.rounded_clipped_sum(grads, clip, levels, torch.Generator().manual_seed(1))
    norms = torch.cat([g.reshape(64, -1) for g in grads], 1).double().norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0) * levels
    for g, s in zip(grads, sums):
        assert s.dtype == torch.int64
        clipped = (g.double() * factor.view(-1, *([1] * (g.dim() - 1)))).sum(0)
        assert (s.double() - clipped).abs().max() <= 64  # each of 64 records rounds by less than 1
    # Unbiased: over many draws the mean integer sum approaches the clipped sum.
    draws = [distributed_dp.rounded_clipped_sum(grads, clip, levels, torch.Generator().manual_seed(k))[1] for k in range(200)]
    clipped = (grads[1].double() * factor.view(-1, 1)).sum(0)
    assert (torch.stack(draws).double().mean(0) - clipped).abs().max() < 1.0


def distributed(config, **overrides):
    return load_config(None, {**config.to_flat(), "privacy.mode": "distributed", "train.optimizer": "sgd",
                              "privacy.distributed_sample_rate": 0.25, "federation.rounds": 3, **overrides})


def capture_noisy_inputs(monkeypatch) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each site's vector as it is masked (integer sum plus noise, then its record count),
    and each site's integer sum before its noise."""
    from fedlora.client import training_handlers

    seen: list[np.ndarray] = []
    sums: list[np.ndarray] = []
    real = training_handlers.noisy_input

    def recording(integer_sum, *args, **kwargs):
        sums.append(np.array(integer_sum, dtype=np.int64))
        seen.append(real(integer_sum, *args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(training_handlers, "noisy_input", recording)
    return seen, sums


def test_a_distributed_round_takes_the_sgd_step_of_the_survivors_exact_noisy_sum(federation, monkeypatch):
    config, nodes, _ = federation
    # LoRA in both layers of the tiny model: enough values that the Skellam noise dwarfs the gradients' sum.
    config = distributed(config, **{"lora.top_layers": 2})
    global_adapter = adapter_of(build_peft_model(config.model, config.lora, num_labels=3, seed=config.run.seed))
    for node_config in nodes.values():
        node_config["allow-distributed-dp"] = True
    seen, sums = capture_noisy_inputs(monkeypatch)
    gone = NODES[3]  # shares keys, then leaves before masking: its noise share is missing, within the tolerance of 1
    grid, result = attempt(config, nodes, global_adapter, drop={gone: {MessageType.TRAIN}})
    assert set(result.survivors) == set(NODES) - {gone} and result.mean is not None
    assert len(seen) == 4

    spec = records.quantization(True, config.privacy.max_grad_norm, 5)
    total = np.zeros_like(seen[0])
    for vector in seen:
        total = (total + vector) & np.uint64((1 << spec.modulus_bits) - 1)
    expected, count = distributed_dp.coordinator_step(total, spec, 0.25, config.train.lr)
    assert count == sum(int(v[-1]) for v in seen) > 0  # the survivors' record counts
    assert np.array_equal(result.mean, expected)  # the secure sum is exactly the sum of the noisy inputs
    # The noise is there, at the planned level: Sk(lam / (n - t)) from each of the n - t = 4 survivors.
    signed = total[:-1].astype(np.int64)
    signed = np.where(signed >= 1 << (spec.modulus_bits - 1), signed - (1 << spec.modulus_bits), signed)
    ledger = SiteLedger.load(nodes[NODES[0]]["state-dir"])
    (entry,) = [m for r in ledger.runs for m in r.mechanisms]
    lam = skellam.skellam_lambda(entry.noise_multiplier, entry.l2)
    # The noise alone (the unmasked sum less the sites' integer sums) has the planned variance;
    # over d = 2,147 coordinates a sample variance is within 5 standard errors (5 sqrt(2/d) = 0.15).
    # (Measured with the gradients in, the variance ran up to 16% over: their share varies by run.)
    noise = signed - np.sum(sums, axis=0)
    assert np.var(noise.astype(np.float64)) == pytest.approx(2 * lam, rel=5 * math.sqrt(2 / len(noise)))
    assert np.var(np.sum(sums, axis=0).astype(np.float64)) < np.var(noise.astype(np.float64))  # the noise outweighs the gradients
    # Every survivor's ledger: one distributed step, with its sensitivities and its trust assumption.
    for n in set(NODES) - {gone}:
        (m,) = [m for r in SiteLedger.load(nodes[n]["state-dir"]).runs for m in r.mechanisms]
        assert (m.kind, m.steps, m.sample_rate) == ("distributed", 1, 0.25)
        assert m.trust and "at most 1 of the 5 masking sites" in m.trust
        assert m.l2 == pytest.approx(records.LEVELS + math.sqrt(len(seen[0]) - 1))
    # `fedlora privacy` states the assumption, and the RDP total the guard counted.
    from fedlora.privacy.ledger_report import ledger_summary, ledger_table

    summary = ledger_summary(nodes[NODES[0]]["state-dir"], recompute=True)
    assert "assumes: secure aggregation reveals only the sum; at most 1 of the 5" in ledger_table(summary)
    assert summary["epsilon_total"] == pytest.approx(skellam.epsilon_of_rdp_history([entry.entry], config.privacy.delta))


def test_sites_reveal_nothing_when_more_sites_than_the_tolerance_drop_before_masking(federation):
    """Two of five sites share keys and leave before masking: the three inputs (enough for
    the threshold of 3) carry 3/4 of the planned noise, so no site reveals."""
    config, nodes, global_adapter = federation
    config = distributed(config)
    for node_config in nodes.values():
        node_config["allow-distributed-dp"] = True
    gone = {n: {MessageType.TRAIN} for n in NODES[:2]}
    _, result = attempt(config, nodes, global_adapter, drop=gone)
    assert result.mean is None
    assert UNMASK_FAILED in result.replies.failures


def test_a_site_told_other_noise_terms_refuses_before_it_reads_data(federation):
    """The coordinator asks site 0 to train at another target epsilon (a share of other
    size): its aggregation context differs, so it refuses the train request unspent."""
    config, nodes, global_adapter = federation
    config = distributed(config)
    for node_config in nodes.values():
        node_config["allow-distributed-dp"] = True
    target = NODES[0]

    def other_terms(msg: Message) -> None:
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id == target:
            values = dict(msg.content["config"])
            values["privacy.target_epsilon"] = 1000.0
            msg.content["config"] = ConfigRecord(values)

    _, result = attempt(config, nodes, global_adapter, tamper=other_terms)
    assert result.replies.status[target] == "error: secure aggregation"
    assert not any(r.mechanisms for r in SiteLedger.load(nodes[target]["state-dir"]).runs)
    assert result.mean is not None  # the other four still make the step


def test_a_deployed_site_declines_distributed_dp_unless_its_policy_allows_it(federation):
    config, nodes, global_adapter = federation
    _, result = attempt(distributed(config), nodes, global_adapter)
    assert result.mean is None
    assert all(SiteLedger.load(c["state-dir"]).runs[0].declined[0].reason == "site policy: allow-distributed-dp"
               for c in nodes.values())
    for node_config in nodes.values():
        node_config.update({"allow-distributed-dp": True, "min-distributed-tolerance": 2})
    _, result = attempt(distributed(config), nodes, global_adapter)
    assert result.mean is None
    assert all(SiteLedger.load(c["state-dir"]).runs[0].declined[-1].reason == "site policy: min-distributed-tolerance"
               for c in nodes.values())


@pytest.mark.parametrize("overrides,key", [
    ({"federation.secure_aggregation": False}, "secure_aggregation"),
    ({"privacy.unit": "user"}, "privacy.unit"),
    ({"train.optimizer": "adamw"}, "train.optimizer"),
    ({"privacy.distributed_sample_rate": 1.5}, "privacy.distributed_sample_rate"),
    ({"privacy.distributed_tolerance": -1}, "privacy.distributed_tolerance"),
])
def test_configs_distributed_dp_cannot_serve_are_refused(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, {"privacy.mode": "distributed", "federation.secure_aggregation": True, **overrides})
    assert key in str(info.value)


@pytest.mark.slow
def test_a_distributed_federation_evaluating_every_second_round_spends_exactly_its_budget(tmp_path, monkeypatch):
    """The real coordinator and site ClientApp in process (distributed DP over real processes:
    tests/test_deployment.py) with distributed DP and federation.evaluate_every = 2:
    rounds 1-3 are one distributed step each, the adapter is evaluated after rounds 0, 2
    and 3 only, and every site ends at the target epsilon (the plan counted exactly the
    evaluations that happened)."""
    from fedlora.simulations.virtual_sites import simulated_site_app
    from tests.helpers.client_apps import run_in_process

    overrides = {"federation.rounds": 3, "federation.evaluate_every": 2, "federation.secure_aggregation": True,
                 "privacy.mode": "distributed", "privacy.distributed_sample_rate": 0.2, "privacy.target_epsilon": 6.0}
    rows = run_in_process(simulated_site_app(), tmp_path / "run", monkeypatch, 3, overrides)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # Which rounds were evaluated, and by all three sites (the accuracy itself is a ratio of noisy
    # sums over a few validation notes: its noisy count can fall to <= 0, and then it is None).
    assert [r.get("eval_sites", 0) for r in rows] == [3, 0, 3, 3], rows
    assert all(r["clients_ok"] == 3 for r in rows[1:])
    for site in range(3):
        ledger = SiteLedger.load(tmp_path / "run" / "sites" / str(site))
        (run,) = ledger.runs
        assert [m.round for m in run.mechanisms if m.kind == "distributed"] == [1, 2, 3]
        assert [m.round for m in run.mechanisms if m.kind == "evaluation"] == [0, 2, 3]
        assert 6.0 - 0.05 <= epsilon_of(run.history, run.delta, run.accountant) <= 6.0

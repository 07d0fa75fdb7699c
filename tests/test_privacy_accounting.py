"""Noise calibration spends exactly the planned budget, composed round by round."""

from __future__ import annotations

import pytest

from fedlora.privacy.accounting import calibrate_noise, epsilon_of, sample_rate


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrated_noise_reaches_target_epsilon_at_the_last_planned_round(accountant):
    rounds, local_steps, target, delta = 4, 6, 8.0, 1e-5
    q = sample_rate(64, 480)
    sigma = calibrate_noise(target, delta, q, rounds * local_steps, accountant)
    history = []
    epsilons = []
    for _ in range(rounds):
        history.append((sigma, q, local_steps))  # one entry per round, as a site records it
        epsilons.append(epsilon_of(history, delta, accountant))
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    assert target - 0.1 <= epsilons[-1] <= target + 1e-6, epsilons
    assert epsilons[-2] < target - 0.1  # the budget is spent at the last round, not before
    # Composing per-round entries equals accounting all steps at once.
    assert epsilons[-1] == pytest.approx(epsilon_of([(sigma, q, rounds * local_steps)], delta, accountant), rel=1e-3)


def test_more_noise_less_epsilon_and_empty_history_is_zero():
    assert epsilon_of([], 1e-5) == 0.0
    q = 0.1
    assert epsilon_of([(2.0, q, 20)], 1e-5) < epsilon_of([(1.0, q, 20)], 1e-5)


def test_sample_rate_is_batch_over_examples_capped_at_one():
    assert sample_rate(64, 640) == pytest.approx(0.1)
    assert sample_rate(64, 10) == 1.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_memoised_rdp_terms_give_the_same_epsilons_as_opacus_own(accountant):
    from opacus.accountants.analysis import rdp as opacus_rdp

    from fedlora.privacy import accounting

    histories = [[(0.72, 0.15, 4)], [(13.05, 1.0, 3), (0.72, 0.15, 4), (13.05, 1.0, 3)], [(1.1, 0.01, 200), (0.9, 0.2, 3)]]
    try:
        accounting.clear_caches()
        accounting.set_rdp_memo(False)
        plain = [accounting.epsilon_of(h, 1e-5, accountant) for h in histories]
        accounting.clear_caches()
        accounting.set_rdp_memo(True)
        memoised = [accounting.epsilon_of(h, 1e-5, accountant) for h in histories]
        accounting._epsilon.cache_clear()  # the epsilons again, now from the warm RDP memo
        again = [accounting.epsilon_of(h, 1e-5, accountant) for h in histories]
    finally:
        accounting.set_rdp_memo(True)
    assert memoised == plain and again == plain
    assert accounting._memoised_one_step_rdp.cache_info().hits > 0
    # Outside fedlora's own accountant calls, Opacus is Opacus (nothing patched for others).
    assert opacus_rdp._compute_rdp is accounting._opacus_one_step_rdp


def test_a_history_past_prvs_step_bound_is_composed_in_rdp_in_bounded_memory():
    """100,000 steps once made PRV allocate 24 GB at a site: past PRV_MAX_STEPS the epsilon
    is RDP's, an upper bound on PRV's (the site can only overstate what it spent)."""
    import resource
    import time

    from fedlora.privacy import accounting

    long = [(0.8, 0.05, 100_000)]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert epsilon_of(long, 1e-5, "prv") == epsilon_of(long, 1e-5, "rdp")
    assert time.perf_counter() - start < 30 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
    short = [(0.8, 0.05, accounting.PRV_MAX_STEPS)]
    assert epsilon_of(short, 1e-5, "prv") < epsilon_of(short, 1e-5, "rdp")  # PRV below the bound: tighter

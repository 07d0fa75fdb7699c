"""This site's DP plans: the noise of a training round and of an evaluation.

The site, not the coordinator, owns its ledger (`state-dir`) and its limit (its
policy's `max-epsilon`, client/site_policy.py). Virtual sites of a simulation keep
their ledgers in the run directory, `RUN_DIR/sites/<partition-id>/`.

A run plans `federation.rounds` training rounds and an evaluation after every
`federation.evaluate_every`-th round and the last, plus round 0 (the untrained adapter). The evaluations' noise is calibrated to spend
`privacy.eval_epsilon` over all of them; the training noise so that training and
evaluations together spend `privacy.target_epsilon`. A site whose own limit cannot
afford that plan calibrates its training noise to its limit instead (policy
`calibrate-to-limit`) and takes part in every round with more noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from fedlora.client.local_training import DPPlan, privacy_units
from fedlora.client.site_policy import SitePolicy
from fedlora.config import Config, evaluated_rounds
from fedlora.disk_cache import cached_in_file
from fedlora.text_data import Example
from fedlora.privacy.accounting import History, calibrate_noise, sample_rate
from fedlora.privacy.distributed_dp import DistributedPlan
from fedlora.privacy.secure_aggregation_records import LEVELS
from fedlora.privacy.skellam import sensitivities
from fedlora.privacy.site_ledger import SiteLedger

# An evaluation releases three sums, each of sensitivity 1 (clip-normalised): units,
# correct predictions and clipped losses; as a mechanism, three Gaussian releases.
EVAL_RELEASES = 3


CALIBRATION_CACHE = "noise-calibrations.json"


def _calibrated(state_dir: Path | None, target: float, delta: float, rate: float, steps: int, accountant: str,
                fixed: History = (), sensitivities: tuple[float, float] | None = None) -> float:
    """calibrate_noise, kept in `state_dir`: the search takes seconds and a deployed
    site runs a fresh process for every message (a cache: recomputed if unreadable)."""
    args = (target, delta, rate, steps, accountant, sorted(map(list, fixed)), *([list(sensitivities)] if sensitivities else []))
    cache = state_dir / CALIBRATION_CACHE if state_dir else None
    return cached_in_file(cache, json.dumps(args),
                          lambda: calibrate_noise(target, delta, rate, steps, accountant, fixed, sensitivities))


def eval_mechanism(config: Config, state_dir: Path | None = None) -> tuple[float, float, int]:
    """One evaluation as a mechanism: (noise multiplier, sample rate 1, releases)."""
    privacy = config.privacy
    releases = EVAL_RELEASES * planned_evaluations(config)
    sigma = _calibrated(state_dir, privacy.eval_epsilon, privacy.delta, 1.0, releases, privacy.accountant)
    return (sigma, 1.0, EVAL_RELEASES)


def calibrated_plan(config: Config, train: list[Example], state_dir: Path | None = None) -> DPPlan:
    """The run's plan at this site: noise from its own unit count, batch size, local steps
    and the planned rounds, so that training plus the planned evaluations end at
    privacy.target_epsilon."""
    units = len(privacy_units(train))
    rate = sample_rate(config.train.batch_size, units)
    evaluations = [eval_mechanism(config, state_dir)] * planned_evaluations(config)
    privacy = config.privacy
    sigma = _calibrated(state_dir, privacy.target_epsilon, privacy.delta, rate,
                        config.federation.rounds * config.train.local_steps, privacy.accountant, evaluations)
    return DPPlan(noise_multiplier=sigma, sample_rate=rate, steps=config.train.local_steps, unit=config.privacy.unit, units=units)


def distributed_plan(config: Config, values: int, state_dir: Path | None = None) -> DistributedPlan:
    """Distributed mode's plan, the same at every site: one Skellam step per round at the
    run's sample rate, for `values` trained coordinates, its noise calibrated so that the
    rounds plus the planned evaluations spend privacy.target_epsilon (in RDP)."""
    privacy = config.privacy
    l2, l1 = sensitivities(values, LEVELS)
    evaluations = [eval_mechanism(config, state_dir)] * planned_evaluations(config)
    sigma = _calibrated(state_dir, privacy.target_epsilon, privacy.delta, privacy.distributed_sample_rate,
                        config.federation.rounds, privacy.accountant, evaluations, (l2, l1))
    return DistributedPlan(sigma, privacy.distributed_sample_rate, l2, l1, privacy.distributed_tolerance)


def remaining_plan(config: Config, plan: DPPlan, server_round: int, state_dir: Path | None) -> tuple[History, History]:
    """What the run still plans after this round's training: (the later rounds, the
    evaluations of this and later rounds)."""
    later_rounds = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * max(0, config.federation.rounds - server_round)
    evaluations = [eval_mechanism(config, state_dir)] * planned_evaluations(config, server_round)
    return later_rounds, evaluations


def planned_evaluations(config: Config, from_round: int = 0) -> int:
    """The evaluations the run plans from `from_round` on (config.evaluated_rounds)."""
    return sum(1 for r in evaluated_rounds(config) if r >= from_round)


def plan_within_limit(config: Config, plan: DPPlan, ledger: SiteLedger, policy: SitePolicy, delta: float,
                      server_round: int, state_dir: Path | None) -> DPPlan:
    """The run's plan, or, if the site's limit cannot afford it and the policy says
    calibrate-to-limit, the plan with the noise that spends exactly the limit over the
    rounds left (the budget guard still checks the result)."""
    limit, accountant = policy.max_epsilon, config.privacy.accountant
    if not policy.calibrate_to_limit or math.isinf(limit):
        return plan
    this_round = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    later_rounds, evaluations = remaining_plan(config, plan, server_round, state_dir)
    if ledger.epsilon(delta, accountant, extra=[this_round, *later_rounds, *evaluations]) <= limit:
        return plan
    rounds_left = config.federation.rounds - server_round + 1
    try:
        sigma = _calibrated(state_dir, limit, ledger.guard_delta(delta), plan.sample_rate, rounds_left * plan.steps,
                            accountant, ledger.history() + evaluations)
    except ValueError:
        return plan  # not even infinite noise fits: the guard declines
    return replace(plan, noise_multiplier=max(sigma, plan.noise_multiplier))


def noise_increase(planned: DPPlan, plan: DPPlan) -> float:
    """How many times the run's planned noise multiplier `plan` trains with (1 = the plan)."""
    return plan.noise_multiplier / planned.noise_multiplier if planned.noise_multiplier > 0 else 1.0


def too_noisy(policy: SitePolicy, planned: DPPlan, plan: DPPlan) -> bool:
    """Whether the site's `max-noise-increase` declines `plan`: noise raised that far to stay
    within the limit leaves little to learn, and spends the rest of the budget on it. Decided
    from the plans alone (the run's config, the ledger, the unit count public to accounting)."""
    return policy.max_noise_increase > 0 and noise_increase(planned, plan) > policy.max_noise_increase

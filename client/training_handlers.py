"""The site's train and evaluate handlers: the model, the data and DP-SGD.

Both run behind `screen_request` (client/client_app.py): the request is audited and
checked against the site's policy before any data is read. Under DP every number that
leaves is data-independent or accounted in the site's ledger first.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict

from fedlora.adapter_state import Adapter, adapter_digest, adapter_of, from_record, put_adapter, to_record
from fedlora.client import secure_masking
from fedlora.client.request_screening import policy_declined, screen_request, site_config
from fedlora.client.local_evaluation import evaluate_locally
from fedlora.client.local_training import distributed_gradient_sum, frozen, train_locally
from fedlora.client.model_cache import CachedModel, cached_model
from fedlora.client.site_data import SiteData, load_site_data
from fedlora.client.site_statement import signed_statement
from fedlora.client.site_privacy import (calibrated_plan, distributed_plan, eval_mechanism, noise_increase,
                                         plan_within_limit, planned_evaluations, remaining_plan, too_noisy)
from fedlora.config import Config
from fedlora.messages import DECLINED_METRICS, EVALUATE_METRICS, TRAIN_METRICS, metric_record
from fedlora.privacy import privacy_statement, secure_aggregation_records as records
from fedlora.privacy.budget_guard import BudgetDecision, check_budget
from fedlora.privacy.distributed_dp import noisy_input
from fedlora.privacy.finite import check_finite_tensors, check_finite_values
from fedlora.privacy.noisy_release import noisy_sum
from fedlora.privacy.secure_aggregation import SecureAggregationError
from fedlora.privacy.site_audit import EVALUATION_READ, append_audit
from fedlora.privacy.site_ledger import Declined, Mechanism, open_ledger
from fedlora.round_schedule import frozen_in_round, with_round_lr
from fedlora.strategies import get_strategy, trained_part

log = logging.getLogger("fedlora.client")


def size_bucket(units: int) -> int:
    """The largest power of two <= units (0 for none): the weight a DP site reports.
    Coarse on purpose; the exact count is no secret to the accountant's sample rate
    either (docs/privacy.md), but nothing finer than weighting needs leaves."""
    return 1 << (units.bit_length() - 1) if units > 0 else 0


def budget_declined(msg: Message, config: Config, server_round: int, decision: BudgetDecision, ledger, state_dir: Path) -> Message:
    """A refusal, not an error: no tensors, and why (the coordinator counts it as declined)."""
    kind = msg.metadata.message_type.split(".")[0]
    run, privacy = config.run.output_dir, config.privacy
    decline = Declined(server_round, decision.epsilon_spent, decision.epsilon_after, decision.limit, message=kind)
    ledger.record(run, privacy.accountant, privacy.delta, decline, decision.limit)
    append_audit(state_dir, "declined", run, message=kind, round=server_round, reason="privacy budget")
    log.warning("round %d %s: declined, epsilon would reach %.3f > the site's limit %.3f (spent %.3f)",
                server_round, kind, decision.epsilon_after, decision.limit, decision.epsilon_spent)
    metrics = metric_record(
        {"declined": 1, "epsilon": decision.epsilon_spent, "epsilon-would-be": decision.epsilon_after,
         "epsilon-limit": decision.limit},
        DECLINED_METRICS,
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def model_with_adapter(msg: Message, config: Config) -> tuple[CachedModel, Adapter, str]:
    """The cached base model with the sent global adapter put in (its keys, shapes and
    finiteness checked), the adapter as sent, and the digest of the adapter as loaded (what
    the reply's statement names). Reads no data: a refusal here is free."""
    cached = cached_model(config, config.data.labels)
    sent = from_record(msg.content["arrays"])
    put_adapter(cached.model, sent)
    return cached, sent, adapter_digest(adapter_of(cached.model))


def site_data(context: Context, config: Config, cached: CachedModel) -> SiteData:
    """This site's data (train and validation splits), checked against the site's own
    rules (client/site_data.py), which the request was checked against before this is
    called; its size is public to the accounting (q)."""
    return load_site_data(config, config.data.labels, context.node_config, cached.tokenizer)


def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    config, server_round = site_config(msg, context)
    refusal, policy, state_dir = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal
    # Secure aggregation: the request is checked before the site reads data or spends budget.
    masking = None
    if records.RECORD in msg.content.config_records:
        masking = secure_masking.check_masking_request(msg, context, config, server_round)
    elif config.federation.secure_aggregation:
        raise SecureAggregationError("the run asks for secure aggregation, but this train request carries none")

    if config.privacy.mode == "distributed":
        return train_distributed(msg, context, config, server_round, policy, state_dir, masking)

    cached, sent, received = model_with_adapter(msg, config)
    site = site_data(context, config, cached)

    # Train (with the factors the strategy keeps frozen, e.g. LoRA A under ffa), at this
    # round's learning rate (fedlora/round_schedule.py: from the config and the round alone).
    frozen_factors = get_strategy(config.strategy).frozen_factors + frozen_in_round(config.train, server_round)
    config = with_round_lr(config, server_round)
    seed = config.run.seed * 1_000_003 + server_round * 7919 + context.node_id % 1_000_003
    if masking is not None:
        # A seed the coordinator knows would let it train twice alike and difference two sums (without DP).
        seed = secrets.randbits(62)
    if not config.privacy.enabled:  # the policy allowed it: allow-no-dp and no limit
        with frozen(cached.model, frozen_factors):
            result = train_locally(cached.model, site.train, config, None, cached.tokenizer.pad_token_id, seed)
        log.info("round %d: %s, %d examples, loss %.4f (no DP)", server_round, site.source, len(site.train), result.loss)
        values = {"num-examples": len(site.train), "train-loss": result.loss, "epsilon": 0.0, "noise-multiplier": 0.0,
                  "steps": result.steps, "seconds": time.perf_counter() - start}
        spent = None  # nothing accounted: the statement reads what earlier entries spent
    else:
        # Privacy: noise calibrated from this site's data; its own ledger and limit decide.
        run, delta, accountant, limit = config.run.output_dir, config.privacy.delta, config.privacy.accountant, policy.max_epsilon
        with open_ledger(state_dir) as ledger:
            planned_plan = calibrated_plan(config, site.train, state_dir)
            plan = plan_within_limit(config, planned_plan, ledger, policy, delta, server_round, state_dir)
            if too_noisy(policy, planned_plan, plan):
                log.warning("round %d: staying within the limit would take noise multiplier %.3f, %.1fx the run's plan "
                            "(%.3f): more than max-noise-increase %g allows", server_round, plan.noise_multiplier,
                            noise_increase(planned_plan, plan), planned_plan.noise_multiplier, policy.max_noise_increase)
                return policy_declined(msg, config, server_round, "max-noise-increase", policy, state_dir, ledger)
            mechanism = (plan.noise_multiplier, plan.sample_rate, plan.steps)
            decision = check_budget(ledger, [mechanism], delta, accountant, limit)
            if not decision.allowed:
                return budget_declined(msg, config, server_round, decision, ledger, state_dir)
            # Charged before training: whatever follows (the update, or an error a crafted
            # adapter provokes on one record) depends on the data. A crash over-counts: safe.
            ledger.record(run, accountant, delta, Mechanism(server_round, *mechanism, unit=plan.unit), limit)
            epsilon = decision.epsilon_after  # the ledger now holds exactly what the guard counted
            run_epsilon = ledger.run_epsilon(run)
            spent = (run_epsilon, epsilon, ledger.guard_delta(delta))
            later_rounds, evaluations = remaining_plan(config, plan, server_round, state_dir)
            planned = ledger.epsilon(delta, accountant, extra=later_rounds + evaluations)
        with frozen(cached.model, frozen_factors):
            result = train_locally(cached.model, site.train, config, plan, cached.tokenizer.pad_token_id, seed)
        log.info("round %d: %s, %d examples, loss %.4f; noise multiplier %.4f (q %.4f per %s, %d steps), epsilon %.3f, "
                 "expected %.3f after round %d, limit %s", server_round, site.source, len(site.train), result.loss,
                 plan.noise_multiplier, plan.sample_rate, plan.unit, plan.steps, epsilon, planned, config.federation.rounds,
                 "none" if math.isinf(limit) else f"{limit:.3f}")
        # The loss and the time are data-dependent and unaccounted: they stay here. The
        # aggregation weight is the site's unit count rounded down to a power of two.
        values = {"num-examples": size_bucket(plan.units), "epsilon": epsilon, "run-epsilon": run_epsilon,
                  "planned-epsilon": planned,
                  "noise-multiplier": plan.noise_multiplier, "planned-noise-multiplier": planned_plan.noise_multiplier,
                  "steps": plan.steps}

    # Reply: the trained adapter tensors (or, under secure aggregation, their masked change)
    # and whitelisted scalars only.
    trained = trained_part(adapter_of(cached.model), frozen_factors)
    # The last line (privacy/finite.py): a non-finite update is refused, after its ledger entry.
    check_finite_tensors(trained, "the trained adapter")
    check_finite_values(values)
    metrics = metric_record(values, TRAIN_METRICS)
    if masking is not None:
        weight = max(1, min(int(values["num-examples"]), records.MAX_WEIGHT))
        content = secure_masking.masked_update(masking, context, trained, sent, weight)
        content["metrics"] = metrics
    else:
        content = RecordDict({"arrays": to_record(trained), "metrics": metrics})
    with_statement(content, context, config, server_round, "train", state_dir, spent, received, masking is not None)
    return Message(content=content, reply_to=msg)


def with_statement(content: RecordDict, context: Context, config: Config, server_round: int, message: str,
                   state_dir: Path, spent: tuple[float, float, float] | None, adapter: str,
                   secure_aggregation: bool = False) -> None:
    """Add the site's signed privacy statement (client/site_statement.py), if it has a node key."""
    statement = signed_statement(context, config, server_round, message, state_dir, spent, adapter, secure_aggregation)
    if statement is not None:
        content[privacy_statement.RECORD] = statement


def train_distributed(msg: Message, context: Context, config: Config, server_round: int, policy, state_dir: Path,
                      masking: secure_masking.MaskingRequest) -> Message:
    """Distributed DP (privacy/distributed_dp.py): this site's noisy share of one DP-SGD step
    over the union of the sites' records, masked; the coordinator takes the step."""
    start = time.perf_counter()
    cached, sent, received = model_with_adapter(msg, config)
    site = site_data(context, config, cached)
    frozen_factors = get_strategy(config.strategy).frozen_factors
    sharers = len(masking.sharers)

    # The plan is the run's, the same at every site (its terms are bound into the aggregation
    # context); the site's own ledger and limit decide whether it takes part.
    # put_adapter checked `sent` key by key and shape by shape against this site's own model.
    values = sum(t.numel() for t in trained_part(sent, frozen_factors).values())
    plan = distributed_plan(config, values, state_dir)
    run, delta, accountant, limit = config.run.output_dir, config.privacy.delta, config.privacy.accountant, policy.max_epsilon
    if not 0 < len(site.train) <= records.MAX_DISTRIBUTED_RECORDS:
        # Before the ledger entry (a site too large would otherwise spend every round and never
        # contribute); the record count is public to the accounting, as q is under local DP.
        raise SecureAggregationError(f"distributed DP sums 1 to {records.MAX_DISTRIBUTED_RECORDS} records per site "
                                     f"(this site has {len(site.train)})")
    with open_ledger(state_dir) as ledger:
        decision = check_budget(ledger, [plan.mechanism], delta, accountant, limit)
        if not decision.allowed:
            return budget_declined(msg, config, server_round, decision, ledger, state_dir)
        # Charged before the gradients are taken, with the assumption the guarantee rests on.
        ledger.record(run, accountant, delta, Mechanism(server_round, *plan.mechanism[:3], unit="example", kind="distributed",
                                                       l2=plan.l2, l1=plan.l1, trust=plan.trust(sharers)), limit)
        later = [plan.mechanism] * max(0, config.federation.rounds - server_round)
        evaluations = [eval_mechanism(config, state_dir)] * planned_evaluations(config, server_round)
        planned = ledger.epsilon(delta, accountant, extra=later + evaluations)
        spent = (ledger.run_epsilon(run), decision.epsilon_after, ledger.guard_delta(delta))
    with frozen(cached.model, frozen_factors):
        sums, batch = distributed_gradient_sum(cached.model, site.train, config, plan.sample_rate, records.LEVELS,
                                               cached.tokenizer.pad_token_id)
    integer_sum = np.concatenate([sums[k].flatten().numpy() for k in sorted(sums)])
    noisy = noisy_input(integer_sum, len(site.train), plan.share(sharers), masking.spec, np.random.default_rng())
    log.info("round %d: %s, distributed DP step over %d sampled records (q %.4f); Skellam share for %d sites "
             "(tolerance %d), noise multiplier %.4f; epsilon %.3f, expected %.3f after round %d, limit %s (%.1f s)",
             server_round, site.source, batch, plan.sample_rate, sharers, plan.tolerance, plan.noise_multiplier,
             decision.epsilon_after, planned, config.federation.rounds, "none" if math.isinf(limit) else f"{limit:.3f}",
             time.perf_counter() - start)
    content = secure_masking.masked_noisy_sum(masking, context, noisy, plan.min_survivors(sharers))
    content["metrics"] = metric_record({"num-examples": size_bucket(len(site.train)), "epsilon": decision.epsilon_after,
                                        "planned-epsilon": planned, "noise-multiplier": plan.noise_multiplier, "steps": 1},
                                       TRAIN_METRICS)
    with_statement(content, context, config, server_round, "train", state_dir, spent, received, secure_aggregation=True)
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    config, server_round = site_config(msg, context)
    refusal, policy, state_dir = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal
    cached, _, received = model_with_adapter(msg, config)  # no data yet: a refused adapter is free
    pad_id, run, classification = cached.tokenizer.pad_token_id, config.run.output_dir, config.model.task == "classification"

    if not config.privacy.enabled:  # the policy allowed it: exact sums
        read_for_evaluation(state_dir, run, server_round)
        sums = evaluate_locally(cached.model, site_data(context, config, cached).validation, config, pad_id)
        values = {"num-examples": sums.units, "eval-correct": sums.correct, "eval-loss-sum": sums.loss, "epsilon": 0.0}
        spent = None
    else:
        # Gaussian noise on each released sum. The evaluation is charged before any data is
        # read: its noise does not depend on the data, and every outcome after reading does.
        delta, accountant, limit, clip = config.privacy.delta, config.privacy.accountant, policy.max_epsilon, config.privacy.eval_loss_clip
        with open_ledger(state_dir) as ledger:
            mechanism = eval_mechanism(config, state_dir)
            decision = check_budget(ledger, [mechanism], delta, accountant, limit)
            if not decision.allowed:
                return budget_declined(msg, config, server_round, decision, ledger, state_dir)
            ledger.record(run, accountant, delta, Mechanism(server_round, *mechanism, unit=config.privacy.unit, kind="evaluation"), limit)
            spent = (ledger.run_epsilon(run), decision.epsilon_after, ledger.guard_delta(delta))
        read_for_evaluation(state_dir, run, server_round)
        sums = evaluate_locally(cached.model, site_data(context, config, cached).validation, config, pad_id, loss_clip=clip)
        sigma = mechanism[0]
        values = {
            "num-examples": noisy_sum(sums.units, 1.0, sigma),
            "eval-correct": noisy_sum(sums.correct, 1.0, sigma) if classification else None,
            "eval-loss-sum": noisy_sum(sums.loss, clip, sigma),
            "epsilon": decision.epsilon_after,
            "noise-multiplier": sigma,  # depends on the run's config alone
        }
        log.info("round %d: evaluated %d units, released with noise multiplier %.2f; epsilon %.3f",
                 server_round, int(sums.units), sigma, decision.epsilon_after)
    append_audit(state_dir, "evaluated", run, round=server_round)
    check_finite_values(values)  # the last line (privacy/finite.py): after the ledger entry
    content = RecordDict({"metrics": metric_record(values, EVALUATE_METRICS)})
    with_statement(content, context, config, server_round, "evaluate", state_dir, spent, received)
    return Message(content=content, reply_to=msg)


def read_for_evaluation(state_dir: Path, run: str, server_round: int) -> None:
    """Audited before the site reads data for an evaluation: `max-evaluations` counts these,
    so an evaluation that fails after reading counts like one that completed."""
    append_audit(state_dir, EVALUATION_READ, run, round=server_round)

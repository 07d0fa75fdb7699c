"""The ClientApp: what a site does with each message from the coordinator.

Everything the coordinator sends is a request. Before any data is read, every
handler checks the request against the site's own policy (client/site_policy.py:
node config for a deployed site, `[simulation.site_policy]` for virtual sites) and
declines what falls outside it, naming the policy key. Settings the site owns come
from `context.node_config`: its data, its copy of the base model, its state dir
(ledger, audit log), its privacy limit, its LoRA rank.

Under DP every number that leaves is data-independent or accounted in the site's
ledger: training replies carry the adapter, the epsilon figures, the steps and a
fixed weight; evaluation replies carry Gaussian-noised sums, charged to the ledger.
Any exception leaves only as a fixed category (client/reply_guard.py).
Handlers: `query` (the site's LoRA rank), `train`, `evaluate`, and the four
`query.secagg_*` steps of secure aggregation around a masked `train`
(client/secure_masking.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedlora.client.local_evaluation import evaluate_locally
from fedlora.client.local_training import frozen, train_locally
from fedlora.client import secure_masking
from fedlora.client.model_cache import cached_model
from fedlora.client.peer_keys import PeerKeyError, SigningKeys, site_signing_keys
from fedlora.client.reply_guard import guarded_replies
from fedlora.client.site_data import load_site_data
from fedlora.client.site_policy import SitePolicy, site_policy, violation
from fedlora.client.site_privacy import calibrated_plan, eval_mechanism, plan_within_limit, remaining_plan, site_state_dir
from fedlora.adapter_state import adapter_of, from_record, put_adapter, to_record
from fedlora.base_fingerprint import model_fingerprint
from fedlora.base_model import resolve_model_dir
from fedlora.config import Config
from fedlora.messages import (
    DECLINED_METRICS, EVALUATE_METRICS, POLICY_METRIC_PREFIX, QUERY_METRICS, REFUSED_METRICS, TRAIN_METRICS,
    metric_record, read_config_record, sent_fingerprint,
)
from fedlora.privacy.budget_guard import BudgetDecision, check_budget
from fedlora.privacy import secure_aggregation_records as records
from fedlora.privacy.noisy_release import noisy_sum
from fedlora.privacy.site_audit import append_audit, read_audit
from fedlora.privacy.site_ledger import Declined, Mechanism, open_ledger
from fedlora.strategies import get_strategy, trained_part

log = logging.getLogger("fedlora.client")


def site_rank(config: Config, node_config: dict) -> int:
    """This site's LoRA rank: node config `lora-rank`, else its entry in
    `simulation.client_ranks` (virtual sites), else the run's `lora.rank`."""
    if "lora-rank" in node_config:
        return int(node_config["lora-rank"])
    ranks = config.simulation.client_ranks
    if ranks and "partition-id" in node_config:
        return ranks[int(node_config["partition-id"]) % len(ranks)]
    return config.lora.rank


def site_config(msg: Message, context: Context) -> tuple[Config, int]:
    """The run config with the site's own choices: its copy of the base model and its
    LoRA rank (alpha scaled with it, so alpha/rank and thus B·A's scale match the run's)."""
    config, server_round = read_config_record(msg.content["config"])
    if "model-path" in context.node_config:
        config.model.path = str(context.node_config["model-path"])
    if "device" in context.node_config:  # the site knows its hardware
        config.train.device = str(context.node_config["device"])
    rank = site_rank(config, context.node_config)
    config.lora.alpha, config.lora.rank = config.lora.alpha * rank / config.lora.rank, rank
    return config, server_round


def size_bucket(units: int) -> int:
    """The largest power of two <= units (0 for none): the weight a DP site reports.
    Coarse on purpose; the exact count is no secret to the accountant's sample rate
    either (docs/privacy.md), but nothing finer than weighting needs leaves."""
    return 1 << (units.bit_length() - 1) if units > 0 else 0


def requested(config: Config) -> dict:
    """What a run asks of the site, as the audit log records it (settings only, never data)."""
    p, d = config.privacy, config.data
    return {
        "dp": p.enabled, "target_epsilon": p.target_epsilon, "eval_epsilon": p.eval_epsilon, "delta": p.delta,
        "accountant": p.accountant, "unit": p.unit, "user_column": p.user_column, "rounds": config.federation.rounds,
        "columns": [d.text_column, d.label_column, d.prompt_column, d.response_column], "model": config.model.path,
    }


def screen_request(msg: Message, context: Context, config: Config, server_round: int) -> tuple[Message | None, SitePolicy, Path]:
    """(a refusal or decline, or None; the site's policy; its state dir). Runs before any
    of the site's data is read: the request is audited, then checked against the policy,
    then the base model's fingerprint against the coordinator's."""
    policy = site_policy(config, context.node_config)
    state_dir = site_state_dir(config, context.node_config)
    kind = msg.metadata.message_type.split(".")[0]
    run = config.run.output_dir
    append_audit(state_dir, "request", run, message=kind, round=server_round, asks=requested(config))
    key = violation(policy, config)
    if key is None and kind == MessageType.EVALUATE and policy.max_evaluations:
        done = sum(1 for e in read_audit(state_dir) if e["event"] == "evaluated" and e["run"] == run)
        key = "max-evaluations" if done >= policy.max_evaluations else None
    if key is not None:
        return policy_declined(msg, config, server_round, key, policy, state_dir), policy, state_dir
    expected = sent_fingerprint(msg.content["config"])
    if expected:
        local = model_fingerprint(resolve_model_dir(config.model.path), state_dir)  # weight hashes kept between processes
        if local != expected:
            log.error("refusing: this site's base model %s (fingerprint %s) is not the coordinator's (%s)",
                      config.model.path, local, expected)
            metrics = metric_record({"refused-base-model": 1}, REFUSED_METRICS)
            return Message(content=RecordDict({"metrics": metrics}), reply_to=msg), policy, state_dir
    return None, policy, state_dir


def policy_declined(msg: Message, config: Config, server_round: int, key: str, policy: SitePolicy, state_dir: Path) -> Message:
    """A decline naming the policy key the request falls outside of (recorded in the ledger and the audit log)."""
    kind, run = msg.metadata.message_type.split(".")[0], config.run.output_dir
    log.warning("round %d %s: declined: the run asks for more than this site's policy allows (%s)", server_round, kind, key)
    append_audit(state_dir, "declined", run, message=kind, round=server_round, reason=f"site policy: {key}")
    with open_ledger(state_dir) as ledger:
        decline = Declined(server_round, None, None, policy.max_epsilon, reason=f"site policy: {key}", message=kind)
        ledger.record(run, config.privacy.accountant, config.privacy.delta, decline, policy.max_epsilon)
    metrics = metric_record({"declined": 1, POLICY_METRIC_PREFIX + key: 1}, DECLINED_METRICS)
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


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


def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    config, server_round = site_config(msg, context)
    refusal, policy, state_dir = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal

    # Model: the cached base model with the global adapter put in.
    cached = cached_model(config, config.data.labels)
    sent = from_record(msg.content["arrays"])
    put_adapter(cached.model, sent)

    # Data: this site's train split.
    site = load_site_data(config, config.data.labels, context.node_config, cached.tokenizer)

    # Train (with the factors the strategy keeps frozen, e.g. LoRA A under ffa).
    frozen_factors = get_strategy(config.strategy).frozen_factors
    seed = config.run.seed * 1_000_003 + server_round * 7919 + context.node_id % 1_000_003
    if not config.privacy.enabled:  # the policy allowed it: allow-no-dp and no limit
        with frozen(cached.model, frozen_factors):
            result = train_locally(cached.model, site.train, config, None, cached.tokenizer.pad_token_id, seed)
        log.info("round %d: %s, %d examples, loss %.4f (no DP)", server_round, site.source, len(site.train), result.loss)
        values = {"num-examples": len(site.train), "train-loss": result.loss, "epsilon": 0.0, "noise-multiplier": 0.0,
                  "steps": result.steps, "seconds": time.perf_counter() - start}
    else:
        # Privacy: noise calibrated from this site's data; its own ledger and limit decide.
        run, delta, accountant, limit = config.run.output_dir, config.privacy.delta, config.privacy.accountant, policy.max_epsilon
        with open_ledger(state_dir) as ledger:
            plan = calibrated_plan(config, site.train, state_dir)
            plan = plan_within_limit(config, plan, ledger, policy, delta, server_round, state_dir)
            mechanism = (plan.noise_multiplier, plan.sample_rate, plan.steps)
            decision = check_budget(ledger, [mechanism], delta, accountant, limit)
            if not decision.allowed:
                return budget_declined(msg, config, server_round, decision, ledger, state_dir)
            with frozen(cached.model, frozen_factors):
                result = train_locally(cached.model, site.train, config, plan, cached.tokenizer.pad_token_id, seed)
            # Recorded before the reply exists: nothing leaves the site unaccounted.
            ledger.record(run, accountant, delta, Mechanism(server_round, *mechanism, unit=plan.unit), limit)
            epsilon = decision.epsilon_after  # the ledger now holds exactly what the guard counted
            later_rounds, evaluations = remaining_plan(config, plan, server_round, state_dir)
            planned = ledger.epsilon(delta, accountant, extra=later_rounds + evaluations)
        log.info("round %d: %s, %d examples, loss %.4f; noise multiplier %.4f (q %.4f per %s, %d steps), epsilon %.3f, "
                 "expected %.3f after round %d, limit %s", server_round, site.source, len(site.train), result.loss,
                 plan.noise_multiplier, plan.sample_rate, plan.unit, plan.steps, epsilon, planned, config.federation.rounds,
                 "none" if math.isinf(limit) else f"{limit:.3f}")
        # The loss and the time are data-dependent and unaccounted: they stay here. The
        # aggregation weight is the site's unit count rounded down to a power of two.
        values = {"num-examples": size_bucket(plan.units), "epsilon": epsilon, "planned-epsilon": planned,
                  "noise-multiplier": plan.noise_multiplier, "steps": plan.steps}

    # Reply: the trained adapter tensors (or, under secure aggregation, their masked change)
    # and whitelisted scalars only.
    trained = trained_part(adapter_of(cached.model), frozen_factors)
    metrics = metric_record(values, TRAIN_METRICS)
    if records.RECORD in msg.content.config_records:
        weight = max(1, min(int(values["num-examples"]), records.MAX_WEIGHT))
        content = secure_masking.masked_update(msg, context, trained, sent, weight)
        content["metrics"] = metrics
    else:
        content = RecordDict({"arrays": to_record(trained), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    config, server_round = site_config(msg, context)
    refusal, policy, state_dir = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal
    cached = cached_model(config, config.data.labels)
    put_adapter(cached.model, from_record(msg.content["arrays"]))
    site = load_site_data(config, config.data.labels, context.node_config, cached.tokenizer)
    pad_id, run, classification = cached.tokenizer.pad_token_id, config.run.output_dir, config.model.task == "classification"

    if not config.privacy.enabled:  # the policy allowed it: exact sums
        sums = evaluate_locally(cached.model, site.validation, config, pad_id)
        values = {"num-examples": sums.units, "eval-correct": sums.correct, "eval-loss-sum": sums.loss, "epsilon": 0.0}
    else:
        # Gaussian noise on each released sum, charged to the ledger before anything leaves.
        delta, accountant, limit, clip = config.privacy.delta, config.privacy.accountant, policy.max_epsilon, config.privacy.eval_loss_clip
        with open_ledger(state_dir) as ledger:
            mechanism = eval_mechanism(config, state_dir)
            decision = check_budget(ledger, [mechanism], delta, accountant, limit)
            if not decision.allowed:
                return budget_declined(msg, config, server_round, decision, ledger, state_dir)
            sums = evaluate_locally(cached.model, site.validation, config, pad_id, loss_clip=clip)
            ledger.record(run, accountant, delta, Mechanism(server_round, *mechanism, unit=config.privacy.unit, kind="evaluation"), limit)
        sigma = mechanism[0]
        values = {
            "num-examples": noisy_sum(sums.units, 1.0, sigma),
            "eval-correct": noisy_sum(sums.correct, 1.0, sigma) if classification else None,
            "eval-loss-sum": noisy_sum(sums.loss, clip, sigma),
            "epsilon": decision.epsilon_after,
        }
        log.info("round %d: evaluated %d units, released with noise multiplier %.2f; epsilon %.3f",
                 server_round, int(sums.units), sigma, decision.epsilon_after)
    append_audit(state_dir, "evaluated", run, round=server_round)
    return Message(content=RecordDict({"metrics": metric_record(values, EVALUATE_METRICS)}), reply_to=msg)


def query(msg: Message, context: Context) -> Message:
    """The site's declaration before training: its LoRA rank."""
    config, server_round = site_config(msg, context)
    refusal, _, _ = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal
    metrics = metric_record({"lora-rank": config.lora.rank}, QUERY_METRICS)
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1 (client/secure_masking.py): screened like every request;
    a site without trusted peer keys declines, naming its `peer-keys` setting."""
    config, server_round = site_config(msg, context)
    refusal, policy, state_dir = screen_request(msg, context, config, server_round)
    if refusal is not None:
        return refusal
    signing = site_signing_keys(config, context.node_config)
    if signing is None:
        return policy_declined(msg, config, server_round, "peer-keys", policy, state_dir)
    return secure_masking.advertise_keys(msg, context, signing, config.run.output_dir, server_round, state_dir)


def secagg_shares(msg: Message, context: Context) -> Message:
    config, _ = site_config(msg, context)
    return secure_masking.share_keys(msg, context, signing_keys(config, context))


def secagg_survivors(msg: Message, context: Context) -> Message:
    config, _ = site_config(msg, context)
    return secure_masking.sign_survivors(msg, context, signing_keys(config, context))


def secagg_reveal(msg: Message, context: Context) -> Message:
    return secure_masking.reveal_shares(msg, context)


def signing_keys(config: Config, context: Context) -> SigningKeys:
    signing = site_signing_keys(config, context.node_config)
    if signing is None:
        raise PeerKeyError("this site has no peer keys: it takes no part in secure aggregation")
    return signing


def site_app(*mods: Mod) -> ClientApp:
    """A ClientApp with the handlers above behind the reply guard, plus `mods` inside
    it (the simulation adds its virtual sites' data source, client/site_data.py)."""
    composed = ClientApp(mods=[guarded_replies, *mods])
    composed.train()(train)
    composed.evaluate()(evaluate)
    composed.query()(query)
    for handler in (secagg_keys, secagg_shares, secagg_survivors, secagg_reveal):
        composed.query(handler.__name__)(handler)
    return composed


app = site_app()  # a deployed site's ClientApp: its data is its own `data-path`

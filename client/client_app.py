"""The ClientApp: what a site does with each message from the coordinator.

Settings come from the message (the coordinator's resolved run config) and from
`context.node_config` (the site's own: `data-path`, `model-path`, `state-dir`,
`max-epsilon`, `lora-rank`), which wins where the site decides: its data, its copy
of the base model, its privacy ledger and limit, its rank. Under DP a round the
site's budget cannot afford is declined, recorded in its ledger, and not trained.
Handlers: `query` (the site's LoRA rank), `train`, `evaluate`.
"""

from __future__ import annotations

import logging
import math
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.local_training import evaluate_locally, frozen, train_locally
from client.model_cache import cached_model
from client.site_data import load_site_data
from client.site_privacy import calibrated_plan, site_limit, site_state_dir
from fedlora.adapter_state import adapter_of, from_record, put_adapter, to_record
from fedlora.config import Config
from fedlora.base_fingerprint import model_fingerprint
from fedlora.base_model import resolve_model_dir
from fedlora.messages import (
    DECLINED_METRICS, EVALUATE_METRICS, QUERY_METRICS, REFUSED_METRICS, TRAIN_METRICS, metric_record,
    read_config_record, sent_fingerprint,
)
from privacy.budget_guard import BudgetDecision, check_budget
from privacy.site_ledger import Declined, Mechanism, open_ledger
from strategies import get_strategy, trained_part

app = ClientApp()
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


def base_model_refusal(msg: Message, context: Context, config: Config) -> Message | None:
    """A refusal if this site's base model is not the coordinator's (None if it is)."""
    expected = sent_fingerprint(msg.content["config"])
    if not expected:
        return None
    try:
        cache = site_state_dir(config, context.node_config)  # weight hashes are kept between processes
    except ValueError:
        cache = None
    local = model_fingerprint(resolve_model_dir(config.model.path), cache)
    if local == expected:
        return None
    log.error("refusing: this site's base model %s (fingerprint %s) is not the coordinator's (%s)",
              config.model.path, local, expected)
    return Message(content=RecordDict({"metrics": metric_record({"refused-base-model": 1}, REFUSED_METRICS)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    config, server_round = site_config(msg, context)
    if (refusal := base_model_refusal(msg, context, config)) is not None:
        return refusal

    # Model: the cached base model with the global adapter put in.
    cached = cached_model(config, config.data.labels)
    put_adapter(cached.model, from_record(msg.content["arrays"]))

    # Data: this site's train split.
    site = load_site_data(config, config.data.labels, context.node_config, cached.tokenizer)

    # Train (with the factors the strategy keeps frozen, e.g. LoRA A under ffa).
    frozen_factors = get_strategy(config.strategy).frozen_factors
    seed = config.run.seed * 1_000_003 + server_round * 7919 + context.node_id % 1_000_003
    limit = site_limit(config, context.node_config)
    if not config.privacy.enabled:
        if not math.isinf(limit):
            # Training without DP spends an unbounded epsilon: a site with a limit declines it.
            log.warning("round %d: declined: the run has privacy.enabled = false and this site's limit is %.3f", server_round, limit)
            return declined_reply(msg, BudgetDecision(False, math.inf, limit, epsilon_spent=0.0))
        with frozen(cached.model, frozen_factors):
            result = train_locally(cached.model, site.train, config, None, cached.tokenizer.pad_token_id, seed)
        privacy = {"epsilon": 0.0, "noise-multiplier": 0.0}
    else:
        # Privacy: noise calibrated from this site's data; its own ledger and limit decide.
        state_dir = site_state_dir(config, context.node_config)
        plan = calibrated_plan(config, site.train, state_dir)
        mechanism = (plan.noise_multiplier, plan.sample_rate, plan.steps)
        run, delta, accountant = config.run.output_dir, config.privacy.delta, config.privacy.accountant
        with open_ledger(state_dir) as ledger:
            decision = check_budget(ledger, [mechanism], delta, accountant, limit)
            if not decision.allowed:
                ledger.record(run, accountant, delta, Declined(server_round, decision.epsilon_spent, decision.epsilon_after, limit), limit)
                log.warning("round %d: declined, epsilon would reach %.3f > the site's limit %.3f (spent %.3f)",
                            server_round, decision.epsilon_after, limit, decision.epsilon_spent)
                return declined_reply(msg, decision)
            with frozen(cached.model, frozen_factors):
                result = train_locally(cached.model, site.train, config, plan, cached.tokenizer.pad_token_id, seed)
            # Recorded before the reply exists: nothing leaves the site unaccounted.
            ledger.record(run, accountant, delta, Mechanism(server_round, *mechanism, unit=plan.unit), limit)
            epsilon = decision.epsilon_after  # the ledger now holds exactly what the guard counted
            remaining = [mechanism] * max(0, config.federation.rounds - server_round)
            planned = ledger.epsilon(delta, accountant, extra=remaining)
        privacy = {"epsilon": epsilon, "planned-epsilon": planned, "noise-multiplier": plan.noise_multiplier}
        log.info("round %d: noise multiplier %.4f (q %.4f per %s, %d steps), epsilon %.3f, expected %.3f after round %d, limit %s",
                 server_round, plan.noise_multiplier, plan.sample_rate, plan.unit, plan.steps, epsilon, planned,
                 config.federation.rounds, "none" if math.isinf(limit) else f"{limit:.3f}")
    log.info("round %d: %s, %d examples, loss %.4f", server_round, site.source, len(site.train), result.loss)

    # Reply: the trained adapter tensors and whitelisted scalars only.
    metrics = metric_record(
        {"num-examples": len(site.train), "train-loss": result.loss, **privacy, "steps": result.steps,
         "seconds": time.perf_counter() - start},
        TRAIN_METRICS,
    )
    trained = trained_part(adapter_of(cached.model), frozen_factors)
    content = RecordDict({"arrays": to_record(trained), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def declined_reply(msg: Message, decision: BudgetDecision) -> Message:
    """A refusal, not an error: no tensors, and why (the coordinator counts it as declined)."""
    metrics = metric_record(
        {"declined": 1, "epsilon": decision.epsilon_spent, "epsilon-would-be": decision.epsilon_after,
         "epsilon-limit": decision.limit},
        DECLINED_METRICS,
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, _ = site_config(msg, context)
    if (refusal := base_model_refusal(msg, context, config)) is not None:
        return refusal
    cached = cached_model(config, config.data.labels)
    put_adapter(cached.model, from_record(msg.content["arrays"]))
    site = load_site_data(config, config.data.labels, context.node_config, cached.tokenizer)

    result = evaluate_locally(cached.model, site.validation, config, cached.tokenizer.pad_token_id)

    metrics = metric_record(
        {
            "num-examples": result.num_examples,
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
            "eval-perplexity": result.perplexity,
        },
        EVALUATE_METRICS,
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The site's declaration before training: its LoRA rank."""
    config, _ = site_config(msg, context)
    if (refusal := base_model_refusal(msg, context, config)) is not None:
        return refusal
    metrics = metric_record({"lora-rank": config.lora.rank}, QUERY_METRICS)
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

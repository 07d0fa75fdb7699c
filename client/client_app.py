"""The ClientApp: what a site does with each message from the coordinator.

Settings come from the message (the coordinator's resolved run config) and from
`context.node_config` (the site's own: `data-path`, `model-path`, `lora-rank`),
which wins where the site decides (its data, its copy of the base model, its rank).
Handlers: `query` (the site's LoRA rank), `train`, `evaluate`.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.local_training import DPPlan, evaluate_locally, frozen, train_locally
from client.model_cache import cached_model
from client.site_data import load_site_data
from fedlora.adapter_state import adapter_of, from_record, put_adapter, to_record
from fedlora.config import Config
from fedlora.messages import EVALUATE_METRICS, QUERY_METRICS, TRAIN_METRICS, metric_record, read_config_record
from privacy.accounting import calibrate_noise, epsilon_of, sample_rate
from strategies import get_strategy, trained_part

app = ClientApp()
log = logging.getLogger("fedlora.client")

HISTORY_KEY = "privacy-history"  # this site's DP mechanisms so far, in context.state


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
    rank = site_rank(config, context.node_config)
    config.lora.alpha, config.lora.rank = config.lora.alpha * rank / config.lora.rank, rank
    return config, server_round


def privacy_history(context: Context) -> list[tuple[float, float, int]]:
    if HISTORY_KEY not in context.state.config_records:
        return []
    rec = context.state.config_records[HISTORY_KEY]
    return list(zip(rec["noise"], rec["rate"], rec["steps"]))


def save_privacy_history(context: Context, history: list[tuple[float, float, int]]) -> None:
    context.state.config_records[HISTORY_KEY] = ConfigRecord(
        {"noise": [h[0] for h in history], "rate": [h[1] for h in history], "steps": [h[2] for h in history]}
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    config, server_round = site_config(msg, context)

    # Model: the cached base model with the global adapter put in.
    cached = cached_model(config, config.data.labels)
    put_adapter(cached.model, from_record(msg.content["arrays"]))

    # Data: this site's train split.
    site = load_site_data(config, config.data.labels, context.node_config, cached.tokenizer)

    # Privacy: noise calibrated so training in every planned round ends at the target.
    plan, history = None, privacy_history(context)
    if config.privacy.enabled:
        rate = sample_rate(config.train.batch_size, len(site.train))
        sigma = calibrate_noise(
            config.privacy.target_epsilon, config.privacy.delta, rate,
            config.federation.rounds * config.train.local_steps, config.privacy.accountant,
        )
        plan = DPPlan(noise_multiplier=sigma, sample_rate=rate, steps=config.train.local_steps)

    # Train (with the factors the strategy keeps frozen, e.g. LoRA A under ffa).
    frozen_factors = get_strategy(config.strategy).frozen_factors
    seed = config.run.seed * 1_000_003 + server_round * 7919 + context.node_id % 1_000_003
    with frozen(cached.model, frozen_factors):
        result = train_locally(cached.model, site.train, config, plan, cached.tokenizer.pad_token_id, seed)

    epsilon = 0.0
    if plan is not None:
        history.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
        save_privacy_history(context, history)
        epsilon = epsilon_of(history, config.privacy.delta, config.privacy.accountant)
    log.info("round %d: %s, %d examples, loss %.4f, epsilon %.3f", server_round, site.source, len(site.train), result.loss, epsilon)

    # Reply: the trained adapter tensors and whitelisted scalars only.
    metrics = metric_record(
        {
            "num-examples": len(site.train),
            "train-loss": result.loss,
            "epsilon": epsilon,
            "noise-multiplier": plan.noise_multiplier if plan else 0.0,
            "steps": result.steps,
            "seconds": time.perf_counter() - start,
        },
        TRAIN_METRICS,
    )
    trained = trained_part(adapter_of(cached.model), frozen_factors)
    content = RecordDict({"arrays": to_record(trained), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, _ = site_config(msg, context)
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
    metrics = metric_record({"lora-rank": config.lora.rank}, QUERY_METRICS)
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

"""What travels between coordinator and sites, in one place.

Down: ArrayRecord "arrays" (the global adapter) + ConfigRecord "config" (the
resolved run config as dotted keys, plus the round number).
Up: ArrayRecord "arrays" (adapter tensors only) + MetricRecord "metrics" holding
only the whitelisted scalars below. Nothing else leaves a site.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, MetricRecord

from fedlora.config import Config, from_flat

ROUND_KEY = "fedlora.round"

TRAIN_METRICS = ("num-examples", "train-loss", "epsilon", "planned-epsilon", "noise-multiplier", "steps", "seconds")
# A site whose budget guard refused the round replies with these (and no arrays).
DECLINED_METRICS = ("declined", "epsilon", "epsilon-would-be", "epsilon-limit")
EVALUATE_METRICS = ("num-examples", "eval-loss", "eval-accuracy", "eval-perplexity")
QUERY_METRICS = ("lora-rank",)  # what a site declares before training (its own LoRA rank)


def config_record(config: Config, server_round: int) -> ConfigRecord:
    return ConfigRecord({**config.to_flat(), ROUND_KEY: server_round})


def read_config_record(record: ConfigRecord) -> tuple[Config, int]:
    flat = dict(record)
    server_round = int(flat.pop(ROUND_KEY))
    return from_flat(flat, where="coordinator config"), server_round


def metric_record(values: dict[str, float | int], allowed: tuple[str, ...]) -> MetricRecord:
    """A reply's metrics; refuses any key outside the whitelist (no data leaks by accident)."""
    extra = set(values) - set(allowed)
    if extra:
        raise ValueError(f"metrics outside the whitelist would leave the site: {sorted(extra)}")
    return MetricRecord({k: v for k, v in values.items() if v is not None})

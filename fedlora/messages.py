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
FINGERPRINT_KEY = "fedlora.base-fingerprint"  # the coordinator's base model (fedlora/base_fingerprint.py)

TRAIN_METRICS = ("num-examples", "train-loss", "epsilon", "planned-epsilon", "noise-multiplier", "steps", "seconds")
# A site whose budget guard refused the round replies with these (and no arrays).
DECLINED_METRICS = ("declined", "epsilon", "epsilon-would-be", "epsilon-limit")
EVALUATE_METRICS = ("num-examples", "eval-loss", "eval-accuracy", "eval-perplexity")
QUERY_METRICS = ("lora-rank",)  # what a site declares before training (its own LoRA rank)
# A site holding a different base model than the coordinator's refuses every message.
REFUSED_METRICS = ("refused-base-model",)


def config_record(config: Config, server_round: int, base_fingerprint: str = "") -> ConfigRecord:
    extra = {FINGERPRINT_KEY: base_fingerprint} if base_fingerprint else {}
    return ConfigRecord({**config.to_flat(), ROUND_KEY: server_round, **extra})


def read_config_record(record: ConfigRecord) -> tuple[Config, int]:
    flat = dict(record)
    server_round = int(flat.pop(ROUND_KEY))
    flat.pop(FINGERPRINT_KEY, None)
    return from_flat(flat, where="coordinator config"), server_round


def sent_fingerprint(record: ConfigRecord) -> str:
    """The coordinator's base-model fingerprint ("" if it sent none)."""
    return str(record[FINGERPRINT_KEY]) if FINGERPRINT_KEY in record else ""


def metric_record(values: dict[str, float | int], allowed: tuple[str, ...]) -> MetricRecord:
    """A reply's metrics; refuses any key outside the whitelist (no data leaks by accident)."""
    extra = set(values) - set(allowed)
    if extra:
        raise ValueError(f"metrics outside the whitelist would leave the site: {sorted(extra)}")
    return MetricRecord({k: v for k, v in values.items() if v is not None})

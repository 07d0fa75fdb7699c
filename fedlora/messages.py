"""What travels between coordinator and sites, in one place.

Down: ArrayRecord "arrays" (the global adapter) + ConfigRecord "config" (the
resolved run config as dotted keys, plus the round number).
Up: ArrayRecord "arrays" (adapter tensors only) + MetricRecord "metrics" holding
only the whitelisted scalars below. Under secure aggregation a train reply carries
the ArrayRecord "masked" instead of "arrays", and the `query.secagg_*` steps a
ConfigRecord "secagg" with the keys of privacy/secure_aggregation_records.py. A train
or evaluate reply of a site with a node key also carries the ConfigRecord "statement":
its signed privacy statement, fixed fields only (privacy/privacy_statement.py).
Nothing else leaves a site.
"""

from __future__ import annotations

import hashlib
import json

from flwr.app import ConfigRecord, MetricRecord

from fedlora.config import Config, from_flat
from fedlora.site_policy_keys import SITE_POLICY

ROUND_KEY = "fedlora.round"
FINGERPRINT_KEY = "fedlora.base-fingerprint"  # the coordinator's base model (fedlora/base_fingerprint.py)

# Under DP a site sends no train-loss and no seconds (data-dependent, unaccounted), and
# its num-examples is its unit count rounded down to a power of two (public to the
# accounting, which uses the count itself; client/training_handlers.py: size_bucket). "planned-noise-multiplier" is
# the noise the run's plan gives this site (before its own limit raised it): like the noise
# multiplier, a function of the public plan and the site's unit count (public to the accounting).
# "run-epsilon": what this run alone has spent at the site ("epsilon" is the site's ledger total).
TRAIN_METRICS = ("num-examples", "train-loss", "epsilon", "run-epsilon", "planned-epsilon", "noise-multiplier",
                 "planned-noise-multiplier", "steps", "seconds")
# The site's policy, as node-config keys; a decline names one of them.
POLICY_KEYS = (
    *(p.key for p in SITE_POLICY),  # fedlora/site_policy_keys.py
    "peer-keys",  # the site holds no trusted peer keys: it takes no part in secure aggregation
    # Not node-config keys: what the request itself must keep to. "round": the round lies
    # outside the run's own plan (1..federation.rounds; evaluation and queries also 0).
    "round",
)
POLICY_METRIC_PREFIX = "policy."  # a policy decline carries the metric "policy.<key>" = 1
# A site that declines a message replies with these (and no arrays): its budget guard
# refused (epsilon figures), or the run asked for more than its policy allows (the key).
DECLINED_METRICS = ("declined", "epsilon", "epsilon-would-be", "epsilon-limit",
                    *(POLICY_METRIC_PREFIX + k for k in POLICY_KEYS))
# Evaluation releases sums (noised and accounted under DP); the coordinator divides them.
# "noise-multiplier": the sums' noise (from the run's config alone), so the report can show
# how far a noisy validation figure may stray.
EVALUATE_METRICS = ("num-examples", "eval-correct", "eval-loss-sum", "epsilon", "noise-multiplier")
QUERY_METRICS = ("lora-rank",)  # what a site declares before training (its own LoRA rank)
# A site holding a different base model than the coordinator's refuses every message.
REFUSED_METRICS = ("refused-base-model",)
# The only error reasons a site sends: a fixed category, never an exception's text
# (which could hold a value from the site's data). Details stay in the site's log.
SITE_ERROR_CATEGORIES = ("data error", "model error", "policy", "secure aggregation", "internal error")


def declined_key(metrics: dict) -> str:
    """Why a site declined: "site policy: <key>" or "privacy budget"."""
    for key in POLICY_KEYS:
        if POLICY_METRIC_PREFIX + key in metrics:
            return f"site policy: {key}"
    return "privacy budget"


def config_record(config: Config, server_round: int, base_fingerprint: str = "") -> ConfigRecord:
    extra = {FINGERPRINT_KEY: base_fingerprint} if base_fingerprint else {}
    return ConfigRecord({**config.to_flat(), ROUND_KEY: server_round, **extra})


def read_config_record(record: ConfigRecord) -> tuple[Config, int]:
    flat = dict(record)
    server_round = int(flat.pop(ROUND_KEY))
    flat.pop(FINGERPRINT_KEY, None)
    return from_flat(flat, where="coordinator config"), server_round


def run_config_digest(record: ConfigRecord) -> str:
    """SHA-256 of the run config a message carries, without the round: the resolved config
    (parsed, so both ends hash the same values whatever the transport did to their types)
    and the base model's fingerprint. Secure aggregation binds it into the aggregation
    context (privacy/secure_aggregation_records.py: bound_terms)."""
    config, _ = read_config_record(record)
    canonical = {**config.to_flat(), FINGERPRINT_KEY: sent_fingerprint(record)}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=repr).encode()).hexdigest()


def sent_fingerprint(record: ConfigRecord) -> str:
    """The coordinator's base-model fingerprint ("" if it sent none)."""
    return str(record[FINGERPRINT_KEY]) if FINGERPRINT_KEY in record else ""


def metric_record(values: dict[str, float | int], allowed: tuple[str, ...]) -> MetricRecord:
    """A reply's metrics; refuses any key outside the whitelist (no data leaks by accident)."""
    extra = set(values) - set(allowed)
    if extra:
        raise ValueError(f"metrics outside the whitelist would leave the site: {sorted(extra)}")
    return MetricRecord({k: v for k, v in values.items() if v is not None})

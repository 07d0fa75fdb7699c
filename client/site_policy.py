"""The site's own policy: what a run may ask of this site, decided before any data is read.

Everything the coordinator sends is a request. A deployed site's policy comes only
from its own node config (`fedlora client` flags, or `flower-supernode --node-config`);
the run config never widens it. Virtual sites of a simulation apply the run's
`[simulation.site_policy]` table (one operator owns both sides there), so that
`fedlora simulate` goes through the same checks.

A run outside the policy is declined with the node-config key that refused it,
never with a value from the site's data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import Config
from fedlora.site_policy_keys import DEFAULT_MAX_DELTA, SITE_POLICY


class PolicyError(ValueError):
    """A node-config policy value that cannot work (one line naming the key)."""


@dataclass(frozen=True)
class SitePolicy:
    """The policy as plain data: one field per key of fedlora/site_policy_keys.py, with its
    default (tests/test_site_policy_table.py holds the two together)."""

    max_epsilon: float = math.inf  # cumulative over every run; inf = the site set no limit
    max_delta: float = DEFAULT_MAX_DELTA
    privacy_unit: str = "example"
    user_column: str = "user_id"
    allow_no_dp: bool = False
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    max_evaluations: int = 0  # per run; 0 = no cap
    calibrate_to_limit: bool = True
    # Calibrating to the limit may raise the noise past any use: a site declines a round whose
    # noise multiplier would exceed this many times the run's plan (0 = no cap).
    max_noise_increase: float = 4.0
    # Take part only in runs whose coordinator sees no single site's update (docs/privacy.md).
    require_secure_aggregation: bool = False
    # Distributed DP (privacy.mode = "distributed") rests on secure aggregation and on at most
    # `tolerance` sites dropping out or colluding; a site takes part only if it allows it,
    # and only with at least its own tolerance (docs/privacy.md).
    allow_distributed_dp: bool = False
    min_distributed_tolerance: int = 1
    # The smallest aggregation this site joins under secure aggregation: roster, sharers and
    # survivors (docs/privacy.md, "How many may collude"). The coordinator picks the threshold.
    min_sites: int = 3
    # The smallest cohort this site releases anything about: with fewer privacy units in its
    # data it declines every run (client/site_cohort.py; docs/privacy.md, "A minimum cohort").
    min_records: int = 0
    # The classification labels of this site's data, in class-id order (node config `labels`,
    # comma-separated; `fedlora client` checks its data against them at start). A run whose
    # data.labels differs is declined before any data is read, so whether the site holds a
    # label never shows as a data error. Empty: not declared, and the site declines every
    # classification request (otherwise a chosen data.labels would be a label oracle).
    labels: tuple[str, ...] = ()


def _flag(node_config: dict, key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise PolicyError(f"node config '{key}' must be true or false, got {value!r}")


def _number(node_config: dict, key: str, default: float, kind: type = float) -> float:
    value = node_config.get(key, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise PolicyError(f"node config '{key}' must be a number, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(number) or number == math.inf):
        raise PolicyError(f"node config '{key}' must be a number, got {value!r}")
    return number


def _text(node_config: dict, key: str, default: str) -> str:
    value = str(node_config.get(key, default))
    if not value:
        raise PolicyError(f"node config '{key}' must not be empty")
    return value


def _labels(node_config: dict, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = node_config.get(key)
    if value is None:
        return default
    names = tuple(str(v).strip() for v in (value if isinstance(value, (list, tuple)) else str(value).split(",")))
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise PolicyError(f"node config '{key}' must be distinct, non-empty label names separated by commas")
    return names


_PARSERS = {
    "float": _number,
    "int": lambda node_config, key, default: int(_number(node_config, key, default, int)),
    "bool": _flag,
    "str": _text,
    "labels": _labels,
}


def _from_node_config(node_config: dict, base: SitePolicy) -> SitePolicy:
    # One parser per kind of key (fedlora/site_policy_keys.py lists the keys and kinds).
    policy = SitePolicy(**{p.field: _PARSERS[p.kind](node_config, p.key, getattr(base, p.field)) for p in SITE_POLICY})
    if not policy.max_epsilon > 0:
        raise PolicyError(f"node config 'max-epsilon' must be > 0, got {node_config.get('max-epsilon')!r}")
    if not 0 < policy.max_delta < 1:
        raise PolicyError(f"node config 'max-delta' must be between 0 and 1, got {node_config.get('max-delta')!r}")
    if policy.privacy_unit not in ("example", "user"):
        raise PolicyError(f"node config 'privacy-unit' must be example or user, got {policy.privacy_unit!r}")
    if policy.max_evaluations < 0:
        raise PolicyError(f"node config 'max-evaluations' must be >= 0 (0 = no cap), got {policy.max_evaluations!r}")
    if not (policy.max_noise_increase == 0 or 1 <= policy.max_noise_increase < math.inf):
        raise PolicyError(f"node config 'max-noise-increase' must be >= 1 (0 = no cap), got {node_config.get('max-noise-increase')!r}")
    if policy.min_sites < 2:
        raise PolicyError(f"node config 'min-sites' must be >= 2 (secure aggregation's smallest sum), got {policy.min_sites!r}")
    if policy.min_records < 0:
        raise PolicyError(f"node config 'min-records' must be >= 0 (0 = no minimum), got {policy.min_records!r}")
    if policy.min_distributed_tolerance < 0:
        raise PolicyError(f"node config 'min-distributed-tolerance' must be >= 0, got {policy.min_distributed_tolerance!r}")
    return policy


def is_virtual(node_config: dict) -> bool:
    """A virtual site of the simulation engine (Flower gives it a partition id)."""
    return "partition-id" in node_config and "data-path" not in node_config


def simulation_policy(config: Config) -> SitePolicy:
    """The run's [simulation.site_policy], its empty entries filled from the run itself."""
    sim, run = config.simulation.site_policy, config
    limit = config.privacy.site_max_epsilon
    return SitePolicy(
        max_epsilon=limit if limit > 0 else math.inf,
        max_delta=sim.max_delta or run.privacy.delta,
        privacy_unit=sim.privacy_unit or run.privacy.unit,
        user_column=sim.user_column or run.privacy.user_column,
        allow_no_dp=sim.allow_no_dp,
        text_column=sim.text_column or run.data.text_column,
        label_column=sim.label_column or run.data.label_column,
        prompt_column=sim.prompt_column or run.data.prompt_column,
        response_column=sim.response_column or run.data.response_column,
        max_evaluations=sim.max_evaluations,
        calibrate_to_limit=sim.calibrate_to_limit,
        max_noise_increase=sim.max_noise_increase,
        # One operator runs every virtual site: the run's own distributed setting stands.
        allow_distributed_dp=True,
        min_distributed_tolerance=0,
        min_sites=2,  # one machine holds every party: the floor protects nothing there
        labels=tuple(run.data.labels),  # the driver checked the dataset against them before Ray started
    )


def site_policy(config: Config, node_config: dict) -> SitePolicy:
    """This site's policy. A deployed site: its node config over the defaults above,
    nothing from the run. A virtual site: the run's simulation policy, under any
    node-config keys the simulation gives that site."""
    base = simulation_policy(config) if is_virtual(node_config) else SitePolicy()
    return _from_node_config(node_config, base)


def violation(policy: SitePolicy, config: Config) -> str | None:
    """The policy key a run's request breaks (None if it keeps to the policy)."""
    privacy, data = config.privacy, config.data
    if not privacy.enabled:
        if not policy.allow_no_dp:
            return "allow-no-dp"
        if not math.isinf(policy.max_epsilon):
            return "max-epsilon"  # training without DP spends an unbounded epsilon
    else:
        if privacy.delta > policy.max_delta:
            return "max-delta"
        if privacy.unit != policy.privacy_unit:
            return "privacy-unit"
        if privacy.unit == "user" and privacy.user_column != policy.user_column:
            return "user-column"
    for key, asked, own in (
        ("text-column", data.text_column, policy.text_column),
        ("label-column", data.label_column, policy.label_column),
        ("prompt-column", data.prompt_column, policy.prompt_column),
        ("response-column", data.response_column, policy.response_column),
    ):
        if asked != own:
            return key
    if config.model.task == "classification" and tuple(data.labels) != policy.labels:
        return "labels"
    if policy.require_secure_aggregation and not config.federation.secure_aggregation:
        return "require-secure-aggregation"
    if privacy.enabled and privacy.mode == "distributed":
        if not policy.allow_distributed_dp:
            return "allow-distributed-dp"
        if privacy.distributed_tolerance < policy.min_distributed_tolerance:
            return "min-distributed-tolerance"
    return None


def round_outside_plan(message_type: str, server_round: int, config: Config) -> bool:
    """A request for a round the run does not plan: training rounds (and secure aggregation's
    keys for them) are 1..federation.rounds; evaluations and rank queries may also ask about
    round 0 (the untrained adapter). A later round would calibrate for no remaining steps
    (and once looped forever holding the ledger lock); it is declined before anything is read."""
    first = 1 if message_type in ("train", "query.secagg_keys") else 0
    return not first <= server_round <= config.federation.rounds


def site_state_dir(config: Config, node_config: dict) -> Path:
    """Where this site keeps its ledger, audit log and local state."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"])).expanduser()
    if "partition-id" in node_config:
        return Path(config.run.output_dir) / "sites" / str(int(node_config["partition-id"]))
    raise ValueError("node config has no 'state-dir': a site needs one for its privacy ledger")

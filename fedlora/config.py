"""The run configuration: one TOML file, validated into typed dataclasses.

The same dotted keys (``train.lr``) work in a TOML file, in ``--set KEY=VALUE``,
in Flower run config (``flwr run . --run-config``) and in the ConfigRecord the
coordinator sends to clients. Unknown keys and bad values are a one-line
``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from fedlora.atomic_file import write_atomic


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the file and key."""


@dataclass
class RunSection:
    output_dir: str = "runs/demo"
    seed: int = 0
    # A run directory to continue from its last checkpoint (`fedlora run --resume RUN_DIR`);
    # "" = a new run. Completed rounds are not repeated.
    resume: str = ""


@dataclass
class ModelSection:
    path: str = "default"  # "default" = the embedded pretrained MiniLM; else a local HF folder
    task: str = "classification"  # or "causal-lm"
    max_length: int = 64
    # The frozen base model's dtype; LoRA adapters and a trained head stay float32.
    dtype: str = "float32"  # or "bfloat16" (GPU; on CPU for checking only)
    # Classification: "mean" (linear head on the masked mean of the last hidden states),
    # "model" (the architecture's own sequence-classification head), or "auto" (mean for a
    # sentence-transformers model trained for mean pooling, like the default; else model).
    pooling: str = "auto"


@dataclass
class DataSection:
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # Label names in class-id order. Empty: derived (sorted) from the dataset in
    # simulation; a deployment must list them so every site maps labels alike.
    labels: list[str] = field(default_factory=list)
    validation_fraction: float = 0.2


@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0  # LoRA scale is alpha / rank; a site with its own rank k uses alpha * k / rank
    dropout: float = 0.0
    # "qv" (query/value projections), "auto" (attention + MLP linear layers) or "mlp_out"
    # (the feed-forward output projection), per architecture, or a list of module names.
    # Under DP fewer parameters learn faster: the noise norm grows with the square root
    # of the trainable parameter count.
    target_modules: str | list[str] = "qv"
    # LoRA only in the top k transformer layers (0 = every layer). The layers below stay
    # frozen: a site computes their outputs once per example and backpropagates through
    # the top k only (client/frozen_prefix.py). On the 6-layer default, the top 1 layer's
    # steps cost a third of the top 2's, and the steps it buys win (docs/strategies.md);
    # for a deep causal LM, measure before keeping 1 (0 puts LoRA everywhere).
    top_layers: int = 1


@dataclass
class TrainSection:
    # DP-SGD needs large batches (noise per coordinate is sigma * C / B) and many steps:
    # the default spends its compute on many rounds of one step each, so that the sites'
    # steps are averaged before label skew pulls them apart (docs/strategies.md).
    local_steps: int = 1
    batch_size: int = 64
    lr: float = 4.0  # plain SGD on the clipped, noised mean gradient (norm <= max_grad_norm)
    # The rate over the rounds (fedlora/lr_schedule.py): "constant", or "cosine" from lr in
    # round 1 down to lr * lr_final_fraction in the last round.
    lr_schedule: str = "cosine"
    lr_final_fraction: float = 0.1
    # Rounds 1..head_rounds train only the classifier head, then LoRA joins (linear probing
    # then fine-tuning; fedlora/round_schedule.py). 0 = LoRA and head from round 1.
    head_rounds: int = 0
    optimizer: str = "sgd"  # or "adamw"
    prox_mu: float = 0.0  # FedProx proximal weight mu (0 = off): pulls local training toward the global adapter
    device: str = "auto"  # "auto" = cuda if this machine has a GPU, else cpu
    # Recompute activations in backward (less memory, more time); reentrant, as Opacus needs.
    gradient_checkpointing: bool = False
    # Keep each example's hidden states below the first LoRA layer (frozen, so the same in
    # every round) and run only the layers above it (client/frozen_prefix.py); same logits.
    cache_frozen_layers: bool = True
    # A DP-SGD batch runs as this many micro-batches of its rows sorted by length, each
    # padded to its own longest row (client/length_buckets.py): the same rows and per-row
    # gradients, less padding. 1 = one batch padded to its longest row.
    length_buckets: int = 4


@dataclass
class PrivacySection:
    enabled: bool = True
    target_epsilon: float = 8.0  # per site, over the planned rounds
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"  # or "rdp"
    # Limit on each virtual site's cumulative epsilon (simulation); 0 = none. A deployed
    # site sets its own limit with the node config key `max-epsilon`, which wins.
    site_max_epsilon: float = 0.0
    # The privacy unit: "example" (one sequence) or "user" (all records of one user or
    # patient, identified by `user_column`; users are sampled and clipped as a whole).
    unit: str = "example"
    user_column: str = "user_id"
    user_max_records: int = 16  # records of a sampled user used in one step (a random subset)
    # Central DP at the coordinator: clip each site's update to central_clip_norm and add
    # Gaussian noise (std central_noise_multiplier * central_clip_norm / sites) to the mean.
    central: bool = False
    central_noise_multiplier: float = 1.0
    central_clip_norm: float = 1.0
    # How per-example gradients are computed (same clipping, noise and accounting either
    # way): "fast" = hooks on LoRA/nn.Linear layers (privacy/lora_grad_sample.py),
    # "opacus" = Opacus's GradSampleModule, "auto" = fast when it covers every trainable parameter.
    dp_impl: str = "auto"
    # Evaluation under DP: each site releases its validation counts with Gaussian noise
    # calibrated so that the planned evaluations (rounds + 1) spend at most eval_epsilon,
    # charged to its ledger; training gets the rest of target_epsilon. Per-example losses
    # are clipped to eval_loss_clip before they are summed (the sum's sensitivity).
    eval_epsilon: float = 1.0
    eval_loss_clip: float = 5.0
    # "local": each site adds all the noise its own guarantee needs (DP-SGD on its own).
    # "distributed": each round is one DP-SGD step over the union of the sites' records at
    # the global adapter; each site adds a share of the Skellam noise, summed under secure
    # aggregation (privacy/distributed_dp.py). Needs federation.secure_aggregation.
    mode: str = "local"
    # Distributed mode: the noise reaches its full level even if this many of the sites that
    # masked drop out or add no noise (colluding with the coordinator).
    distributed_tolerance: int = 1
    # Distributed mode: the Poisson rate at which every site samples its records each round
    # (one step per round; the union's expected batch is this times all sites' records).
    distributed_sample_rate: float = 0.05


@dataclass
class FederationSection:
    rounds: int = 96
    min_clients: int = 2
    round_timeout: float = 600.0  # seconds to wait for replies in one round
    round_retries: int = 2  # more attempts for a round that gathers fewer than min_clients updates
    # Evaluate the global adapter after every k-th round (and after the last; round 0 always).
    # Under DP the planned evaluations share privacy.eval_epsilon, so fewer are less noisy;
    # many one-step rounds (privacy.mode = "distributed") also save the evaluations' time.
    evaluate_every: int = 24
    # Sites asked to train (and evaluate) each round, sampled from the run seed; 0 = every connected site.
    clients_per_round: int = 0
    # Secure aggregation (privacy/secure_aggregation.py): the coordinator learns only the sum
    # of the sites' updates. Linear strategies only (fedavg, ffa, fedsvd and the server optimizers).
    secure_aggregation: bool = False
    # Masked inputs needed to unmask (and shares to rebuild a secret); 0 = more than half the
    # sites that sent valid keys, at least 2. Must exceed half of them either way.
    secure_aggregation_threshold: int = 0
    # Each coordinate of a site's change is clipped to [-clip, clip] before it is quantized
    # (2^24 levels per clip, so 1.0 gives steps of 6e-8).
    secure_aggregation_clip: float = 1.0


@dataclass
class StrategySection:
    # fedavg, fedavgm, fedadam, fedyogi (server optimizers on the pseudo-gradient),
    # median, trimmed-mean (robust coordinate-wise aggregates); see strategies/.
    name: str = "fedavg"
    # Server optimizers' step size on the pseudo-gradient; 0 = the strategy's own default
    # (fedavgm 1.0; fedadam/fedyogi 0.01, whose steps are about server_lr per coordinate).
    server_lr: float = 0.0
    momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam / fedyogi (Reddi et al. 2021, "Adaptive Federated Optimization")
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: step = m / (sqrt(v) + tau)
    trim_fraction: float = 0.2  # trimmed-mean: fraction cut from EACH end per coordinate
    # Update screening (every strategy). An update is a client's adapter minus the
    # global adapter; its norm is the L2 norm over all tensors together.
    max_update_norm: float = 0.0  # absolute bound; 0 = off
    outlier_factor: float = 10.0  # reject norms above this many times the round's median; 0 = off
    # Bounded weights: a site's aggregation weight is min(num-examples, max_weight_factor x the
    # round's lower median num-examples); also bounds its share of the evaluation sums. 0 = off.
    # 3: one site never outweighs four others together (3/7 < 1/2), and honest power-of-two DP
    # buckets up to 2 above the median lose at most a quarter (server/site_replies.py).
    max_weight_factor: float = 3.0


@dataclass
class SitePolicySection:
    """The site policy every virtual site applies; a deployed site's comes from its own
    node config (client/site_policy.py). "" and 0 follow the run's own setting."""

    max_delta: float = 0.0  # 0 = the run's privacy.delta
    privacy_unit: str = ""  # "example" or "user"; "" = the run's privacy.unit
    user_column: str = ""
    allow_no_dp: bool = True  # a simulation may compare with and without DP
    text_column: str = ""
    label_column: str = ""
    prompt_column: str = ""
    response_column: str = ""
    max_evaluations: int = 0  # per run; 0 = no cap (under DP every evaluation is accounted)
    calibrate_to_limit: bool = True  # a site whose limit is below the run's plan adds noise instead of declining
    max_noise_increase: float = 4.0  # ... but declines past this many times the plan's noise multiplier; 0 = no cap


@dataclass
class SimulationSection:
    dataset: str = "default"  # or a local JSONL/CSV file, split across the virtual clients
    dataset_size: int = 6000  # notes generated for the default dataset (more per site = less noise for the same epsilon)
    # Fresh notes no site holds, drawn after the run to score the final adapter exactly
    # (RUN_DIR/test.json; default dataset only); 0 = none. For studies: the federated
    # validation figure is a noisy release under DP.
    test_notes: int = 0
    clients: int = 5
    partition: str = "dirichlet"  # or "iid"
    alpha: float = 0.5
    cpus_per_client: int = 2
    # LoRA rank of each virtual site, cycled over partition ids (site k: client_ranks[k % len]);
    # empty = every site uses lora.rank. Different ranks need strategy.name = "exact".
    client_ranks: list[int] = field(default_factory=list)
    # Reload the base model on every client call instead of once per worker: the baseline
    # (what FlowerTune does) that `fedlora bench simulation` compares against. Never faster.
    reload_base_model: bool = False
    # Run the simulation engine in a private network namespace whose only interface is
    # loopback, so that nothing Ray starts can be reached from another machine
    # (fedlora/private_network.py). Linux only; elsewhere `fedlora simulate` refuses
    # unless --allow-network is given.
    isolate_network: bool = True
    # Join this existing Ray cluster (e.g. "10.0.0.5:6379") instead of starting Ray on
    # this machine; "" = a private one. Needs the network, so isolation is off for it.
    ray_address: str = ""
    site_policy: SitePolicySection = field(default_factory=SitePolicySection)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    federation: FederationSection = field(default_factory=FederationSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {"train.lr": 0.02, "simulation.site_policy.max_delta": 0.0, ...}."""
        return _dotted(self.to_dict())


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


CHOICES: dict[str, tuple[str, ...]] = {
    "model.task": ("classification", "causal-lm"),
    "model.dtype": ("float32", "bfloat16"),
    "model.pooling": ("auto", "mean", "model"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.optimizer": ("adamw", "sgd"),
    "train.lr_schedule": ("constant", "cosine"),
    "privacy.accountant": ("prv", "rdp"),
    "privacy.unit": ("example", "user"),
    "simulation.site_policy.privacy_unit": ("", "example", "user"),
    "privacy.dp_impl": ("auto", "fast", "opacus"),
    "privacy.mode": ("local", "distributed"),
    "simulation.partition": ("iid", "dirichlet"),
    # fedlora.strategies.STRATEGIES, by name (tests/test_strategies.py keeps them the same)
    "strategy.name": ("fedavg", "ffa", "fedsvd", "exact", "fedavgm", "fedadam", "fedyogi", "median", "trimmed-mean"),
}

POSITIVE: tuple[str, ...] = (
    "model.max_length", "lora.rank", "lora.alpha", "train.local_steps", "train.batch_size", "train.length_buckets",
    "train.lr", "privacy.target_epsilon", "privacy.delta", "privacy.max_grad_norm",
    "privacy.user_max_records", "privacy.central_noise_multiplier", "privacy.central_clip_norm",
    "federation.rounds", "federation.min_clients", "federation.round_timeout", "federation.secure_aggregation_clip",
    "simulation.dataset_size", "simulation.clients", "simulation.alpha",
    "simulation.cpus_per_client", "strategy.tau", "privacy.eval_epsilon", "privacy.eval_loss_clip",
    "privacy.distributed_sample_rate", "federation.evaluate_every",
)

# [0, 1): exponential decay rates.
UNIT_INTERVAL: tuple[str, ...] = ("strategy.momentum", "strategy.beta1", "strategy.beta2", "train.lr_final_fraction")


def _leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> annotated type, for every leaf of a (nested) config dataclass."""
    out: dict[str, Any] = {}
    for name, typ in get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            out.update(_leaf_types(typ, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = typ
    return out


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """A (nested) config dataclass from dotted keys; missing keys take defaults."""
    kwargs = {}
    for name, typ in get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, values, key + ".")
        elif key in values:
            kwargs[name] = values[key]
    return cls(**kwargs)


def _coerce(key: str, value: Any, typ: Any, where: str) -> Any:
    """Check one value against its annotated type; ints are accepted for floats."""
    options = get_args(typ) if get_origin(typ) in (type(str | int),) else (typ,)
    list_type = next((o for o in options if get_origin(o) is list), None)
    item_type = get_args(list_type)[0] if list_type else None
    if list_type and isinstance(value, str) and ("," in value or str not in options):
        # Flower run config has no lists: "a,b,c" stands for ["a", "b", "c"] there.
        value = [v.strip() for v in value.split(",") if v.strip()]
        if item_type is int and all(v.lstrip("-").isdigit() for v in value):
            value = [int(v) for v in value]
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is list_type and isinstance(value, list):
            if all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
                return list(value)
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where}: key '{key}' must be {names}, got {value!r}")


def from_flat(flat: dict[str, Any], where: str = "config") -> Config:
    """Build and validate a Config from dotted keys; missing keys take defaults."""
    types = _leaf_types(Config)
    values: dict[str, Any] = {}
    for key, value in flat.items():
        values[key] = _checked(key, value, types, where)
    config = _build(Config, values)
    validate(config, where)
    return config


def _checked(key: str, value: Any, types: dict[str, Any], where: str) -> Any:
    """One dotted key's value, coerced to its type; an unknown key names the closest known one."""
    if key not in types:
        section, _, leaf = key.rpartition(".")
        leaves = [k.rpartition(".")[2] for k in types if k.rpartition(".")[0] == section]
        # Within a known section, compare the last parts only: the shared "section." would
        # make every key of the section look close.
        near = difflib.get_close_matches(leaf, leaves, n=2, cutoff=0.65) or [k for k in leaves if k.startswith(leaf)][:2]
        close = [f"{section}.{m}" for m in near] if leaves else difflib.get_close_matches(key, types, n=1, cutoff=0.65)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    return _coerce(key, value, types[key], where)


def flatten(tree: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """TOML tables -> dotted keys ([simulation.site_policy] max_delta -> "simulation.site_policy.max_delta")."""
    for section, table in tree.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: key '{section}' must be a [{section}] table")
    return _dotted(tree)


# Strategies whose next adapter depends on the updates only through their weighted mean,
# which is all that secure aggregation reveals.
SECURE_AGGREGATION_STRATEGIES = ("fedavg", "ffa", "fedsvd", "fedavgm", "fedadam", "fedyogi")


def check_secure_aggregation(config: Config, where: str) -> None:
    key = "federation.secure_aggregation"
    if config.strategy.name not in SECURE_AGGREGATION_STRATEGIES:
        raise ConfigError(f"{where}: key '{key}' needs a linear strategy ({', '.join(SECURE_AGGREGATION_STRATEGIES)}); "
                          f"strategy.name = {config.strategy.name!r} needs each site's update")
    if config.privacy.central:
        raise ConfigError(f"{where}: key '{key}' cannot be combined with privacy.central: central DP clips each site's "
                          "update at the coordinator, which secure aggregation hides")
    threshold = config.federation.secure_aggregation_threshold
    if threshold != 0 and threshold < 2:
        raise ConfigError(f"{where}: key 'federation.secure_aggregation_threshold' must be 0 (automatic) or >= 2, got {threshold!r}")
    if 0 < config.federation.clients_per_round < threshold:
        raise ConfigError(f"{where}: key 'federation.secure_aggregation_threshold' ({threshold}) exceeds "
                          f"federation.clients_per_round ({config.federation.clients_per_round}): no round could unmask")


def evaluated_rounds(config: Config) -> list[int]:
    """The rounds after which the global adapter is evaluated (0 is the initial adapter)."""
    every, rounds = config.federation.evaluate_every, config.federation.rounds
    return [r for r in range(rounds + 1) if r % every == 0 or r == rounds]


def check_distributed(config: Config, where: str) -> None:
    key, p = "privacy.mode", config.privacy
    if not (config.federation.secure_aggregation and p.enabled):
        raise ConfigError(f"{where}: key '{key}' = 'distributed' needs federation.secure_aggregation = true and privacy.enabled = true")
    if p.unit != "example":
        raise ConfigError(f"{where}: key '{key}' = 'distributed' supports privacy.unit = 'example' only, got {p.unit!r}")
    if config.train.optimizer != "sgd":
        raise ConfigError(f"{where}: key '{key}' = 'distributed' takes the step at the coordinator with SGD: "
                          f"set train.optimizer = 'sgd' (got {config.train.optimizer!r})")
    if not 0 < p.distributed_sample_rate <= 1:
        raise ConfigError(f"{where}: key 'privacy.distributed_sample_rate' must be in (0, 1], got {p.distributed_sample_rate!r}")
    if p.distributed_tolerance < 0:
        raise ConfigError(f"{where}: key 'privacy.distributed_tolerance' must be >= 0, got {p.distributed_tolerance!r}")


# Clipping bounds a coordinator sets: a bound this large clips nothing real, and near
# float32's largest value sums of clipped values overflow (to inf exactly when one more
# record is present).
MAX_CLIP = 1e6
BOUNDED: tuple[str, ...] = ("privacy.max_grad_norm", "privacy.eval_loss_clip", "federation.secure_aggregation_clip",
                            "privacy.central_clip_norm")


def validate(config: Config, where: str = "config") -> None:
    flat = config.to_flat()
    for key in BOUNDED:
        if not flat[key] <= MAX_CLIP:
            raise ConfigError(f"{where}: key '{key}' must be at most {MAX_CLIP:g}, got {flat[key]!r}")
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{where}: key '{key}' must be one of {', '.join(allowed)}, got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise ConfigError(f"{where}: key '{key}' must be > 0, got {flat[key]!r}")
    if not 0 < config.data.validation_fraction < 1:
        raise ConfigError(f"{where}: key 'data.validation_fraction' must be between 0 and 1, got {config.data.validation_fraction!r}")
    if not config.train.prox_mu >= 0:
        raise ConfigError(f"{where}: key 'train.prox_mu' must be >= 0, got {config.train.prox_mu!r}")
    if not config.strategy.server_lr >= 0:
        raise ConfigError(f"{where}: key 'strategy.server_lr' must be >= 0 (0 = the strategy's default), got {config.strategy.server_lr!r}")
    if not 0 <= config.lora.dropout < 1:
        raise ConfigError(f"{where}: key 'lora.dropout' must be in [0, 1), got {config.lora.dropout!r}")
    for key in UNIT_INTERVAL:
        if not 0 <= flat[key] < 1:
            raise ConfigError(f"{where}: key '{key}' must be in [0, 1), got {flat[key]!r}")
    for name, value in dataclasses.asdict(config.strategy).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: key 'strategy.{name}' must be finite, got {value!r}")
    if not 0 <= config.strategy.trim_fraction < 0.5:
        raise ConfigError(f"{where}: key 'strategy.trim_fraction' must be in [0, 0.5), got {config.strategy.trim_fraction!r}")
    if not config.strategy.max_update_norm >= 0:
        raise ConfigError(f"{where}: key 'strategy.max_update_norm' must be >= 0 (0 = off), got {config.strategy.max_update_norm!r}")
    if not (config.strategy.outlier_factor == 0 or config.strategy.outlier_factor >= 1):
        # Below 1 the rule would reject about half of the honest updates every round.
        raise ConfigError(f"{where}: key 'strategy.outlier_factor' must be 0 (off) or >= 1, got {config.strategy.outlier_factor!r}")
    if not (config.strategy.max_weight_factor == 0 or config.strategy.max_weight_factor >= 1):
        # Below 1 even the median site would be capped: every weight would be cut, none bounded better.
        raise ConfigError(f"{where}: key 'strategy.max_weight_factor' must be 0 (off) or >= 1, got {config.strategy.max_weight_factor!r}")
    if not config.privacy.delta < 1:
        raise ConfigError(f"{where}: key 'privacy.delta' must be < 1, got {config.privacy.delta!r}")
    if config.privacy.enabled and not config.privacy.eval_epsilon < config.privacy.target_epsilon:
        raise ConfigError(f"{where}: key 'privacy.eval_epsilon' ({config.privacy.eval_epsilon!r}) must be below "
                          f"privacy.target_epsilon ({config.privacy.target_epsilon!r}): training needs a share of the budget")
    policy = config.simulation.site_policy
    if not 0 <= policy.max_delta < 1:
        raise ConfigError(f"{where}: key 'simulation.site_policy.max_delta' must be in [0, 1) (0 = the run's delta), got {policy.max_delta!r}")
    if not policy.max_evaluations >= 0:
        raise ConfigError(f"{where}: key 'simulation.site_policy.max_evaluations' must be >= 0 (0 = no cap), got {policy.max_evaluations!r}")
    if not (policy.max_noise_increase == 0 or 1 <= policy.max_noise_increase < math.inf):
        raise ConfigError(f"{where}: key 'simulation.site_policy.max_noise_increase' must be >= 1 (0 = no cap), got {policy.max_noise_increase!r}")
    if not config.federation.clients_per_round >= 0:
        raise ConfigError(f"{where}: key 'federation.clients_per_round' must be >= 0 (0 = all), got {config.federation.clients_per_round!r}")
    if 0 < config.federation.clients_per_round < config.federation.min_clients:
        raise ConfigError(f"{where}: key 'federation.clients_per_round' ({config.federation.clients_per_round}) is below "
                          f"federation.min_clients ({config.federation.min_clients}): no round could complete")
    if not config.federation.round_retries >= 0:
        raise ConfigError(f"{where}: key 'federation.round_retries' must be >= 0, got {config.federation.round_retries!r}")
    if not config.privacy.site_max_epsilon >= 0:
        raise ConfigError(f"{where}: key 'privacy.site_max_epsilon' must be >= 0 (0 = no limit), got {config.privacy.site_max_epsilon!r}")
    if config.privacy.central and config.strategy.name not in ("fedavg", "ffa"):
        # The noise is calibrated to the unweighted mean of clipped updates.
        raise ConfigError(f"{where}: key 'privacy.central' needs strategy.name = 'fedavg' or 'ffa', got {config.strategy.name!r}")
    if config.federation.secure_aggregation:
        check_secure_aggregation(config, where)
    if config.privacy.mode == "distributed":
        check_distributed(config, where)
    if config.train.head_rounds < 0:
        raise ConfigError(f"{where}: key 'train.head_rounds' must be >= 0 (0 = LoRA from round 1), got {config.train.head_rounds!r}")
    if config.lora.top_layers < 0:
        raise ConfigError(f"{where}: key 'lora.top_layers' must be >= 0 (0 = every layer), got {config.lora.top_layers!r}")
    if config.simulation.test_notes < 0:
        raise ConfigError(f"{where}: key 'simulation.test_notes' must be >= 0 (0 = no test set), got {config.simulation.test_notes!r}")
    if config.simulation.test_notes and (config.simulation.dataset != "default" or config.model.task != "classification"):
        raise ConfigError(f"{where}: key 'simulation.test_notes' needs simulation.dataset = 'default' (classification), "
                          "whose generator can draw notes no site holds")
    if config.model.task == "causal-lm" and config.simulation.partition == "dirichlet" and config.simulation.dataset != "default":
        raise ConfigError(f"{where}: key 'simulation.partition' = 'dirichlet' needs labels; use 'iid' for causal-lm")
    if any(r <= 0 for r in config.simulation.client_ranks):
        raise ConfigError(f"{where}: key 'simulation.client_ranks' must hold ranks > 0, got {config.simulation.client_ranks!r}")
    if any(r != config.lora.rank for r in config.simulation.client_ranks) and config.strategy.name != "exact":
        raise ConfigError(f"{where}: key 'simulation.client_ranks' with ranks other than lora.rank needs strategy.name = 'exact'")
    if len(set(config.data.labels)) != len(config.data.labels):
        raise ConfigError(f"{where}: key 'data.labels' has duplicate names")
    if config.model.task == "classification" and len(config.data.labels) == 1:
        raise ConfigError(f"{where}: key 'data.labels' lists one label; classification needs at least 2")


def parse_override(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE a TOML value; a bare word that is not one is a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- TOML file <- overrides (dotted keys), validated."""
    flat: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        try:
            flat = flatten(tomllib.loads(path.read_text()), where)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        for key, value in flat.items():  # a file's mistake is named as the file's, not as --set's
            _checked(key, value, _leaf_types(Config), where)
    if overrides:
        for key, value in overrides.items():
            _checked(key, value, _leaf_types(Config), "--set")
        flat.update(overrides)
        where = f"{where} with --set" if path else "--set"
    return from_flat(flat, where)


def write_config(config: Config, path: Path) -> None:
    write_atomic(path, tomli_w.dumps(config.to_dict()))

"""The site's signed privacy statement for a reply it sends (privacy/privacy_statement.py).

A site signs with its node key: a deployed site with the key it authenticates to the
coordinator with (node config `node-key`, which `fedlora client --key` sets), a virtual
site with its derived key (privacy/node_keys.py), as in secure aggregation. A site
without a node key (a bare SuperNode, `fedlora client --insecure` without `--key`)
sends no statement: it has nothing a reader could check a signature against, and an
unsigned statement would be the coordinator's word again.

Called after the reply's ledger entry, with the epsilons the reply's metrics carry: the
statement adds no figure the coordinator does not already receive.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context

from fedlora.app_hash import running_app_hash
from fedlora.base_fingerprint import model_fingerprint
from fedlora.client.peer_keys import load_node_key
from fedlora.config import Config
from fedlora.model_folder import resolve_model_dir
from fedlora.privacy.node_keys import virtual_node_key
from fedlora.privacy.privacy_statement import sign_statement
from fedlora.privacy.site_ledger import SiteLedger


def statement_key(config: Config, node_config: dict) -> ec.EllipticCurvePrivateKey | None:
    """The key this site signs statements with; None if it has none."""
    if "node-key" in node_config:
        return load_node_key(Path(str(node_config["node-key"])))
    if "partition-id" in node_config and "data-path" not in node_config:  # a virtual site
        return virtual_node_key(config.run.seed, int(node_config["partition-id"]))
    return None


def mechanism_of(config: Config, message: str) -> tuple[str, str]:
    """(mechanism, dp-mode) of a reply: evaluations release Gaussian-noised sums in either DP mode."""
    if not config.privacy.enabled:
        return "none", "off"
    if message == "train" and config.privacy.mode == "distributed":
        return "skellam", "distributed"
    return "gaussian", config.privacy.mode


def unaccounted_epsilons(config: Config, state_dir: Path) -> tuple[float, float, float]:
    """(run epsilon, total epsilon, total delta) from the ledger, for a reply that was not
    itself accounted (no DP): what earlier entries spent, from the figures the ledger keeps."""
    from fedlora.privacy.epsilon_cache import EpsilonCache

    ledger, delta = SiteLedger.load(state_dir), config.privacy.delta
    if not ledger.history():
        return 0.0, 0.0, delta
    cache = EpsilonCache(state_dir)
    total_delta = ledger.guard_delta(delta)
    total = cache.epsilon(ledger.history(), total_delta, config.privacy.accountant)
    cache.save()
    return ledger.run_epsilon(config.run.output_dir), total, total_delta


def signed_statement(context: Context, config: Config, server_round: int, message: str, state_dir: Path,
                     epsilons: tuple[float, float, float] | None, adapter: str,
                     secure_aggregation: bool = False) -> ConfigRecord | None:
    """The statement for a `message` reply ("train" or "evaluate") of `server_round`, or None
    for a site without a node key. `adapter`: the digest of the global adapter the request
    carried, as loaded. `epsilons`: (this run's, the site's total, the total's delta)
    as the ledger has them after the reply's entry; None when the reply was not accounted
    (no DP), to read them from the ledger."""
    key = statement_key(config, context.node_config)
    if key is None:
        return None
    run_epsilon, total_epsilon, total_delta = epsilons if epsilons is not None else unaccounted_epsilons(config, state_dir)
    mechanism, dp_mode = mechanism_of(config, message)
    fields = {
        "run": config.run.output_dir, "round": int(server_round), "message": message,
        # The site's own copy, which matched the coordinator's fingerprint before anything ran.
        "base-model": model_fingerprint(resolve_model_dir(config.model.path), state_dir),
        "app-hash": running_app_hash(), "adapter": adapter,
        "run-epsilon": float(run_epsilon), "run-delta": float(config.privacy.delta),
        "total-epsilon": float(total_epsilon), "total-delta": float(total_delta),
        "unit": config.privacy.unit, "mechanism": mechanism, "accountant": config.privacy.accountant,
        "secure-aggregation": bool(secure_aggregation), "dp-mode": dp_mode,
    }
    return ConfigRecord(sign_statement(fields, key))

"""The site's node key, lent to its privacy ledger and audit log for the message at hand.

The privacy floor chains and heads the site's trail but loads no keys
(privacy/trail_chain.py); this mod, inside the reply guard, lends it the key the site
already has: a deployed site's node key (node config `node-key`, the key it
authenticates to the coordinator with), or a virtual site's key derived from the run
seed and its partition id (as for secure aggregation; it protects nothing there, one
machine holds every party). A site with neither writes unsigned heads.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora.client.peer_keys import load_node_key, virtual_node_key
from fedlora.client.site_policy import is_virtual, site_state_dir
from fedlora.config import Config
from fedlora.messages import read_config_record
from fedlora.privacy.trail_chain import TrailSigner, signing_trail


def trail_key(config: Config, node_config: dict) -> ec.EllipticCurvePrivateKey | None:
    """The key this site signs its trail heads with (None: it has none)."""
    if "node-key" in node_config:
        return load_node_key(Path(str(node_config["node-key"])))
    if is_virtual(node_config):
        return virtual_node_key(config.run.seed, int(node_config["partition-id"]))
    return None


def signed_trail(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: the trail writes of this message sign their heads with the site's key."""
    try:
        config, _ = read_config_record(msg.content["config"])
        state_dir = site_state_dir(config, context.node_config)
    except Exception:  # noqa: BLE001 - no config or no state dir: the handler itself says why
        return call_next(msg, context)
    key = trail_key(config, context.node_config)  # an unreadable node key is the site's error, not skipped
    # A node key is the site's for good: its ledger must be signed by it (the budget guard
    # pins it). A virtual site's key is derived per run, so nothing pins it.
    signer = TrailSigner(key, pinned="node-key" in context.node_config) if key is not None else None
    with signing_trail(state_dir, signer):
        return call_next(msg, context)

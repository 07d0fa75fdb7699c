"""The keys a site signs and checks secure-aggregation messages with.

A deployed site signs with its node key (node config `node-key`: the P-384 key it
authenticates to the coordinator with, `fedlora site-key`) and trusts exactly the node
keys in its `peer-keys` file: the OpenSSH public keys of the consortium's sites, one per
line, which the sites exchange among themselves (never through the coordinator). A site
without `peer-keys` takes no part in secure aggregation (it declines, naming the key).

A virtual site of the simulation derives its node key from the run seed and its
partition id, and trusts every partition's key: one machine holds every party there, so
the simulation runs and measures the protocol but protects nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.config import Config
from fedlora.privacy.node_keys import virtual_node_key
from fedlora.privacy.secure_aggregation import node_key_bytes


class PeerKeyError(ValueError):
    """A node key or peer-keys file that cannot be used, as one line naming the file."""


@dataclass(frozen=True)
class SigningKeys:
    node_key: ec.EllipticCurvePrivateKey
    trusted: frozenset[bytes]  # DER SubjectPublicKeyInfo of the node keys this site accepts


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PeerKeyError(f"node key {path}: not readable ({exc.strerror})") from None
    except ValueError:
        raise PeerKeyError(f"node key {path}: not an OpenSSH private key (fedlora site-key writes one)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise PeerKeyError(f"node key {path}: not an EC P-384 key")
    return key


def load_peer_keys(path: Path) -> frozenset[bytes]:
    """The node keys in an OpenSSH public-key file (blank lines and # comments skipped)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PeerKeyError(f"peer keys {path}: not readable ({getattr(exc, 'strerror', None) or 'not text'})") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            public = serialization.load_ssh_public_key(line.strip().encode())
        except (ValueError, TypeError):
            raise PeerKeyError(f"peer keys {path}: line {number} is not an OpenSSH public key") from None
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP384R1):
            raise PeerKeyError(f"peer keys {path}: line {number} is not an EC P-384 key")
        keys.add(node_key_bytes(public))
    if not keys:
        raise PeerKeyError(f"peer keys {path}: no keys")
    return frozenset(keys)


def site_signing_keys(config: Config, node_config: dict) -> SigningKeys | None:
    """This site's node key and trusted peers; None if it has no `peer-keys` (it then
    takes no part in secure aggregation)."""
    if "peer-keys" in node_config:
        if "node-key" not in node_config:
            raise PeerKeyError("node config has 'peer-keys' but no 'node-key' to sign with")
        node_key = load_node_key(Path(str(node_config["node-key"])))
        trusted = load_peer_keys(Path(str(node_config["peer-keys"])))
        if node_key_bytes(node_key.public_key()) not in trusted:
            raise PeerKeyError(f"peer keys {node_config['peer-keys']}: this site's own public key is not in it")
        return SigningKeys(node_key, trusted)
    if "partition-id" in node_config and "data-path" not in node_config:
        count = int(node_config["num-partitions"])
        keys = [virtual_node_key(config.run.seed, p) for p in range(count)]
        return SigningKeys(keys[int(node_config["partition-id"])], frozenset(node_key_bytes(k.public_key()) for k in keys))
    return None

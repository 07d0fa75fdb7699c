"""Secure aggregation's messages as plain dicts of the values a Flower ConfigRecord holds
(bytes, int, str, lists of them), for both ends: the coordinator relays only these, and a
site's reply guard lets out only these keys.

Node ids are uint64 and do not fit a ConfigRecord int (int64): a list of them travels as
one bytes value of big-endian 8-byte words.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.privacy.secure_aggregation import AdvertisedKeys, QuantizationSpec, SecureAggregationError

if TYPE_CHECKING:
    from fedlora.config import Config

RECORD = "secagg"  # the ConfigRecord both ways
MASKED = "masked"  # the ArrayRecord of a site's masked input (train reply)
ACTIONS = ("secagg_keys", "secagg_shares", "secagg_survivors", "secagg_reveal")  # query.<action>
# What each reply may hold (client/reply_guard.py lets nothing else out).
REPLY_KEYS = {
    "secagg_keys": ("node-public", "cipher-public", "mask-public", "signature"),
    "secagg_shares": ("to", "shares"),
    "secagg_survivors": ("signature",),
    "secagg_reveal": ("about", "kind", "x", "share"),
}
LEVELS = 1 << 24  # quantization steps per clip
MAX_WEIGHT = 1 << 16  # a site's weight (its num-examples) is capped here: it sizes the modulus
# Distributed DP sums records' rounded gradients, not weighted changes: at most
# MAX_DISTRIBUTED_RECORDS per site and step (privacy/distributed_dp.py checks it), and 4x
# headroom in the modulus for the Skellam noise.
MAX_DISTRIBUTED_RECORDS = MAX_WEIGHT
DISTRIBUTED_MAX_WEIGHT = 4 * MAX_DISTRIBUTED_RECORDS


def quantization(distributed: bool, clip: float, sites: int) -> QuantizationSpec:
    """fedlora's own quantization for `sites` masking sites (a site accepts no other)."""
    return QuantizationSpec(clip, LEVELS, sites, DISTRIBUTED_MAX_WEIGHT if distributed else MAX_WEIGHT)


def noise_terms(config: Config) -> str:
    """What a site's share of distributed DP's noise depends on, for the aggregation
    context: sites told different terms sign keys for different contexts, so they cannot
    mask together (a coordinator cannot have one site add less noise than another expects)."""
    p = config.privacy
    if p.mode != "distributed":
        return ""
    return (f"distributed skellam target_epsilon={p.target_epsilon!r} eval_epsilon={p.eval_epsilon!r} delta={p.delta!r} "
            f"rounds={config.federation.rounds} evaluate_every={config.federation.evaluate_every} sample_rate={p.distributed_sample_rate!r} tolerance={p.distributed_tolerance} "
            f"max_grad_norm={p.max_grad_norm!r} levels={LEVELS}")


def run_clip(config: Config) -> float:
    """The clip every masked input is quantized at: the run's federation.secure_aggregation_clip
    (under distributed DP privacy.max_grad_norm, which the sensitivities are counted in). A
    site accepts no other: a coordinator that gave the other sites a huge clip would round
    their inputs to 0 and leave the target's update alone in the sum."""
    distributed = config.privacy.mode == "distributed"
    return config.privacy.max_grad_norm if distributed else config.federation.secure_aggregation_clip


def quantization_terms(config: Config) -> str:
    """What shapes the quantization, but for the number of sharers (unknown at the keys step,
    checked against the sharers named at the train step)."""
    spec = quantization(config.privacy.mode == "distributed", run_clip(config), 1)
    return f"clip={spec.clip!r} levels={spec.levels} max_weight={spec.max_weight}"


def adapter_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over an adapter's tensors as they travel (name, dtype, shape, bytes; by name)."""
    h = hashlib.sha256(b"fedlora adapter/1\n")
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\n{array.dtype.str}\n{array.shape}\n".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def bound_terms(config: Config, config_digest: str, adapter: str) -> str:
    """Everything that shapes a site's masked input, for the aggregation context: the run
    config (`config_digest`, without the round and the nonce), the adapter sent
    (`adapter_digest`), the quantization and distributed DP's noise terms. Sites told
    different things sign keys for different contexts, so they cannot verify each other's
    keys and refuse at the roster, before training."""
    return (f"{noise_terms(config)}\nconfig={config_digest}\nadapter={adapter}\n"
            f"quantization={quantization_terms(config)}")


def aggregation_context(run: str, server_round: int, nonce: bytes, terms: str = "") -> bytes:
    """What every signature of one aggregation is bound to: the run, the round, the
    coordinator's nonce for this attempt (a site refuses a context it has seen) and the
    terms that shape each masked input (`bound_terms`)."""
    return hashlib.sha256(f"fedlora aggregation\n{run}\n{server_round}\n{terms}\n".encode() + nonce).digest()


def check_digest(value: Any, what: str) -> str:
    """A SHA-256 hex digest the coordinator relays (it is hashed into the context, so a
    wrong one only makes the site's keys unverifiable; the form is checked to fail early)."""
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise SecureAggregationError(f"the {what} digest must be 64 lowercase hex digits")
    return value


def pack_ids(ids: list[int] | set[int] | frozenset[int]) -> bytes:
    """In the list's order; a set in ascending order."""
    return b"".join(struct.pack(">Q", n) for n in (ids if isinstance(ids, list) else sorted(ids)))


def unpack_ids(blob: bytes) -> list[int]:
    if not isinstance(blob, bytes) or len(blob) % 8:
        raise SecureAggregationError("a list of site ids is not a whole number of 8-byte words")
    return [n for (n,) in struct.iter_unpack(">Q", blob)]


def keys_reply(keys: AdvertisedKeys) -> dict[str, Any]:
    return {"node-public": keys.node_public, "cipher-public": keys.cipher_public, "mask-public": keys.mask_public,
            "signature": keys.signature}


def keys_from_reply(site: int, record: Any) -> AdvertisedKeys:
    try:
        values = [record[k] for k in REPLY_KEYS["secagg_keys"]]
    except KeyError as exc:
        raise SecureAggregationError(f"keys reply without {exc.args[0]!r}") from None
    if not all(isinstance(v, bytes) for v in values):
        raise SecureAggregationError("keys reply values must be bytes")
    return AdvertisedKeys(site, *values)


def roster_record(roster: list[AdvertisedKeys], threshold: int) -> dict[str, Any]:
    return {"sites": pack_ids([k.site for k in roster]), "node-public": [k.node_public for k in roster],
            "cipher-public": [k.cipher_public for k in roster], "mask-public": [k.mask_public for k in roster],
            "signature": [k.signature for k in roster], "threshold": threshold}


def roster_from(record: Any) -> tuple[list[AdvertisedKeys], int]:
    sites = unpack_ids(record["sites"])
    columns = [list(record[k]) for k in ("node-public", "cipher-public", "mask-public", "signature")]
    if any(len(c) != len(sites) for c in columns):
        raise SecureAggregationError("the roster's columns differ in length")
    return [AdvertisedKeys(s, *values) for s, *values in zip(sites, *columns)], int(record["threshold"])


def spec_record(spec: QuantizationSpec) -> dict[str, Any]:
    return {"clip": float(spec.clip), "levels": int(spec.levels), "sites": int(spec.sites), "max-weight": int(spec.max_weight)}


def spec_from(record: Any) -> QuantizationSpec:
    spec = QuantizationSpec(float(record["clip"]), int(record["levels"]), int(record["sites"]), int(record["max-weight"]))
    spec.check()
    return spec


def reveal_reply(revealed: dict[int, tuple[str, int, bytes]]) -> dict[str, Any]:
    about = sorted(revealed)
    return {"about": pack_ids(about), "kind": [revealed[v][0] for v in about], "x": [revealed[v][1] for v in about],
            "share": [revealed[v][2] for v in about]}


def reveal_from(record: Any) -> dict[int, tuple[str, int, bytes]]:
    about = unpack_ids(record["about"])
    kinds, xs, shares = list(record["kind"]), list(record["x"]), list(record["share"])
    if not len(about) == len(kinds) == len(xs) == len(shares):
        raise SecureAggregationError("a reveal's columns differ in length")
    return {v: (str(k), int(x), bytes(s)) for v, k, x, s in zip(about, kinds, xs, shares)}

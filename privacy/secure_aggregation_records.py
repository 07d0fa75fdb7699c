"""Secure aggregation's messages as plain dicts of the values a Flower ConfigRecord holds
(bytes, int, str, lists of them), for both ends: the coordinator relays only these, and a
site's reply guard lets out only these keys.

Node ids are uint64 and do not fit a ConfigRecord int (int64): a list of them travels as
one bytes value of big-endian 8-byte words.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, Any

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


def aggregation_context(run: str, server_round: int, nonce: bytes, terms: str = "") -> bytes:
    """What every signature of one aggregation is bound to: the run, the round, the
    coordinator's nonce for this attempt (a site refuses a context it has seen) and the
    noise terms of distributed DP (`noise_terms`)."""
    return hashlib.sha256(f"fedlora aggregation\n{run}\n{server_round}\n{terms}\n".encode() + nonce).digest()


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

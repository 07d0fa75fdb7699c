"""Secure aggregation (Bonawitz et al. 2017, with Bell et al. 2020's framing): the
coordinator learns the sum of the sites' quantized updates and nothing about any one.

This module is the protocol's core, as pure functions over plain data; the message
transport is the round loop's. One aggregation, among the sites of a roster:

1. **Advertise keys.** Each site makes two fresh X25519 key pairs, one to encrypt the
   shares it sends to others and one to agree masks, and signs both public keys with
   its node key (P-384 ECDSA) over the aggregation's context (run and round), so that
   the coordinator can neither substitute a key nor replay one from another round: a
   site verifies every signature, and accepts only node keys in its own trusted set
   (the consortium's site keys, from the site's files, never from the coordinator).
2. **Share keys.** Each site draws a self-mask seed and Shamir-shares it and its mask
   private key among all sites of the roster (`threshold` rebuild, fewer learn
   nothing); the share for site v is encrypted with AES-GCM under a key agreed with v.
3. **Masked input.** A site's quantized update plus its self-mask plus, for every
   other site v that shared keys, +PRG(s_uv) if u < v else -PRG(s_uv), where s_uv is
   the pairwise seed both derive. Pairwise masks cancel in the sum; the self-mask
   keeps a site's input hidden even if the coordinator later learns its pairwise seeds.
4. **Unmask.** The coordinator names the survivors (sites whose masked input arrived).
   Each survivor reveals, for every other site, exactly one share: of the self-mask
   seed for a survivor, of the mask private key for a site that dropped. With
   `threshold` such shares the coordinator removes the self-masks of the survivors
   and the pairwise masks that involve dropped sites, and is left with the sum.

Arithmetic is modulo 2^bits (`QuantizationSpec.modulus_bits`), sized so that the sum
of every site's largest weighted, quantized value cannot wrap. The masks come from a
cryptographic PRG (the ChaCha20 keystream), so a single masked vector is uniform.

Before revealing, the survivors run the consistency round of the malicious-server
protocol: each signs the survivor set it was told, together with the view it rests on
(roster, threshold, the sites whose masks are in the inputs), and reveals only when at
least `threshold` survivors signed that same statement. A coordinator that names a site
as a survivor to some sites and as dropped to others (to get both its seed and its mask
key) needs `threshold` signatures on each of two statements. Each honest site signs
one, and a colluding site signs both, so with c colluders that takes 2 * threshold <=
n + c: no site's two secrets can be rebuilt while c <= 2 * threshold - n - 1 (n the
roster). `threshold` must exceed half the roster (accept_roster), so it always holds
without collusion; a larger threshold buys collusion tolerance at the price of dropout
tolerance (n - threshold sites may drop). The sum itself is the other way in: the
coordinator subtracts the colluders' inputs from it, so a sum of s survivors hides an
honest site's input only while c <= s - 2. Each site sets its own floor on s (and on the
roster and the sharers), `min_sites`: with threshold 2, a roster of the site and one
colluder would otherwise give its input away (docs/privacy.md, "How many may collude").

Each step runs once per aggregation, in order (`MaskingSite.step`): a site never masks
two inputs with the same secrets, and masks only with at least `threshold` others.

Assumed, not enforced here: the coordinator relays every message (it can drop any,
which at worst fails the round), and at most min(2 * threshold - n - 1, max(threshold,
min_sites) - 2) sites collude with it.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from fedlora.privacy import shamir

SELF_SEED = "self-seed"
MASK_KEY = "mask-key"


class SecureAggregationError(RuntimeError):
    """An aggregation that cannot go on safely (too few sites, a bad message)."""


class ForgedKeyError(SecureAggregationError):
    """A key in the roster is not signed by the node key of the site it claims to be."""


# --- Quantization ------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizationSpec:
    """Fixed point for the secure sum: each value is clipped to [-clip, clip] and
    scaled to `levels` steps per `clip`; a site's input is its weight times that."""

    clip: float
    levels: int
    sites: int
    max_weight: int = 1

    @property
    def modulus_bits(self) -> int:
        """The smallest power-of-two modulus holding any sum of `sites` inputs, signed:
        2 * sites * max_weight * levels + 1 values must fit."""
        return max(8, math.ceil(math.log2(2 * self.sites * self.max_weight * self.levels + 1)))

    def check(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0) or self.levels < 1 or self.sites < 1 or self.max_weight < 1:
            raise SecureAggregationError(f"quantization needs clip > 0 and levels, sites, max_weight >= 1 (got {self})")
        if self.modulus_bits > 62:
            raise SecureAggregationError(f"{self.sites} sites x weight {self.max_weight} x {self.levels} levels "
                                         "need more than 62 bits: fewer levels or a smaller weight")


def quantize(values: np.ndarray, weight: int, spec: QuantizationSpec, rng: np.random.Generator) -> np.ndarray:
    """weight * round(clip(values) * levels / clip) with unbiased stochastic rounding, as
    residues modulo 2^bits (uint64)."""
    spec.check()
    if not 1 <= weight <= spec.max_weight:
        raise SecureAggregationError(f"a site's weight {weight} is outside 1..{spec.max_weight}")
    scaled = np.clip(np.asarray(values, dtype=np.float64), -spec.clip, spec.clip) * (spec.levels / spec.clip)
    low = np.floor(scaled)
    rounded = low + (rng.random(scaled.shape) < (scaled - low))
    return (rounded.astype(np.int64) * weight).astype(np.uint64) & _mask(spec.modulus_bits)


def dequantize(total: np.ndarray, weight_sum: int, spec: QuantizationSpec) -> np.ndarray:
    """The weighted mean from the modular sum of the sites' inputs."""
    bits = spec.modulus_bits
    signed = total.astype(np.int64)
    signed = np.where(signed >= 1 << (bits - 1), signed - (1 << bits), signed)
    return signed.astype(np.float64) * (spec.clip / spec.levels) / weight_sum


def _mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` uniform residues modulo 2^bits from the ChaCha20 keystream of `seed`
    (each seed is used once: it is fresh per pair, run and round)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = encryptor.update(b"\x00" * (8 * length))
    return np.frombuffer(stream, dtype=np.uint64) & _mask(bits)


# --- Keys ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertisedKeys:
    site: int  # the site's node id: routing only (identity is node_public)
    node_public: bytes  # the site's node key (DER SubjectPublicKeyInfo): who signed
    cipher_public: bytes  # X25519, raw 32 bytes: shares sent to this site are encrypted to it
    mask_public: bytes  # X25519, raw 32 bytes: pairwise masks are agreed with it
    signature: bytes  # by the node key over key_statement(...)


@dataclass
class MaskingSite:
    """One site's secrets for one aggregation (never sent, except as Shamir shares)."""

    site: int
    context: bytes
    cipher_private: X25519PrivateKey
    mask_private: X25519PrivateKey
    self_seed: bytes = field(default_factory=lambda: os.urandom(shamir.SECRET_BYTES))
    roster: dict[int, AdvertisedKeys] = field(default_factory=dict)
    sharers: frozenset[int] = frozenset()  # the sites that shared keys (whose masks are in this input)
    own_seed_share: bytes = b""  # this site's own Shamir share of its self-mask seed
    signed_survivors: frozenset[int] | None = None  # the one survivor set this site signed
    threshold: int = 0  # agreed with the roster
    # Distributed DP: fewer survivors than this carry less noise than this site's share
    # assumed (privacy/distributed_dp.py), so it reveals nothing to them.
    min_survivors: int = 0
    # The site's own floor (policy `min-sites`) on the roster, the sharers and the survivors:
    # the threshold is the coordinator's choice, and a sum of this site and colluders alone
    # is this site's input once the colluders' inputs are subtracted.
    min_sites: int = 0
    # Each step once, in order: a second masked input from the same secrets would give
    # the coordinator the difference of two of this site's inputs, with no reveal at all.
    step: str = "advertised"


def _advance(state: MaskingSite, expected: str, after: str) -> None:
    if state.step != expected:
        raise SecureAggregationError(f"a {after} step after '{state.step}': each step runs once, in order")
    state.step = after


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def node_key_bytes(public: ec.EllipticCurvePublicKey) -> bytes:
    """How a node key is named in a roster and in a trusted set."""
    return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def key_statement(context: bytes, site: int, node_public: bytes, cipher_public: bytes, mask_public: bytes) -> bytes:
    parts = [context, struct.pack(">Q", site), node_public, cipher_public, mask_public]
    return b"fedlora secure aggregation keys/1\n" + b"".join(struct.pack(">Q", len(x)) + x for x in parts)


def advertise(site: int, context: bytes, node_key: ec.EllipticCurvePrivateKey) -> tuple[MaskingSite, AdvertisedKeys]:
    """Step 1 at a site: fresh keys, signed by the site's node key."""
    state = MaskingSite(site, context, X25519PrivateKey.generate(), X25519PrivateKey.generate())
    node_public = node_key_bytes(node_key.public_key())
    cipher_public, mask_public = _raw(state.cipher_private.public_key()), _raw(state.mask_private.public_key())
    statement = key_statement(context, site, node_public, cipher_public, mask_public)
    return state, AdvertisedKeys(site, node_public, cipher_public, mask_public, node_key.sign(statement, ec.ECDSA(hashes.SHA384())))


def signed_by_trusted(keys: AdvertisedKeys, context: bytes, trusted: set[bytes]) -> bool:
    """The keys are signed, for this context, by a node key in `trusted` (the node keys
    of the sites this one federates with, from its own files, never from the coordinator)."""
    if keys.node_public not in trusted or len(keys.cipher_public) != 32 or len(keys.mask_public) != 32:
        return False
    try:
        public = load_der_public_key(keys.node_public)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        public.verify(keys.signature, key_statement(context, keys.site, keys.node_public, keys.cipher_public,
                                                    keys.mask_public), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def collect_keys(advertised: list[AdvertisedKeys], trusted: set[bytes], context: bytes) -> tuple[list[AdvertisedKeys], list[int]]:
    """Step 1 at the coordinator: the roster of correctly signed keys, and the sites
    excluded (a signature that does not verify, an untrusted node key, a site or node
    key that appears twice)."""
    roster, excluded, seen = [], [], set()
    for keys in advertised:
        if keys.site in seen or keys.node_public in seen or not signed_by_trusted(keys, context, trusted):
            excluded.append(keys.site)
        else:
            roster.append(keys)
            seen |= {keys.site, keys.node_public}
    return sorted(roster, key=lambda k: k.site), sorted(excluded)


def accept_roster(state: MaskingSite, roster: list[AdvertisedKeys], trusted: set[bytes], threshold: int) -> None:
    """Step 1 at a site: every key the coordinator relays must be signed by a node key
    the site trusts, no site or node key may appear twice, and the site's own keys must
    be in it unchanged."""
    _advance(state, "advertised", "roster")
    by_site = {k.site: k for k in roster}
    if len(by_site) != len(roster) or len({k.node_public for k in roster}) != len(roster):
        raise ForgedKeyError("the roster names a site or a node key twice")
    for keys in roster:
        if not signed_by_trusted(keys, state.context, trusted):
            raise ForgedKeyError(f"the keys relayed for site {keys.site} are not signed by a node key this site trusts")
    own = by_site.get(state.site)
    if own is None or (own.cipher_public, own.mask_public) != (_raw(state.cipher_private.public_key()),
                                                                _raw(state.mask_private.public_key())):
        raise ForgedKeyError("the roster does not hold this site's own keys")
    if threshold < 2:
        raise SecureAggregationError(f"threshold {threshold}: below 2 a single site's input could be unmasked alone")
    if len(roster) < threshold:
        raise SecureAggregationError(f"{len(roster)} sites in the roster, fewer than the threshold {threshold}")
    if 2 * threshold <= len(roster):
        raise SecureAggregationError(f"threshold {threshold} of {len(roster)} sites: it must exceed half the roster, "
                                     "or a coordinator could split the sites over two survivor sets")
    _check_floor(state, len(roster), "in the roster")
    state.roster = by_site
    state.threshold = threshold


def _check_floor(state: MaskingSite, sites: int, where: str) -> None:
    if sites < state.min_sites:
        raise SecureAggregationError(f"{sites} sites {where}, fewer than this site's min-sites {state.min_sites}")


def _agreed(private: X25519PrivateKey, public: bytes, purpose: bytes, context: bytes, u: int, v: int) -> bytes:
    low, high = sorted((u, v))
    info = b"fedlora secure aggregation/1 " + purpose + b"\n" + context + struct.pack(">QQ", low, high)
    secret = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def share_index(roster: dict[int, AdvertisedKeys], site: int) -> int:
    """A site's Shamir x: its position in the sorted roster, from 1."""
    return sorted(roster).index(site) + 1


# --- Shares ------------------------------------------------------------------------------


def share_keys(state: MaskingSite) -> dict[int, bytes]:
    """Step 2 at a site: for every other site, its shares of this site's self-mask seed
    and mask private key, encrypted to it (nonce || AES-GCM ciphertext), rebuilt by
    the threshold agreed with the roster."""
    _advance(state, "roster", "shared")
    threshold = state.threshold
    mask_private = state.mask_private.private_bytes_raw()
    seed_shares = dict(shamir.split(state.self_seed, len(state.roster), threshold))
    key_shares = dict(shamir.split(mask_private, len(state.roster), threshold))
    state.own_seed_share = seed_shares[share_index(state.roster, state.site)]
    out = {}
    for v, keys in state.roster.items():
        if v == state.site:
            continue
        x = share_index(state.roster, v)
        key = _agreed(state.cipher_private, keys.cipher_public, b"shares", state.context, state.site, v)
        nonce = os.urandom(12)
        plain = struct.pack(">Q", x) + seed_shares[x] + key_shares[x]
        out[v] = nonce + AESGCM(key).encrypt(nonce, plain, _share_aad(state.context, state.site, v))
    return out


def _share_aad(context: bytes, sender: int, receiver: int) -> bytes:
    return b"fedlora shares\n" + context + struct.pack(">QQ", sender, receiver)


def _open_share(state: MaskingSite, sender: int, blob: bytes) -> tuple[int, bytes, bytes]:
    key = _agreed(state.cipher_private, state.roster[sender].cipher_public, b"shares", state.context, sender, state.site)
    try:
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], _share_aad(state.context, sender, state.site))
    except InvalidTag:
        raise SecureAggregationError(f"the shares from site {sender} do not decrypt (altered in transit?)") from None
    (x,) = struct.unpack(">Q", plain[:8])
    if x != share_index(state.roster, state.site):
        raise SecureAggregationError(f"the shares from site {sender} are not addressed to this site")
    n = shamir.SHARE_BYTES
    return x, plain[8:8 + n], plain[8 + n:8 + 2 * n]


# --- Masked input ------------------------------------------------------------------------


def pairwise_seed(private: X25519PrivateKey, public: bytes, context: bytes, u: int, v: int) -> bytes:
    return _agreed(private, public, b"mask", context, u, v)


def check_can_mask(state: MaskingSite, sharers: set[int]) -> None:
    """Step 3's checks, which a site runs before it trains too: keys were shared and no
    input was masked yet, and the sharers are at least `threshold` sites of the roster."""
    if state.step != "shared":
        raise SecureAggregationError(f"a masked input after '{state.step}': each step runs once, in order")
    if state.site not in sharers or not sharers <= set(state.roster):
        raise SecureAggregationError("the sites named as having shared keys are not in the roster")
    if len(sharers) < state.threshold:
        # Fewer pairwise masks than the threshold: the coordinator could rebuild this
        # site's self-mask from the others' shares and read its input.
        raise SecureAggregationError(f"{len(sharers)} sites named as having shared keys, fewer than the threshold {state.threshold}")
    _check_floor(state, len(sharers), "named as having shared keys")


def masked_input(state: MaskingSite, quantized: np.ndarray, sharers: set[int], bits: int) -> np.ndarray:
    """Step 3 at a site: its quantized input plus its self-mask and the pairwise masks
    with every other site that shared keys (`sharers`, from the coordinator)."""
    check_can_mask(state, sharers)
    _advance(state, "shared", "masked")
    state.sharers = frozenset(sharers)
    length = quantized.shape[0]
    y = quantized.astype(np.uint64) + prg(state.self_seed, length, bits)
    for v in sorted(sharers - {state.site}):
        mask = prg(pairwise_seed(state.mask_private, state.roster[v].mask_public, state.context, state.site, v), length, bits)
        y = y + mask if state.site < v else y - mask
    return y & _mask(bits)


# --- Unmasking ----------------------------------------------------------------------------


def survivors_statement(state: MaskingSite, survivors: set[int] | frozenset[int]) -> bytes:
    """What survivors sign: the survivor set and the view it rests on (the roster with
    its keys, the threshold and the sites whose masks are in the inputs), so that
    signatures from sites told a different view do not count."""
    def ids(values) -> bytes:
        return struct.pack(">Q", len(values)) + b"".join(struct.pack(">Q", v) for v in sorted(values))

    # The roster's keys, not only its ids: a signature then vouches for the very keys the
    # signer checked (ids are the coordinator's routing labels).
    keys = b"".join(struct.pack(">QQ", v, len(k.node_public)) + k.node_public + k.cipher_public + k.mask_public
                    for v, k in sorted(state.roster.items()))
    return (b"fedlora secure aggregation survivors/3\n" + struct.pack(">Q", len(state.context)) + state.context
            + struct.pack(">Q", state.threshold) + ids(state.roster) + hashlib.sha256(keys).digest()
            + ids(state.sharers) + ids(survivors))


def sign_survivors(state: MaskingSite, survivors: set[int], node_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Consistency round at a site: sign the survivor set the coordinator named, once
    per aggregation (a second, different set is refused)."""
    if state.signed_survivors is not None and state.signed_survivors != frozenset(survivors):
        raise SecureAggregationError("the coordinator named a second, different survivor set")
    if state.site not in survivors or not survivors <= state.sharers:
        raise SecureAggregationError("the survivors named are not sites that shared keys")
    _check_floor(state, len(survivors), "named as survivors")
    if state.signed_survivors is None:
        _advance(state, "masked", "signed")
    state.signed_survivors = frozenset(survivors)
    return node_key.sign(survivors_statement(state, survivors), ec.ECDSA(hashes.SHA384()))


def _confirmed_by(state: MaskingSite, survivors: set[int], signatures: dict[int, bytes]) -> set[int]:
    statement, confirmed = survivors_statement(state, survivors), set()
    for u, signature in signatures.items():
        if u not in survivors:
            continue
        try:
            public = load_der_public_key(state.roster[u].node_public)
            public.verify(signature, statement, ec.ECDSA(hashes.SHA384()))  # type: ignore[union-attr]
        except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
            continue
        confirmed.add(u)
    return confirmed


def reveal(state: MaskingSite, received: dict[int, bytes], survivors: set[int],
           signatures: dict[int, bytes]) -> dict[int, tuple[str, int, bytes]]:
    """Step 4 at a site: for each site that shared keys, one share: of its self-mask seed
    if it survived, of its mask private key if it dropped. `received`: the encrypted
    shares the other sites sent this site in step 2; `signatures`: the survivors'
    signatures of the survivor set (the consistency round), at least `threshold` of
    them on the very set this site signed."""
    threshold = state.threshold
    if state.signed_survivors != frozenset(survivors):
        raise SecureAggregationError("this site did not sign this survivor set")
    if len(survivors) < threshold:
        raise SecureAggregationError(f"{len(survivors)} survivors, fewer than the threshold {threshold}: nothing is revealed")
    _check_floor(state, len(survivors), "named as survivors")
    if len(survivors) < state.min_survivors:
        raise SecureAggregationError(f"{len(survivors)} survivors, fewer than the {state.min_survivors} whose noise shares "
                                     "the distributed DP guarantee needs: nothing is revealed")
    if len(confirmed := _confirmed_by(state, survivors, signatures)) < threshold:
        raise SecureAggregationError(f"only {len(confirmed)} survivors signed this survivor set, fewer than the "
                                     f"threshold {threshold}: nothing is revealed")
    _advance(state, "signed", "revealed")
    out = {}
    for v in sorted(state.sharers - {state.site}):
        if v not in received:
            raise SecureAggregationError(f"no shares from site {v}, which the coordinator says shared keys")
        x, seed_share, key_share = _open_share(state, v, received[v])
        out[v] = (SELF_SEED, x, seed_share) if v in survivors else (MASK_KEY, x, key_share)
    # Its own share of its own seed too, so that `threshold` survivors are enough to rebuild every seed.
    out[state.site] = (SELF_SEED, share_index(state.roster, state.site), state.own_seed_share)
    return out


def unmask(roster: list[AdvertisedKeys], masked: dict[int, np.ndarray], revealed: dict[int, dict[int, tuple[str, int, bytes]]],
           sharers: set[int], threshold: int, bits: int, context: bytes) -> np.ndarray:
    """Step 4 at the coordinator: the sum of the survivors' inputs, modulo 2^bits.
    `masked`: the survivors' masked inputs; `revealed`: what each survivor revealed."""
    survivors = set(masked)
    if len(survivors) < threshold:
        raise SecureAggregationError(f"{len(survivors)} masked inputs, fewer than the threshold {threshold}")
    by_site = {k.site: k for k in roster}
    length = next(iter(masked.values())).shape[0]
    total = np.zeros(length, dtype=np.uint64)
    for y in masked.values():
        total = total + y
    for v in sorted(sharers):
        shares = [(x, share) for reveals in revealed.values() if v in reveals
                  for kind, x, share in [reveals[v]] if kind == (SELF_SEED if v in survivors else MASK_KEY)]
        if len(shares) < threshold:
            raise SecureAggregationError(f"{len(shares)} shares for site {v}, fewer than the threshold {threshold}")
        try:
            secret = shamir.combine(shares[:threshold])
            private = None if v in survivors else X25519PrivateKey.from_private_bytes(secret)
        except ValueError as exc:  # a bad share (a duplicate x, a value off the field)
            raise SecureAggregationError(f"the shares revealed for site {v} do not rebuild its secret: {exc}") from None
        if v in survivors:  # its self-mask
            total = total - prg(secret, length, bits)
        else:  # the pairwise masks the survivors added with it
            assert private is not None
            for u in sorted(survivors):
                mask = prg(pairwise_seed(private, by_site[u].mask_public, context, v, u), length, bits)
                total = total - mask if u < v else total + mask
    return total & _mask(bits)

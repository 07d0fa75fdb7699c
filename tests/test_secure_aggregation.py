"""Secure aggregation's core (privacy/secure_aggregation.py), run among in-process sites
with real keys: the coordinator gets exactly the sum, a dropped site is recovered,
one masked vector is uniform, and keys the coordinator forges are caught."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from scipy.stats import chisquare

from fedlora.privacy import shamir
from fedlora.privacy.secure_aggregation import (
    ForgedKeyError, QuantizationSpec, SecureAggregationError, accept_roster, advertise, collect_keys, dequantize,
    masked_input, node_key_bytes, quantize, reveal, share_keys, sign_survivors, unmask,
)

CONTEXT = b"run runs/study round 3"


def node_keys(sites: list[int]) -> tuple[dict[int, ec.EllipticCurvePrivateKey], set[bytes]]:
    """Each site's node key, and the set of their public keys every site trusts."""
    private = {s: ec.generate_private_key(ec.SECP384R1()) for s in sites}
    return private, {node_key_bytes(k.public_key()) for k in private.values()}


def run_aggregation(inputs: dict[int, np.ndarray], threshold: int, bits: int, drop_after_sharing: set[int] = frozenset()):
    """The four steps among `inputs`' sites; returns the coordinator's modular sum."""
    private, trusted = node_keys(sorted(inputs))
    states, advertised = {}, []
    for site in inputs:
        states[site], keys = advertise(site, CONTEXT, private[site])
        advertised.append(keys)
    roster, excluded = collect_keys(advertised, trusted, CONTEXT)
    assert excluded == []
    for state in states.values():
        accept_roster(state, roster, trusted, threshold)
    sent = {u: share_keys(state) for u, state in states.items()}
    sharers = set(sent)
    inbox = {v: {u: blobs[v] for u, blobs in sent.items() if v in blobs} for v in states}
    masked = {u: masked_input(states[u], inputs[u], sharers, bits) for u in states if u not in drop_after_sharing}
    survivors = set(masked)
    signatures = {u: sign_survivors(states[u], survivors, private[u]) for u in survivors}
    revealed = {u: reveal(states[u], inbox[u], survivors, signatures) for u in survivors}
    return unmask(roster, masked, revealed, sharers, threshold, bits, CONTEXT), masked


def test_shamir_rebuilds_from_threshold_shares_and_not_from_fewer():
    secret = bytes(range(32))
    shares = shamir.split(secret, 5, 3)
    assert shamir.combine(shares[:3]) == secret and shamir.combine(shares[2:]) == secret
    assert shamir.combine([shares[0], shares[4], shares[2]]) == secret
    try:
        assert shamir.combine(shares[:2]) != secret
    except shamir.ShamirError:
        pass


def test_the_secure_sum_is_the_weighted_sum_within_the_quantization_error():
    rng = np.random.default_rng(0)
    spec = QuantizationSpec(clip=0.5, levels=2**12, sites=5, max_weight=4)
    values = {site: rng.normal(0.0, 0.2, size=1000) for site in (11, 22, 33, 44, 55)}
    weights = {11: 1, 22: 4, 33: 2, 44: 3, 55: 1}
    quantized = {s: quantize(values[s], weights[s], spec, rng) for s in values}
    total, _ = run_aggregation(quantized, threshold=3, bits=spec.modulus_bits)

    # Exactly the modular sum of the inputs: the masks cancel to the last bit.
    expected = np.zeros(1000, dtype=np.uint64)
    for q in quantized.values():
        expected = (expected + q) & np.uint64((1 << spec.modulus_bits) - 1)
    assert np.array_equal(total, expected)
    # And the weighted mean of the clipped values, within one quantization step.
    mean = dequantize(total, sum(weights.values()), spec)
    plain = sum(weights[s] * np.clip(values[s], -spec.clip, spec.clip) for s in values) / sum(weights.values())
    assert np.max(np.abs(mean - plain)) <= spec.clip / spec.levels + 1e-12
    assert np.max(np.abs(plain)) > 0.3  # not a trivially small signal


def test_a_site_that_drops_after_masking_is_recovered():
    rng = np.random.default_rng(1)
    spec = QuantizationSpec(clip=1.0, levels=2**10, sites=5)
    quantized = {s: quantize(rng.uniform(-1, 1, 300), 1, spec, rng) for s in (1, 2, 3, 4, 5)}
    total, masked = run_aggregation(quantized, threshold=3, bits=spec.modulus_bits, drop_after_sharing={2, 4})
    assert set(masked) == {1, 3, 5}
    expected = (quantized[1] + quantized[3] + quantized[5]) & np.uint64((1 << spec.modulus_bits) - 1)
    assert np.array_equal(total, expected)


def test_below_the_threshold_nothing_is_revealed():
    spec = QuantizationSpec(clip=1.0, levels=16, sites=4)
    quantized = {s: np.zeros(10, dtype=np.uint64) for s in (1, 2, 3, 4)}
    with pytest.raises(SecureAggregationError, match="fewer than the threshold 3"):
        run_aggregation(quantized, threshold=3, bits=spec.modulus_bits, drop_after_sharing={2, 3})


def test_one_masked_vector_is_uniform_over_its_residues():
    """What the coordinator receives from one site, for an input of all zeros: a
    chi-square test over 64 bins of the residues accepts uniformity, and rejects the
    same test's unmasked input (so the test can tell)."""
    bits, length = 20, 64_000
    quantized = {s: np.zeros(length, dtype=np.uint64) for s in (1, 2, 3)}
    _, masked = run_aggregation(quantized, threshold=2, bits=bits)
    bins = np.bincount((masked[1] >> np.uint64(bits - 6)).astype(np.int64), minlength=64)
    assert chisquare(bins).pvalue > 1e-6
    unmasked = np.bincount((quantized[1] >> np.uint64(bits - 6)).astype(np.int64), minlength=64)
    assert chisquare(unmasked).pvalue < 1e-6


def test_a_site_whose_signature_does_not_verify_is_excluded():
    private, trusted = node_keys([1, 2, 3, 4])
    advertised = [advertise(s, CONTEXT, private[s])[1] for s in (1, 2, 3, 4)]
    # Site 3 names a trusted node key but its signature is by another key.
    impostor = ec.generate_private_key(ec.SECP384R1())
    forged = advertise(3, CONTEXT, impostor)[1]
    advertised[2] = replace(forged, node_public=advertised[2].node_public)
    roster, excluded = collect_keys(advertised, trusted, CONTEXT)
    assert excluded == [3] and [k.site for k in roster] == [1, 2, 4]
    # A node key nobody trusts, and a site that advertises twice, are excluded too.
    stranger = advertise(9, CONTEXT, impostor)[1]
    roster, excluded = collect_keys([*advertised[:2], stranger, advertised[1]], trusted, CONTEXT)
    assert excluded == [2, 9] and [k.site for k in roster] == [1, 2]


@pytest.mark.parametrize("forgery", ["substituted key", "replayed from another round", "own key replaced", "coordinator's own node key"])
def test_a_coordinator_that_relays_a_forged_key_is_detected(forgery):
    private, trusted = node_keys([1, 2, 3])
    states, advertised = {}, {}
    for s in (1, 2, 3):
        states[s], advertised[s] = advertise(s, CONTEXT, private[s])
    roster = dict(advertised)
    if forgery == "substituted key":  # the coordinator's own mask key in site 3's place, with 3's signature
        _, mine = advertise(3, CONTEXT, ec.generate_private_key(ec.SECP384R1()))
        roster[3] = replace(advertised[3], mask_public=mine.mask_public)
    elif forgery == "replayed from another round":  # site 3's genuine keys from an earlier round
        _, roster[3] = advertise(3, b"run runs/study round 2", private[3])
    elif forgery == "own key replaced":  # a key signed by site 1, but not the one site 1 made for this aggregation
        _, roster[1] = advertise(1, CONTEXT, private[1])
    else:  # the coordinator takes site 3's place with a node key of its own, correctly signed
        _, roster[3] = advertise(3, CONTEXT, ec.generate_private_key(ec.SECP384R1()))
    victims = [s for s in (1, 2, 3)] if forgery != "own key replaced" else [1]
    for s in victims:
        with pytest.raises(ForgedKeyError):
            accept_roster(states[s], list(roster.values()), trusted, threshold=2)


def test_altered_shares_are_refused():
    private, trusted = node_keys([1, 2, 3])
    states, advertised = {}, []
    for s in (1, 2, 3):
        states[s], keys = advertise(s, CONTEXT, private[s])
        advertised.append(keys)
    for state in states.values():
        accept_roster(state, advertised, trusted, threshold=2)
    blobs = {u: share_keys(states[u]) for u in states}
    for u in states:
        masked_input(states[u], np.zeros(4, dtype=np.uint64), {1, 2, 3}, 16)
    signatures = {u: sign_survivors(states[u], {1, 2, 3}, private[u]) for u in states}
    tampered = bytearray(blobs[2][1])
    tampered[-1] ^= 1
    with pytest.raises(SecureAggregationError, match="do not decrypt"):
        reveal(states[1], {2: bytes(tampered), 3: blobs[3][1]}, {1, 2, 3}, signatures)


def test_the_modulus_holds_the_largest_sum():
    spec = QuantizationSpec(clip=1.0, levels=2**16, sites=50, max_weight=16)
    largest = spec.sites * spec.max_weight * spec.levels
    assert 2 * largest + 1 <= 2**spec.modulus_bits
    rng = np.random.default_rng(2)
    quantized = [quantize(np.full(3, 5.0), spec.max_weight, spec, rng) for _ in range(spec.sites)]  # clipped to +clip
    total = np.zeros(3, dtype=np.uint64)
    for q in quantized:
        total = (total + q) & np.uint64((1 << spec.modulus_bits) - 1)
    assert np.allclose(dequantize(total, spec.sites * spec.max_weight, spec), 1.0)
    assert np.allclose(dequantize((-total) & np.uint64((1 << spec.modulus_bits) - 1), spec.sites * spec.max_weight, spec), -1.0)
    with pytest.raises(SecureAggregationError, match="more than 62 bits"):
        QuantizationSpec(clip=1.0, levels=2**50, sites=1000, max_weight=1000).check()


def test_a_coordinator_naming_two_survivor_sets_gets_no_shares():
    """The coordinator tells sites 1 and 2 that site 5 dropped (to get shares of its mask
    key) and sites 3 and 4 that it survived (to get shares of its seed): neither set
    has `threshold` signatures, so no site reveals anything."""
    private, trusted = node_keys([1, 2, 3, 4, 5])
    states, advertised = {}, []
    for s in (1, 2, 3, 4, 5):
        states[s], keys = advertise(s, CONTEXT, private[s])
        advertised.append(keys)
    for state in states.values():
        accept_roster(state, advertised, trusted, threshold=3)
    sent = {u: share_keys(states[u]) for u in states}
    inbox = {v: {u: blobs[v] for u, blobs in sent.items() if v in blobs} for v in states}
    for u in states:
        masked_input(states[u], np.zeros(8, dtype=np.uint64), {1, 2, 3, 4, 5}, 16)
    told = {1: {1, 2, 3, 4}, 2: {1, 2, 3, 4}, 3: {1, 2, 3, 4, 5}, 4: {1, 2, 3, 4, 5}, 5: {1, 2, 3, 4, 5}}
    signatures = {u: sign_survivors(states[u], told[u], private[u]) for u in (1, 2, 3, 4)}  # site 5 "is" dropped to 1, 2
    for u in (1, 2):
        with pytest.raises(SecureAggregationError, match="only 2 survivors signed"):
            reveal(states[u], inbox[u], told[u], {v: signatures[v] for v in (1, 2)})
        with pytest.raises(SecureAggregationError, match="only 2 survivors signed"):  # the other set's signatures do not count
            reveal(states[u], inbox[u], told[u], signatures)
    for u in (3, 4):
        with pytest.raises(SecureAggregationError, match="only 2 survivors signed"):
            reveal(states[u], inbox[u], told[u], {v: signatures[v] for v in (3, 4)})
    with pytest.raises(SecureAggregationError, match="second, different survivor set"):
        sign_survivors(states[1], {1, 2, 3, 4, 5}, private[1])  # a site signs one set only
    fresh, keys = advertise(1, CONTEXT, private[1])
    with pytest.raises(SecureAggregationError, match="must exceed half"):  # 2 of 5: two sets of 2 signatures each
        accept_roster(fresh, [keys, *advertised[1:]], trusted, threshold=2)


def started(sites: list[int], threshold: int):
    """Sites that advertised keys and accepted the roster: (states, private keys, roster, trusted)."""
    private, trusted = node_keys(sites)
    states, advertised = {}, []
    for s in sites:
        states[s], keys = advertise(s, CONTEXT, private[s])
        advertised.append(keys)
    for state in states.values():
        accept_roster(state, advertised, trusted, threshold)
    return states, private, advertised, trusted


def test_a_site_masks_only_with_at_least_threshold_sharers():
    """A coordinator telling a site that nobody else shared keys would get its input
    masked by its self-mask alone, which the others' shares rebuild."""
    states, _, _, _ = started([1, 2, 3], threshold=2)
    share_keys(states[1])
    with pytest.raises(SecureAggregationError, match="fewer than the threshold"):
        masked_input(states[1], np.zeros(4, dtype=np.uint64), {1}, 16)


def test_a_threshold_below_two_is_refused():
    private, trusted = node_keys([1])
    state, keys = advertise(1, CONTEXT, private[1])
    with pytest.raises(SecureAggregationError, match="below 2"):
        accept_roster(state, [keys], trusted, threshold=1)


def test_each_step_runs_once_and_in_order():
    """Two masked inputs from the same secrets would differ by the site's input alone."""
    states, _, advertised, trusted = started([1, 2, 3], threshold=2)
    with pytest.raises(SecureAggregationError, match="each step runs once"):
        accept_roster(states[1], advertised, trusted, 2)  # a second roster (another threshold, other sites)
    with pytest.raises(SecureAggregationError, match="each step runs once"):
        masked_input(states[1], np.zeros(4, dtype=np.uint64), {1, 2, 3}, 16)  # masking before sharing
    share_keys(states[1])
    with pytest.raises(SecureAggregationError, match="each step runs once"):
        share_keys(states[1])
    masked_input(states[1], np.zeros(4, dtype=np.uint64), {1, 2, 3}, 16)
    with pytest.raises(SecureAggregationError, match="each step runs once"):
        masked_input(states[1], np.ones(4, dtype=np.uint64), {1, 2, 3}, 16)


def test_signatures_over_another_view_do_not_count():
    """Sites told different sharer sets sign different statements: a coordinator cannot
    gather threshold signatures by showing each site a view of its choosing."""
    states, private, _, _ = started([1, 2, 3], threshold=2)
    sent = {u: share_keys(states[u]) for u in states}
    inbox = {v: {u: blobs[v] for u, blobs in sent.items() if v in blobs} for v in states}
    masked_input(states[1], np.zeros(4, dtype=np.uint64), {1, 2}, 16)  # site 1 is told only 1 and 2 shared
    for u in (2, 3):
        masked_input(states[u], np.zeros(4, dtype=np.uint64), {1, 2, 3}, 16)
    signatures = {1: sign_survivors(states[1], {1, 2}, private[1]), 2: sign_survivors(states[2], {1, 2}, private[2])}
    with pytest.raises(SecureAggregationError, match="only 1 survivors signed"):
        reveal(states[2], inbox[2], {1, 2}, signatures)


def test_a_bad_revealed_share_fails_the_unmasking_not_the_coordinator():
    inputs = {s: np.arange(4, dtype=np.uint64) for s in (1, 2, 3)}
    private, trusted = node_keys([1, 2, 3])
    states, advertised = {}, []
    for s in inputs:
        states[s], keys = advertise(s, CONTEXT, private[s])
        advertised.append(keys)
    for state in states.values():
        accept_roster(state, advertised, trusted, 2)
    sent = {u: share_keys(states[u]) for u in states}
    inbox = {v: {u: blobs[v] for u, blobs in sent.items() if v in blobs} for v in states}
    masked = {u: masked_input(states[u], inputs[u], {1, 2, 3}, 16) for u in states}
    signatures = {u: sign_survivors(states[u], {1, 2, 3}, private[u]) for u in states}
    revealed = {u: reveal(states[u], inbox[u], {1, 2, 3}, signatures) for u in (1, 2)}
    revealed[2][3] = (revealed[2][3][0], revealed[1][3][1], revealed[1][3][2])  # a duplicate x
    with pytest.raises(SecureAggregationError, match="do not rebuild"):
        unmask(advertised, masked, revealed, {1, 2, 3}, 2, 16, CONTEXT)

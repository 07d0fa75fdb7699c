"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Secure aggregation shares two secrets per site (its self-mask seed and its masking
private key) so that any `threshold` of the other sites can rebuild one of them for
the coordinator when the site drops out, and fewer learn nothing. A share is
(x, y) with x in 1..n; the secret is the value at 0 of a random polynomial of degree
threshold - 1. The prime is a Mersenne prime larger than any 32-byte secret.
"""

from __future__ import annotations

import secrets

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # 521 bits


class ShamirError(ValueError):
    """Shares that cannot rebuild a secret."""


def split(secret: bytes, count: int, threshold: int) -> list[tuple[int, bytes]]:
    """`count` shares of `secret`, any `threshold` of which rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not 1 <= threshold <= count:
        raise ShamirError(f"threshold {threshold} must be between 1 and the number of shares {count}")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return shares


def combine(shares: list[tuple[int, bytes]]) -> bytes:
    """The secret from `threshold` or more shares (Lagrange interpolation at 0)."""
    points = {x: int.from_bytes(y, "big") for x, y in shares}
    if len(points) != len(shares) or not points or any(not 0 < x < PRIME for x in points):
        raise ShamirError("shares must have distinct, non-zero x")
    secret = 0
    for xi, yi in points.items():
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * -xj % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("the shares do not rebuild a secret (too few, or not from one split)")
    return secret.to_bytes(SECRET_BYTES, "big")

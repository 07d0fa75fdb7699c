"""Site node keys as both ends name them: a virtual site's derived key, and a public key
as an OpenSSH line with its SHA-256 fingerprint (the form `fedlora site-key` writes and
`ssh-keygen -l` prints), so that a signed record names its signer in a form a reader can
compare with the site's own `.pub` file.

A virtual site of a simulation derives its node key from the run seed and its partition
id; one machine holds every party there, so these keys show the mechanics (secure
aggregation, signed privacy statements) and protect nothing.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

P384_ORDER = int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16)
KEY_TYPE = "ecdsa-sha2-nistp384"


def virtual_node_key(seed: int, partition_id: int) -> ec.EllipticCurvePrivateKey:
    """The node key of virtual site `partition_id` in a simulation with run seed `seed`."""
    digest = hashlib.sha512(f"fedlora virtual site node key/{seed}/{partition_id}".encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (P384_ORDER - 1) + 1, ec.SECP384R1())


def public_key_line(public: ec.EllipticCurvePublicKey) -> str:
    """"ecdsa-sha2-nistp384 AAAA..." (no comment): the key as an OpenSSH public-key line."""
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def load_public_key_line(line: str) -> ec.EllipticCurvePublicKey:
    """The P-384 key of an OpenSSH public-key line (a comment after it is ignored);
    ValueError if it is not one."""
    try:
        public = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError, UnicodeError):
        raise ValueError("not an OpenSSH public key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP384R1):
        raise ValueError("not an EC P-384 key")
    return public


def canonical_key_line(line: str) -> str:
    """The line without its comment, re-encoded (ValueError if it is no P-384 key)."""
    return public_key_line(load_public_key_line(line))


def key_fingerprint(line: str) -> str:
    """"SHA256:..." of an OpenSSH public-key line, as `ssh-keygen -l -f KEY.pub` prints it."""
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

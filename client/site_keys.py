"""A site's node-authentication key pair, in the formats Flower expects: an OpenSSH
EC (NIST P-384) private key that stays at the site, and the public key the
coordinator's operator registers (`fedlora register-site KEY.pub`)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def create_site_key(out: Path, name: str) -> tuple[Path, Path]:
    """Write `out/name` (private, mode 600) and `out/name.pub`; never overwrites."""
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / name, out / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists; a site key is never overwritten")
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public

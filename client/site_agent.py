"""`fedlora client`: the agent on a site's on-prem node.

It checks the site's settings before anything connects (the data file reads, the
model folder loads, the state dir is writable, the key and certificate parse) and
then becomes a Flower SuperNode for the site, with TLS and node authentication.
The ClientApp reads the same settings from `context.node_config`, so a SuperNode
started directly with `flower-supernode --node-config '...'` works as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedlora.flower_env import flower_env, flower_executable


class SiteError(ValueError):
    """A site setting that cannot work, as one line naming the setting."""


@dataclass
class SiteSettings:
    superlink: str  # the coordinator's address, host:port
    data_path: Path
    state_dir: Path
    model_path: str = "default"
    max_epsilon: float | None = None
    lora_rank: int | None = None
    root_cert: Path | None = None  # the CA certificate that signed the coordinator's
    key: Path | None = None  # the site's node-authentication private key
    insecure: bool = False  # no TLS: only for a local trial, never across a network
    runtime_port: int = 9094  # this SuperNode's local API port (one per SuperNode on a machine)

    def node_config(self) -> str:
        """The `--node-config` string: what `context.node_config` holds in the ClientApp."""
        items = {"data-path": str(self.data_path), "model-path": self.model_path, "state-dir": str(self.state_dir)}
        parts = [f'{k}="{v}"' for k, v in items.items()]  # validate_site rejects what would break the quotes
        if self.max_epsilon is not None:
            parts.append(f"max-epsilon={float(self.max_epsilon)!r}")
        if self.lora_rank is not None:
            parts.append(f"lora-rank={int(self.lora_rank)}")
        return " ".join(parts)


def _check_data(path: Path) -> None:
    from fedlora.text_data import DataError, read_rows

    try:
        read_rows(path)
    except DataError as exc:
        raise SiteError(f"--data-path: {exc}") from None
    except OSError as exc:
        raise SiteError(f"--data-path {path}: not readable ({exc.strerror})") from None


def _check_model(model_path: str) -> None:
    """The folder resolves, its config and tokenizer load, and its weight files open."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from fedlora.base_model import ModelError, load_tokenizer, resolve_model_dir

    try:
        folder = resolve_model_dir(model_path)
        AutoConfig.from_pretrained(str(folder))
        load_tokenizer(folder)
    except ModelError as exc:
        raise SiteError(f"--model-path: {exc}") from None
    except (OSError, ValueError) as exc:
        raise SiteError(f"--model-path {model_path}: does not load ({str(exc).splitlines()[0]})") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not list(folder.glob("*.bin")):
        raise SiteError(f"--model-path {folder}: no weight files (*.safetensors or *.bin)")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own error types
            raise SiteError(f"--model-path {path}: weights do not open ({exc})") from None


def _check_state_dir(state_dir: Path) -> None:
    from privacy.site_ledger import LedgerError, SiteLedger

    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SiteError(f"--state-dir {state_dir}: not writable ({exc.strerror})") from None
    try:
        SiteLedger.load(state_dir)  # an existing ledger must be readable before the site joins
    except LedgerError as exc:
        raise SiteError(f"--state-dir: {exc}") from None


def _check_key(key: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        private = load_ssh_private_key(key.read_bytes(), None)
    except OSError as exc:
        raise SiteError(f"--key {key}: not readable ({exc.strerror})") from None
    except ValueError:
        raise SiteError(f"--key {key}: not an OpenSSH private key (create one with `fedlora site-key`)") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise SiteError(f"--key {key}: Flower node authentication needs an EC (NIST P-384) key")


def _check_root_cert(cert: Path) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise SiteError(f"--root-cert {cert}: not readable ({exc.strerror})") from None
    except ValueError:
        raise SiteError(f"--root-cert {cert}: not a PEM certificate") from None


def validate_site(site: SiteSettings) -> None:
    """Every check a site must pass before it connects; raises SiteError (one line)."""
    if not site.insecure and site.root_cert is None:
        raise SiteError("--root-cert is required: the coordinator is reached over TLS (--insecure only for a local trial)")
    for flag, value in (("--data-path", site.data_path), ("--model-path", site.model_path), ("--state-dir", site.state_dir)):
        if any(c in str(value) for c in '"\\\n'):
            # Flower's --node-config parser has no escapes for these.
            raise SiteError(f"{flag} {value}: a path with a double quote, backslash or newline cannot be passed to Flower; rename it")
    if site.max_epsilon is not None and not site.max_epsilon > 0:
        raise SiteError(f"--max-epsilon must be > 0, got {site.max_epsilon}")
    if site.lora_rank is not None and not site.lora_rank > 0:
        raise SiteError(f"--lora-rank must be > 0, got {site.lora_rank}")
    _check_data(site.data_path)
    _check_model(site.model_path)
    _check_state_dir(site.state_dir)
    if site.key is not None:
        _check_key(site.key)
    if site.root_cert is not None:
        _check_root_cert(site.root_cert)


def supernode_command(site: SiteSettings) -> list[str]:
    command = [flower_executable("flower-supernode"), "--superlink", site.superlink, "--node-config", site.node_config(),
               "--port", str(site.runtime_port)]
    if site.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(site.root_cert)]
    if site.key is not None:
        command += ["--auth-supernode-private-key", str(site.key)]
    return command


def run_site(site: SiteSettings) -> None:
    """Validate, then replace this process with the site's SuperNode (signals reach it directly)."""
    validate_site(site)
    command = supernode_command(site)
    print(f"[fedlora] site checked: data {site.data_path}, model {site.model_path}, state {site.state_dir}; "
          f"connecting to {site.superlink}", flush=True)
    os.execve(command[0], command, flower_env(flwr_home=site.state_dir / "flwr-home"))

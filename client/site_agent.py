"""`fedlora client`: the agent on a site's on-prem node.

It checks the site's settings before anything connects (the policy flags, the data
file reads and has the site's columns, the model folder loads, the state dir is
writable, the key and certificate parse) and then runs a Flower SuperNode for the
site, with TLS and node authentication, and the site's executor, as one process tree
that stops as a whole. The site's policy travels as node
config: the ClientApp reads it from `context.node_config`, so a SuperNode started
directly with `flower-supernode --node-config '...'` gets the same policy (but not
app pinning, which needs the site's executor below).

App pinning: the SuperNode runs with `--isolation process` and a SuperExec auth
secret, and the site's own executor (client/site_executor.py, started here) runs
each ClientApp task only if the run's app bundle hashes to an approved value: the
installed fedlora release, plus `--allow-app` / `--allow-apps`.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.client.coordinator_watch import EXIT_UNREACHABLE, CoordinatorUnreachable, CoordinatorWatch
from fedlora.client.site_rejoin import (
    FLOWER_HOLD_SECONDS, REFUSAL_LINE, RETRY_SECONDS, STOPPED_BY_SIGNAL, AliveMarker, refused_by_coordinator,
)
from fedlora.flower_env import flower_env, flower_executable
from fedlora.process_tree import supervise
from fedlora.site_policy_keys import SITE_POLICY

PRIVACY_UNITS = ("example", "user")


class SiteError(ValueError):
    """A site setting that cannot work, as one line naming the setting."""


@dataclass
class SiteSettings:
    superlink: str  # the coordinator's address, host:port
    data_path: Path
    state_dir: Path
    model_path: str = "default"
    max_epsilon: float | None = None  # required unless no_privacy_limit
    no_privacy_limit: bool = False  # the site chose explicitly to have no epsilon limit
    lora_rank: int | None = None
    root_cert: Path | None = None  # the CA certificate that signed the coordinator's
    key: Path | None = None  # the site's node-authentication private key
    insecure: bool = False  # no TLS: only for a local trial, never across a network
    runtime_port: int = 9094  # this SuperNode's local API port (one per SuperNode on a machine)
    # The site's policy (node config keys of the same names, with dashes).
    max_delta: float = 1e-5
    privacy_unit: str = "example"
    user_column: str = "user_id"
    allow_no_dp: bool = False
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    max_evaluations: int = 0  # per run; 0 = no cap
    calibrate_to_limit: bool = True
    max_noise_increase: float = 4.0  # decline rounds whose noise would exceed this many times the plan's; 0 = no cap
    # App pinning: approved app hashes beyond the installed release.
    allow_app: list[str] = field(default_factory=list)
    allow_apps_file: Path | None = None
    # Secure aggregation: the consortium's site public keys (OpenSSH lines), from the sites
    # themselves; without it the site declines secure aggregation. Signs with `key`.
    peer_keys: Path | None = None
    require_secure_aggregation: bool = False  # decline runs without it
    allow_distributed_dp: bool = False  # take part in privacy.mode = "distributed"
    min_distributed_tolerance: int = 1  # ... only if the run tolerates at least this many dropped or colluding sites
    min_sites: int = 3  # secure aggregation: the smallest roster, sharer set and survivor set this site joins
    min_records: int = 0  # decline every run while the data holds fewer privacy units; 0 = no minimum
    labels: list[str] | None = None  # classification: the labels of the site's data, in class-id order
    give_up_after: float | None = None  # seconds without reaching the coordinator before the site stops; None: never

    def policy(self) -> dict[str, str | float | int | bool]:
        """The site policy as node config values, one per key of fedlora/site_policy_keys.py:
        every key present but max-epsilon (absent only under --no-privacy-limit) and labels
        (absent when not declared; node config values are scalars, so one string)."""
        values: dict[str, str | float | int | bool] = {}
        for p in SITE_POLICY:
            value = getattr(self, p.field)
            if value is None:
                continue
            values[p.key] = ",".join(value) if p.kind == "labels" else _AS_NODE_CONFIG[p.kind](value)
        return values

    def node_config(self) -> str:
        """The `--node-config` string: what `context.node_config` holds in the ClientApp.
        Flower reads each value as TOML: strings in double quotes (validate_site rejects
        what would break them), floats and ints as numbers, booleans as true/false."""
        items: dict[str, str | float | int | bool] = {
            "data-path": str(self.data_path), "model-path": self.model_path, "state-dir": str(self.state_dir)}
        items.update(self.policy())
        if self.lora_rank is not None:
            items["lora-rank"] = int(self.lora_rank)
        if self.key is not None:  # signs the site's trail heads, and secure aggregation's keys with peer-keys
            items["node-key"] = str(self.key)
        if self.peer_keys is not None and self.key is not None:
            items["peer-keys"] = str(self.peer_keys)
        return " ".join(f"{k}={_toml_value(v)}" for k, v in items.items())

    @property
    def superexec_secret_file(self) -> Path:
        """The secret the SuperNode checks before it hands a task to the site's executor."""
        return self.state_dir / "flwr-home" / "superexec-auth.secret"


_AS_NODE_CONFIG = {"float": float, "int": int, "bool": bool, "str": str}


def _toml_value(value: str | float | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # e.g. 10.0, 1e-05: TOML floats
    return f'"{value}"'


# Flower's --node-config parser has no escapes for these.
_UNQUOTABLE = '"\\\n\r'


def _check_data(path: Path, site: SiteSettings | None = None) -> None:
    """The file reads, and every row has the site's columns: text + label or text
    (classification or causal LM) or prompt + response (causal LM; the site does not
    know the task), and the user column under --privacy-unit user. Errors name rows
    and columns, never a value."""
    from fedlora.text_data import DataError, read_rows

    try:
        rows = read_rows(path)
    except DataError as exc:
        raise SiteError(f"--data-path: {exc}") from None
    except OSError as exc:
        raise SiteError(f"--data-path {path}: not readable ({exc.strerror})") from None
    if site is None:
        return
    text, prompt, response = site.text_column, site.prompt_column, site.response_column
    for number, row in enumerate(rows, 1):
        def has(column: str) -> bool:
            return row.get(column) is not None  # a short CSV row reads as None

        # The column names (a CSV file's header), never a value: which one is the text is then plain to see.
        columns = f"; the row has columns {', '.join(repr(c) for c in row if has(c))}"
        if not has(text) and not (has(prompt) and has(response)):
            if has(prompt) or has(response):
                missing = response if has(prompt) else prompt
                flag = "--response-column" if has(prompt) else "--prompt-column"
                raise SiteError(f"--data-path {path}: row {number} has no column '{missing}' ({flag}) and no column "
                                f"'{text}' (--text-column){columns}")
            raise SiteError(f"--data-path {path}: row {number} has no column '{text}' (--text-column) and no columns "
                            f"'{prompt}' and '{response}' (--prompt-column, --response-column){columns}")
        if site.labels is not None and has(site.label_column) and str(row[site.label_column]) not in site.labels:
            raise SiteError(f"--data-path {path}: row {number}: its '{site.label_column}' (--label-column) value is "
                            "not one of --labels")
        if site.privacy_unit == "user" and not has(site.user_column):
            raise SiteError(f"--data-path {path}: row {number} has no column '{site.user_column}' "
                            f"(--user-column, needed by --privacy-unit user){columns}")


def _check_model(model_path: str) -> None:
    """The folder resolves and its config, tokenizer and weight files parse (without importing
    torch: the site's task server loads the model itself, once per task)."""
    from fedlora.model_folder import ModelError, check_model_files, resolve_model_dir

    try:
        check_model_files(resolve_model_dir(model_path))
    except ModelError as exc:
        raise SiteError(f"--model-path: {exc}") from None


def _check_state_dir(state_dir: Path, key: Path | None) -> None:
    """A writable state dir whose ledger, if any, is intact and (with `key`, already checked)
    signed by this site's own key."""
    from fedlora.client.peer_keys import PeerKeyError, load_node_key
    from fedlora.privacy.site_ledger import LedgerError, SiteLedger
    from fedlora.privacy.trail_chain import TrailSigner

    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SiteError(f"--state-dir {state_dir}: not writable ({exc.strerror})") from None
    try:
        # An existing ledger must be readable, and its chain intact, before the site joins.
        ledger = SiteLedger.load(state_dir)
        ledger.signer = TrailSigner(load_node_key(key), pinned=True) if key is not None else None
        ledger.require_intact_trail()
    except PeerKeyError as exc:
        raise SiteError(f"--key: {exc}") from None
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


def _check_root_cert(cert: Path, superlink: str) -> None:
    """A readable CA certificate, valid today; and, when the coordinator is reachable
    now, the certificate it presents is signed by this CA for the address dialled (what
    the SuperNode would otherwise find out later, in a multi-line error)."""
    import datetime

    from cryptography import x509

    try:
        ca = x509.load_pem_x509_certificate(cert.read_bytes())
    except OSError as exc:
        raise SiteError(f"--root-cert {cert}: not readable ({exc.strerror})") from None
    except ValueError:
        raise SiteError(f"--root-cert {cert}: not a PEM certificate") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > ca.not_valid_after_utc:
        raise SiteError(f"--root-cert {cert}: expired on {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < ca.not_valid_before_utc:
        raise SiteError(f"--root-cert {cert}: not valid before {ca.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise SiteError(f"--root-cert {cert}: not a CA certificate (give the CA's certificate, ca.pem, not the coordinator's own)")
    _check_coordinator_tls(cert, superlink)


def _check_coordinator_tls(cert: Path, superlink: str) -> None:
    """A TLS handshake with the coordinator, verified against `cert`. Skipped when the
    coordinator does not answer now: the SuperNode keeps trying to reach it."""
    import socket
    import ssl

    host, _, port = superlink.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["http/1.1"])  # the SuperNode's (Flower 1.42 speaks HTTP/1.1 to the SuperLink)
    try:
        raw = socket.create_connection((host, int(port)), timeout=5)
    except (OSError, ValueError):
        return
    try:
        with context.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        raise SiteError(f"--root-cert {cert}: the coordinator at {superlink} presents a certificate this CA does not "
                        f"vouch for ({exc.verify_message}; a CA from another `fedlora certs` run, or an address the "
                        "certificate does not name?)") from None
    except (OSError, ssl.SSLError):
        return  # not a TLS server answering, or gone again: the SuperNode's own connection decides
    finally:
        raw.close()


def _check_policy(site: SiteSettings) -> None:
    if site.max_epsilon is None and not site.no_privacy_limit:
        raise SiteError("--max-epsilon EPS is required (this site's privacy limit over all runs); "
                        "give --no-privacy-limit to run without one")
    if site.max_epsilon is not None and site.no_privacy_limit:
        raise SiteError("give either --max-epsilon or --no-privacy-limit, not both")
    if site.max_epsilon is not None and not (site.max_epsilon > 0 and math.isfinite(site.max_epsilon)):
        raise SiteError(f"--max-epsilon must be > 0 and finite, got {site.max_epsilon}")
    if not 0 < site.max_delta < 1:
        raise SiteError(f"--max-delta must be in (0, 1), got {site.max_delta}")
    if site.privacy_unit not in PRIVACY_UNITS:
        raise SiteError(f"--privacy-unit must be one of {', '.join(PRIVACY_UNITS)}, got {site.privacy_unit!r}")
    if site.max_evaluations < 0:
        raise SiteError(f"--max-evaluations must be >= 0 (0 = no cap), got {site.max_evaluations}")
    if not (site.max_noise_increase == 0 or 1 <= site.max_noise_increase < math.inf):
        raise SiteError(f"--max-noise-increase must be >= 1 (0 = no cap), got {site.max_noise_increase}")
    if site.min_records < 0:
        raise SiteError(f"--min-records must be >= 0 (0 = no minimum), got {site.min_records}")
    if site.min_sites < 2:
        raise SiteError(f"--min-sites must be >= 2 (secure aggregation's smallest sum), got {site.min_sites}")
    for flag, name in (("--user-column", site.user_column), ("--text-column", site.text_column),
                       ("--label-column", site.label_column), ("--prompt-column", site.prompt_column),
                       ("--response-column", site.response_column)):
        if not name.strip():
            raise SiteError(f"{flag}: a column name cannot be empty")
        if any(c in name for c in _UNQUOTABLE):
            raise SiteError(f"{flag} {name!r}: a column name with a double quote, backslash or line break cannot be passed to Flower")
    if site.labels is not None:
        if not site.labels or any(not n or n != n.strip() or "," in n or any(c in n for c in _UNQUOTABLE) for n in site.labels) \
                or len(set(site.labels)) != len(site.labels):
            raise SiteError("--labels: distinct, non-empty label names separated by commas (no quotes, backslashes, "
                            "line breaks or surrounding spaces)")


def approved_apps(site: SiteSettings) -> list[str]:
    """The installed release's app hash, then --allow-app and --allow-apps hashes."""
    from fedlora.client.app_pinning import AppPinningError, approved_hashes

    try:
        return approved_hashes(site.allow_app, site.allow_apps_file)
    except AppPinningError as exc:
        raise SiteError(str(exc)) from None


def validate_site(site: SiteSettings) -> None:
    """Every check a site must pass before it connects; raises SiteError (one line)."""
    if not site.insecure and site.root_cert is None:
        raise SiteError("--root-cert is required: the coordinator is reached over TLS (--insecure only for a local trial)")
    for flag, value in (("--data-path", site.data_path), ("--model-path", site.model_path), ("--state-dir", site.state_dir)):
        if any(c in str(value) for c in _UNQUOTABLE):
            raise SiteError(f"{flag} {value}: a path with a double quote, backslash or line break cannot be passed to Flower; rename it")
    _check_policy(site)
    if site.lora_rank is not None and not site.lora_rank > 0:
        raise SiteError(f"--lora-rank must be > 0, got {site.lora_rank}")
    if site.give_up_after is not None and not 0 < site.give_up_after < math.inf:
        raise SiteError(f"--give-up-after must be a positive duration, got {site.give_up_after} s")
    _check_data(site.data_path, site)
    _check_model(site.model_path)
    if site.key is not None:
        _check_key(site.key)
    _check_state_dir(site.state_dir, site.key)
    if site.root_cert is not None:
        _check_root_cert(site.root_cert, site.superlink)
    if site.peer_keys is not None:
        _check_peer_keys(site)
    elif site.require_secure_aggregation:
        raise SiteError("--require-secure-aggregation needs --peer-keys: the site's trusted peers for secure aggregation")
    elif site.allow_distributed_dp:
        raise SiteError("--allow-distributed-dp needs --peer-keys: distributed DP runs under secure aggregation")


def _check_peer_keys(site: SiteSettings) -> None:
    """The file parses and holds this site's own public key (it signs with --key)."""
    from fedlora.client.peer_keys import PeerKeyError, load_node_key, load_peer_keys
    from fedlora.privacy.secure_aggregation import node_key_bytes

    if site.key is None:
        raise SiteError("--peer-keys needs --key: a site signs its secure-aggregation keys with its node key")
    if any(c in str(site.peer_keys) for c in _UNQUOTABLE):
        raise SiteError(f"--peer-keys {site.peer_keys}: a path with a double quote, backslash or line break cannot be passed to Flower")
    try:
        trusted = load_peer_keys(site.peer_keys)
        own = node_key_bytes(load_node_key(site.key).public_key())
    except PeerKeyError as exc:
        raise SiteError(f"--peer-keys: {exc}") from None
    if own not in trusted:
        raise SiteError(f"--peer-keys {site.peer_keys}: this site's own public key ({site.key}.pub) is not in it")


def supernode_command(site: SiteSettings) -> list[str]:
    """The SuperNode runs no ClientApp itself (`--isolation process`): the site's
    executor takes the tasks, proving it holds the secret."""
    command = [flower_executable("flower-supernode"), "--superlink", site.superlink, "--node-config", site.node_config(),
               "--port", str(site.runtime_port), "--isolation", "process",
               "--superexec-auth-secret-file", str(site.superexec_secret_file)]
    if site.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(site.root_cert)]
    if site.key is not None:
        command += ["--auth-supernode-private-key", str(site.key)]
    return command


def executor_command(site: SiteSettings, approved: list[str]) -> list[str]:
    """The site's executor (client/site_executor.py), isolated from the working
    directory and PYTHONPATH; it also exits on its own when this process is gone."""
    command = [sys.executable, "-I", "-m", "fedlora.client.site_executor", "--runtime-api-address",
               f"127.0.0.1:{site.runtime_port}", "--superexec-auth-secret-file", str(site.superexec_secret_file),
               "--state-dir", str(site.state_dir), "--parent-pid", str(os.getpid())]
    for app_hash in approved:
        command += ["--approved", app_hash]
    return command


def write_superexec_secret(path: Path) -> None:
    """A fresh secret per start, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))


def run_site(site: SiteSettings) -> int:
    """Validate, then run the site's executor and SuperNode until either exits or this
    process gets SIGTERM or SIGINT; the whole process tree goes down together
    (fedlora/process_tree.py). A site restarted right after a crash first waits until
    the coordinator releases it, and a site refused (code 2004) within the coordinator's
    hold on its own last connection tries again until the hold has lapsed
    (client/site_rejoin.py); a refusal otherwise is the key's. A site without its executor
    cannot run tasks, so the exit code is non-zero in every case: the first one's code
    (1 if it was 0), 128+N when stopped by signal N, or 4 when the coordinator stayed out
    of reach for --give-up-after (client/coordinator_watch.py)."""
    validate_site(site)
    approved = approved_apps(site)
    write_superexec_secret(site.superexec_secret_file)
    env = flower_env(flwr_home=site.state_dir / "flwr-home")
    print(f"[fedlora] site checked: data {site.data_path}, model {site.model_path}, state {site.state_dir}; "
          f"connecting to {site.superlink}", flush=True)
    print(f"[fedlora] approved apps: {', '.join(approved)} (the first is the installed fedlora release)", flush=True)
    if site.peer_keys is not None:
        from fedlora.client.peer_keys import load_peer_keys

        # Said once at start: a key missing from the file shows here, not as a refused round later.
        print(f"[fedlora] loaded {len(load_peer_keys(site.peer_keys))} peer keys from {site.peer_keys}", flush=True)
    if site.labels is None:
        print("[fedlora] note: no --labels: a classification run's data.labels is checked against the data on request, "
              "so a coordinator can learn whether this site holds a label outside a list it sends (docs/privacy.md)",
              flush=True)
    alive = AliveMarker(site.state_dir)
    last_left = alive.last_left()  # read before the SuperNode runs (it marks itself alive)
    alive.wait_for_release()
    watch = CoordinatorWatch(site.superlink, None if site.insecure else site.root_cert, site.give_up_after)
    watch.start()

    def while_running() -> None:
        alive.touch()
        watch()  # says once a minute that the coordinator is out of reach; raises past --give-up-after

    deadline: float | None = None
    try:
        while True:
            refused: list[str] = []

            def on_supernode_line(line: str) -> None:
                if refused_by_coordinator(line):
                    refused.append(line)

            # The SuperNode (index 1) gets one SIGTERM only, so that it sends Flower's deactivation
            # however the site is stopped (fedlora/process_tree.py, sigterm_once).
            code = supervise([executor_command(site, approved), supernode_command(site)], env=env,
                             while_running=while_running, sigterm_once=(1,), watch_output={1: on_supernode_line})
            if not refused or code in STOPPED_BY_SIGNAL:
                break
            alive.refused()
            first_refusal = deadline is None
            if first_refusal:
                deadline = alive.rejoin_deadline(last_left, now=time.time())
            if deadline is None or time.time() >= deadline:
                print(f"fedlora: {REFUSAL_LINE}", file=sys.stderr, flush=True)
                return code or 1
            if first_refusal:
                kind, at = last_left
                print(f"[fedlora] the coordinator refused this site (Flower's code 2004), and this site's previous "
                      f"connection ended {time.time() - at:.0f} s ago ({'a stop' if kind == 'stopped' else 'a crash'}): "
                      f"the coordinator may still hold it online (for up to {FLOWER_HOLD_SECONDS:.0f} s after its last heartbeat, "
                      f"unless it heard the site leave); trying again {RETRY_SECONDS:.0f} s after each refusal for up to "
                      f"{deadline - time.time():.0f} s", flush=True)
            else:
                print(f"[fedlora] still refused; trying again for up to {deadline - time.time():.0f} s more", flush=True)
            stopped = _pause(min(RETRY_SECONDS, deadline - time.time()))
            if stopped:
                return stopped
    except CoordinatorUnreachable as exc:
        # supervise stopped the SuperNode gracefully: it holds no place at a coordinator it cannot reach.
        alive.path.unlink(missing_ok=True)
        print(f"fedlora: {exc}", file=sys.stderr, flush=True)
        return EXIT_UNREACHABLE
    finally:
        watch.stop()
    alive.stopped(code)
    return code or 1


def _pause(seconds: float) -> int | None:
    """Sleep between tries, unless SIGTERM, SIGINT or SIGHUP comes: then 128 + N."""
    received: list[int] = []
    handled = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else [])
    for sig in handled:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    end = time.monotonic() + seconds
    while not received and time.monotonic() < end:
        time.sleep(0.2)
    return 128 + received[0] if received else None

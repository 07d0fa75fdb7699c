"""`fedlora coordinator` and the operator's commands that talk to it.

The coordinator is a Flower SuperLink with TLS, node authentication (only registered
site keys may join) and a persistent database, all under one state dir:

    STATE_DIR/superlink.db        nodes, runs, messages (survives restarts)
    STATE_DIR/flwr-home/          Flower's home: the connection the operator's
                                  commands (`fedlora run`, `register-site`) use
    STATE_DIR/superlink.log

Operator commands reach a SuperLink through a Flower connection named "fedlora":
from a coordinator state dir on this machine, or from an address and the CA
certificate (another machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedlora.flower_env import flower_env, flower_executable
from fedlora.process_tree import supervise

CONNECTION = "fedlora"


class CoordinatorError(RuntimeError):
    """A coordinator setting or operation that cannot work, as one line."""


@dataclass
class CoordinatorSettings:
    state_dir: Path
    certs: Path | None  # folder with ca.pem, server.pem, server.key (`fedlora certs`)
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 to serve other machines
    port: int = 9093
    insecure: bool = False  # no TLS and no node authentication: a local trial only


def write_connection(flwr_home: Path, address: str, root_cert: Path | None) -> Path:
    """Flower's config.toml with the connection "fedlora" (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    connection: dict = {"address": address}
    if root_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_cert.resolve())
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
    return path


def superlink_command(c: CoordinatorSettings) -> list[str]:
    command = [flower_executable("flower-superlink"), "--database", str(c.state_dir / "superlink.db"),
               "--host", c.host, "--port", str(c.port), "--disable-runtime-dependency-installation"]
    if c.insecure:
        return command + ["--insecure"]
    return command + ["--ssl-ca-certfile", str(c.certs / "ca.pem"), "--ssl-certfile", str(c.certs / "server.pem"),
                      "--ssl-keyfile", str(c.certs / "server.key"), "--enable-supernode-auth"]


def check_coordinator(c: CoordinatorSettings) -> None:
    if not c.insecure:
        if c.certs is None:
            raise CoordinatorError("--certs is required (a folder with ca.pem, server.pem, server.key; `fedlora certs` makes one)")
        for name in ("ca.pem", "server.pem", "server.key"):
            if not (c.certs / name).is_file():
                raise CoordinatorError(f"--certs {c.certs}: {name} not found (`fedlora certs --out {c.certs}` makes them)")
    try:
        c.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CoordinatorError(f"--state-dir {c.state_dir}: not writable ({exc.strerror})") from None


def run_coordinator(c: CoordinatorSettings) -> int:
    """Write the operator connection, then run the SuperLink in the state dir (the
    ServerApp's working directory) until it exits or this process gets SIGTERM or
    SIGINT; its whole process tree goes down with it (fedlora/process_tree.py). Exits
    the process with the SuperLink's code, or 128+N when stopped by signal N."""
    check_coordinator(c)
    address = f"{'127.0.0.1' if c.host in ('0.0.0.0', '::') else c.host}:{c.port}"
    flwr_home = c.state_dir / "flwr-home"
    write_connection(flwr_home, address, None if c.insecure else c.certs / "ca.pem")
    os.chdir(c.state_dir)
    command = superlink_command(c)
    print(f"[fedlora] coordinator: SuperLink on {c.host}:{c.port}, "
          f"{'INSECURE (no TLS, no node authentication)' if c.insecure else 'TLS and node authentication on'}, "
          f"state in {c.state_dir}", flush=True)
    return supervise([command], env=flower_env(flwr_home))


def connection_home(coordinator_dir: Path | None, superlink: str | None, root_cert: Path | None, insecure: bool) -> Path:
    """FLWR_HOME holding the connection to use: the coordinator's own, or a temporary
    one for an address and CA certificate."""
    if coordinator_dir is not None:
        home = coordinator_dir / "flwr-home"
        if not (home / "config.toml").is_file():
            raise CoordinatorError(f"--coordinator-dir {coordinator_dir}: no connection found (start `fedlora coordinator` there first)")
        return home
    if superlink is None:
        raise CoordinatorError("say which coordinator: --coordinator-dir DIR (this machine) or --superlink HOST:PORT --root-cert FILE")
    if root_cert is None and not insecure:
        raise CoordinatorError("--root-cert is required with --superlink (the CA certificate of the coordinator)")
    home = Path(tempfile.mkdtemp(prefix="fedlora-flwr-home-"))
    write_connection(home, superlink, root_cert)
    return home


def wait_until_listening(flwr_home: Path, timeout: float = 30.0) -> None:
    """A coordinator started a moment ago takes a few seconds to listen: wait for it
    (bounded), so that `fedlora coordinator ... &` followed by a command just works."""
    address = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"][CONNECTION]["address"]
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise CoordinatorError(f"coordinator {address}: not reachable within {timeout:.0f}s ({exc.strerror or exc})") from None
            time.sleep(0.5)


def flwr_cli(args: list[str], flwr_home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    wait_until_listening(flwr_home)
    return subprocess.run([flower_executable("flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout)


def register_site(flwr_home: Path, public_key: Path, name: str | None = None) -> int:
    """Register a site's public key; returns the node id it will have."""
    if not public_key.is_file():
        raise CoordinatorError(f"{public_key}: public key file not found")
    args = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    if name:
        args += ["--name", name]
    out = flwr_cli(args, flwr_home)
    result = _json_reply(out, f"register {public_key}")
    return int(result["node-id"])


def unregister_site(flwr_home: Path, node_id: int) -> None:
    out = flwr_cli(["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"], flwr_home)
    _json_reply(out, f"unregister node {node_id}")


def list_sites(flwr_home: Path) -> list[dict]:
    return _json_reply(flwr_cli(["supernode", "list", CONNECTION, "--format", "json"], flwr_home), "list sites")["nodes"]


def _json_reply(out: subprocess.CompletedProcess, what: str) -> dict:
    text = out.stdout.strip()
    start = text.find("{")
    try:
        result = json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        result = {}
    if out.returncode != 0 or not result.get("success", False):
        last_line = ((out.stderr.strip() or text).splitlines() or ["no output"])[-1]
        raise CoordinatorError(f"{what}: {result.get('error-message') or last_line}")
    return result

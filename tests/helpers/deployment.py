"""A real deployment on 127.0.0.1 driven through fedlora's own commands: certificates,
site keys, a coordinator and site processes (`Deployment`), and what drives and watches
such processes (start, kill, wait_for, metrics_rows)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlora.config import load_config, write_config
from fedlora.flower_env import flower_env, flower_executable
from tests.helpers.site_data import write_site_data

ROOT = Path(__file__).resolve().parents[2]
FEDLORA = [sys.executable, "-m", "fedlora.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """A process in its own session, so that it and its children can be killed together."""
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd, env=flower_env(),
                            start_new_session=True)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def fedlora(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDLORA, *args], cwd=ROOT, env=flower_env(), capture_output=True, text=True, timeout=timeout)


# Each `flwr supernode list` is a process of about 1.5 s of CPU: polled at wait_for's 0.5 s it
# would take a core from the sites it waits for.
SITE_LIST_POLL_SECONDS = 5.0


def online_sites(flwr_home: Path) -> list[dict]:
    """The sites the coordinator holds online (Flower's `flwr supernode list`)."""
    from fedlora.server.coordinator_service import list_sites

    return [n for n in list_sites(flwr_home) if n["status"] == "online"]


def wait_for_sites(flwr_home: Path, condition, timeout: float, what: str):
    """wait_for on the online sites: `condition(sites)` polled every SITE_LIST_POLL_SECONDS."""
    return wait_for(lambda: condition(online_sites(flwr_home)), timeout, what, interval=SITE_LIST_POLL_SECONDS)


def wait_for_site_logs(logs: list[Path], timeout: float, what: str, needle: str = "SuperNode ID:") -> None:
    """Wait until every site log says its SuperNode was activated (Flower prints its node id then):
    reading a file costs nothing, where each `flwr supernode list` is a process."""
    wait_for(lambda: all(log.exists() and needle in log.read_text() for log in logs), timeout, what)


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Deployment:
    """Certificates, site keys, data, a coordinator, and the site processes."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.port = free_port()
        self.state = root / "coordinator"
        self.processes: list[subprocess.Popen] = []
        self.commands: dict[str, list[str]] = {}  # each site's command, to restart it
        out = fedlora("certs", "--out", str(root / "certs"))
        assert out.returncode == 0, out.stderr
        self.coordinator = self.start_coordinator()

    def start_coordinator(self) -> subprocess.Popen:
        log = self.root / f"coordinator-{len(self.processes)}.log"
        proc = start([*FEDLORA, "coordinator", "--state-dir", str(self.state), "--certs", str(self.root / "certs"),
                      "--port", str(self.port)], log)
        self.processes.append(proc)
        wait_for(lambda: "Uvicorn running" in log.read_text(), 60, "the SuperLink to listen")
        return proc

    def site_key(self, name: str, register: bool = True) -> Path:
        out = fedlora("site-key", "--out", str(self.root / "keys"), "--name", name)
        assert out.returncode == 0, out.stderr
        if register:
            out = fedlora("register-site", str(self.root / "keys" / f"{name}.pub"), "--coordinator-dir", str(self.state))
            assert out.returncode == 0 and "node id" in out.stdout, out.stdout + out.stderr
        return self.root / "keys" / name

    def site(self, name: str, register: bool = True, model: Path | None = None, direct: bool = False,
             extra_args: tuple[str, ...] = (), key: Path | None = None) -> subprocess.Popen:
        """A site: `fedlora client` (or `flower-supernode --node-config ...` if direct);
        `key`: a key made (and registered) before, else a new one."""
        key = key or self.site_key(name, register)
        data = write_site_data(self.root / f"{name}.jsonl", rows=120)
        state, model = self.root / "sites" / name, model or self.model
        if direct:
            state.mkdir(parents=True)
            node_config = f'data-path="{data}" model-path="{model}" state-dir="{state}" labels="a,b,c" node-key="{key}"'
            command = [flower_executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--root-certificates",
                       str(self.root / "certs" / "ca.pem"), "--auth-supernode-private-key", str(key),
                       "--node-config", node_config, "--port", str(free_port())]
        else:
            command = [*FEDLORA, "client", "--coordinator", f"127.0.0.1:{self.port}", "--root-cert",
                       str(self.root / "certs" / "ca.pem"), "--key", str(key), "--data-path", str(data),
                       "--model-path", str(model), "--state-dir", str(state), "--port", str(free_port()), "--max-epsilon", "10",
                       "--labels", "a,b,c", *extra_args]
        self.commands[name] = command
        proc = start(command, self.root / f"site-{name}.log")
        self.processes.append(proc)
        return proc

    def restart(self, name: str) -> subprocess.Popen:
        """The site's same command again (its log goes to site-NAME-restart.log)."""
        proc = start(self.commands[name], self.root / f"site-{name}-restart.log")
        self.processes.append(proc)
        return proc

    def config(self, name: str, **overrides) -> Path:
        config = load_config(None, {
            "model.path": str(self.model), "data.labels": ["a", "b", "c"], "run.output_dir": str(self.root / "runs" / name),
            # A killed site is noticed by its missed heartbeats (about a minute), not by this timeout: it is
            # long enough that a busy machine (two deployments and a simulation at once) does not time sites out.
            "federation.rounds": 2, "federation.min_clients": 2, "federation.round_timeout": 180.0,
            "train.local_steps": 2, "train.batch_size": 16, "privacy.target_epsilon": 4.0, **overrides,
        })
        path = self.root / f"{name}.toml"
        write_config(config, path)
        return path

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                kill(proc, signal.SIGTERM)

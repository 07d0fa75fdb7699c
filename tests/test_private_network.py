"""The simulation engine runs in a private network namespace (fedlora/private_network.py,
simulations/engine_network.py): nothing it starts listens on the host's network, its
sockets exist inside, signals take the whole tree down, and where namespaces are
unavailable `fedlora simulate` refuses unless the network is allowed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from fedlora.config import load_config
from fedlora.private_network import TEST_UNAVAILABLE_ENV

# The default simulation.cpus_per_client (2) on this 2-core machine: one Ray worker, one import of
# torch and the model (tests/test_simulation.py's contract run keeps two workers).
SMALL = ["--clients", "2", "--set", "simulation.dataset_size=200", "--set", "train.local_steps=1",
         "--set", "train.batch_size=16"]
TCP_LISTEN, UDP_UNCONNECTED = "0A", "07"
LOOPBACK = ("0100007F:", "0000000000000000FFFF00000100007F:")


def fedlora(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlora.cli", *args]


def listening_inodes(net_dir: str) -> dict[int, str]:
    """inode -> 'tcp 127.0.0.1:port' for every listening TCP and unconnected UDP socket in
    the network namespace whose /proc/.../net folder is `net_dir`."""
    found = {}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(net_dir) / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == (TCP_LISTEN if table.startswith("tcp") else UDP_UNCONNECTED) and inode:
                found[inode] = f"{table} {local}"
    return found


def socket_inodes(pids: set[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except OSError:
            pass  # gone meanwhile
    return inodes


def net_namespace(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def in_namespace(ns: str) -> list[psutil.Process]:
    """Every process on this machine in network namespace `ns`."""
    procs = []
    for proc in psutil.process_iter():
        try:
            if net_namespace(proc.pid) == ns:
                procs.append(proc)
        except OSError:
            pass
    return procs


def wait_for_raylet(root: psutil.Process, proc: subprocess.Popen, timeout: float = 180) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for child in root.children(recursive=True):
            try:
                if child.name() == "raylet":
                    return child
            except psutil.Error:
                pass
        time.sleep(0.3)
    raise AssertionError(f"no raylet started (exit code {proc.poll()})")


# Quick: the mechanism alone, in a fresh single-threaded interpreter.

def test_entered_namespace_has_only_loopback_up_and_keeps_the_uid():
    script = textwrap.dedent("""
        import os, socket
        from fedlora import private_network
        uid = os.getuid()
        private_network.enter()
        server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
        socket.create_connection(server.getsockname()).close()  # lo is up
        print([n for _, n in socket.if_nameindex()], os.getuid() == uid, private_network.only_loopback(), server.getsockname()[1])
        input()  # hold the socket open while the test looks from outside
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        names, same_uid, only_lo, port = proc.stdout.readline().rsplit(" ", 3)
        assert names == "['lo']" and same_uid == "True" and only_lo == "True"
        assert net_namespace(proc.pid) != net_namespace("self")
        inside = listening_inodes(f"/proc/{proc.pid}/net")
        ours = socket_inodes({proc.pid}) & set(inside)
        assert [inside[i] for i in ours] == [f"tcp 0100007F:{int(port):04X}"]  # 127.0.0.1:port, inside
        assert not ours & set(listening_inodes("/proc/self/net"))  # and not on the host
    finally:
        proc.communicate("\n", timeout=10)
    assert proc.returncode == 0


def test_enter_refuses_a_threaded_process_rather_than_blame_the_kernel():
    script = ("import threading, time; threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
              "from fedlora import private_network\n"
              "try:\n    private_network.enter()\nexcept RuntimeError as e:\n    print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("refused: private_network.enter() needs a single-threaded process")


def test_the_probe_says_whether_a_process_here_can_be_isolated(monkeypatch):
    from fedlora.private_network import unavailable_reason

    assert unavailable_reason() is None  # this machine allows it (the slow tests below rely on it)
    monkeypatch.setenv(TEST_UNAVAILABLE_ENV, "1")
    assert unavailable_reason() == f"user namespaces are unavailable ({TEST_UNAVAILABLE_ENV}=1)"


def test_isolation_is_on_by_default_and_joins_no_cluster():
    config = load_config(None, {})
    assert config.simulation.isolate_network is True and config.simulation.ray_address == ""


def test_asking_for_the_network_leaves_this_process_where_it_is():
    from fedlora.simulations.engine_network import CLUSTER, OPEN, place_engine

    before = net_namespace("self")
    off = place_engine(load_config(None, {"simulation.isolate_network": False}))
    cluster = place_engine(load_config(None, {"simulation.ray_address": "10.0.0.5:6379"}))
    assert (off.mode, cluster.mode) == (OPEN, CLUSTER) and net_namespace("self") == before
    assert off.line == ("network isolation off (simulation.isolate_network = false): "
                        "the simulation engine listens on this machine's network")
    assert cluster.line == "network isolation off: joining the Ray cluster at 10.0.0.5:6379 (simulation.ray_address) needs the network"


def test_the_engine_child_gets_the_command_line_the_user_gave():
    from fedlora.cli import build_parser, simulate_argv

    parser = build_parser()
    # Every option of `simulate`: a new one must be passed on to the engine child too.
    assert set(vars(parser.parse_args(["simulate"]))) == {"command", "config", "clients", "rounds", "output", "set", "allow_network"}
    args = parser.parse_args(["simulate", "--config", "a b.toml", "--clients", "3", "--rounds", "2", "--output", "runs/x",
                              "--set", "train.lr=0.1", "--set", 'run.name="x y"', "--allow-network"])
    assert parser.parse_args(simulate_argv(args)) == args


def test_without_namespaces_simulate_refuses_in_one_line_with_exit_2(tmp_path):
    env = {**os.environ, TEST_UNAVAILABLE_ENV: "1"}
    proc = subprocess.run(fedlora("simulate", "--output", str(tmp_path / "run"), *SMALL), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fedlora: error: network isolation unavailable:")
    assert "--allow-network" in proc.stderr and not (tmp_path / "run").exists()


def test_without_namespaces_compare_refuses_before_any_run(tmp_path):
    env = {**os.environ, TEST_UNAVAILABLE_ENV: "1"}
    proc = subprocess.run(fedlora("compare", "--output", str(tmp_path / "cmp"), "--strategies", "fedavg"), env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "network isolation unavailable" in proc.stderr
    assert not (tmp_path / "cmp").exists()


# Slow: the real engine.

def run_until_raylet_then_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """Start `fedlora simulate`, check where its sockets are while it runs, send `sig`,
    and check that nothing of it is left."""
    proc = subprocess.Popen(fedlora("simulate", "--rounds", "50", "--output", str(tmp_path / "run"), *SMALL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        root = psutil.Process(proc.pid)
        raylet = wait_for_raylet(root, proc)
        ns = net_namespace(raylet.pid)
        assert ns != net_namespace("self")  # the supervisor stays in the host's network, the engine does not
        time.sleep(5)  # Ray's workers start and open their ports
        simulation = {p.pid for p in root.children(recursive=True)} | {p.pid for p in in_namespace(ns)} | {proc.pid}
        ours = socket_inodes(simulation)

        host = listening_inodes("/proc/self/net")
        assert not ours & set(host), [host[i] for i in ours & set(host)]

        # Inside, the engine listens: the check above is not passing on an engine with no sockets.
        inside = listening_inodes(f"/proc/{raylet.pid}/net")
        engine = ours & set(inside)
        assert len(engine) >= 3, inside  # at least GCS, raylet, object manager
        # Ray binds to loopback too there (127.0.0.1, or v4-mapped in tcp6): the only address it finds.
        assert all(inside[i].split()[1].startswith(LOOPBACK) for i in engine), [inside[i] for i in engine]
        names = {psutil.Process(pid).name() for pid in simulation if socket_inodes({pid}) & engine}
        assert {"gcs_server", "raylet"} <= names, names

        # As a terminal does: Ctrl-C reaches the whole foreground process group; SIGTERM only the command.
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig, output[-2000:]  # as a shell reports a command stopped by the signal
    deadline = time.monotonic() + 20
    while (left := in_namespace(ns)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [p.name() for p in left]


@pytest.mark.slow
@pytest.mark.ray
def test_simulate_listens_only_inside_its_namespace_and_ctrl_c_leaves_nothing(tmp_path):
    run_until_raylet_then_signal(tmp_path, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_to_simulate_leaves_nothing(tmp_path):
    run_until_raylet_then_signal(tmp_path, signal.SIGTERM)


# `--allow-network` where namespaces are unavailable runs in the heterogeneous-ranks engine run
# (tests/test_heterogeneous_ranks.py): one Ray cluster checks both.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_address_joins_that_cluster_with_isolation_off_and_aggregates_securely(tmp_path):
    """One engine run checks two things: `simulation.ray_address` joins a running cluster (no
    namespace of fedlora's), and secure aggregation on the engine's path (virtual sites with
    derived node keys, one round; its exchanges in process: tests/test_secure_rounds.py)."""
    import json

    from safetensors.torch import load_file

    ray = Path(sys.executable).parent / "ray"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    out = tmp_path / "run"
    try:
        subprocess.run([str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                        "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir],
                       check=True, capture_output=True, timeout=120)
        proc = subprocess.run(fedlora("simulate", "--clients", "3", "--rounds", "1", "--output", str(out),
                                      "--set", "simulation.dataset_size=300", "--set", "train.local_steps=1",
                                      "--set", "train.batch_size=16",
                                      "--set", "federation.secure_aggregation=true",
                                      "--set", f"simulation.ray_address=127.0.0.1:{port}"),
                              capture_output=True, text=True, timeout=600)
    finally:
        # Stop only this head's processes (`ray stop` would stop every Ray on the machine).
        for process in psutil.process_iter(["cmdline"]):
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                try:
                    process.kill()
                except psutil.Error:
                    pass
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fedlora: network isolation off: joining the Ray cluster at 127.0.0.1:{port}" in proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients_ok"] == 3 and rows[1]["failures"] == {}
    assert rows[1]["secure_aggregation"] is True and "Every trained round was aggregated under secure aggregation" in \
        (out / "report.html").read_text()
    # Each site sent one uint64 per trained value, plus its weight (and a small .npy header).
    values = sum(t.numel() for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())
    per_site = rows[1]["bytes_up"] / 3
    assert 8 * (values + 1) <= per_site <= 8 * (values + 1) + 256, (per_site, values)

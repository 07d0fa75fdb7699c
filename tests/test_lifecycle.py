"""`fedlora coordinator` and `fedlora client` take their whole process tree down on
SIGTERM and SIGINT (issue 13, "Lifecycle"): the signal goes to the fedlora command's
PID only, and afterwards no process that was ever seen below it is still running
(Flower's SuperExec runs in a session of its own, out of reach of a terminal's Ctrl-C).

- fedlora/process_tree.py on a toy tree: children, grandchildren and a double-forked
  orphan all go on SIGTERM; a child that ignores SIGTERM is killed after the grace
  period; when a command exits on its own the rest goes too and its code is kept.
- Real processes on 127.0.0.1 (slow): an insecure coordinator and a site, each stopped
  by SIGTERM in the middle of a run (a ServerApp below the coordinator's SuperExec, a
  ClientApp training below the site's executor), and by SIGINT when idle (the
  supervisor treats both signals alike, so the run is not repeated).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedlora.config import load_config, write_config
from fedlora.flower_env import flower_env
from tests.helpers.deployment import FEDLORA, ROOT, free_port, wait_for
from tests.helpers.site_data import write_site_data

STOP_BOUND = 30.0  # seconds from the signal until the top process has exited


def supervisor(commands: list[list[str]], grace: float) -> subprocess.Popen:
    code = f"import sys; from fedlora.process_tree import supervise; sys.exit(supervise({commands!r}, grace={grace}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True)


class Tree:
    """Every process ever seen below a top PID (psutil.Process objects, so that a
    reused PID is never mistaken for one of them)."""

    def __init__(self, top: subprocess.Popen):
        self.top, self.seen = top, {}

    def look(self) -> list[str]:
        try:
            for proc in psutil.Process(self.top.pid).children(recursive=True):
                try:
                    # The command line read again each time: a child seen between its fork
                    # and its exec still shows its parent's.
                    first = self.seen.get(proc.pid, (proc, ""))[0]
                    if first == proc:  # not a reused PID
                        self.seen[proc.pid] = (first, " ".join(proc.cmdline()))
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return [cmdline for _, cmdline in self.seen.values()]

    def wait_until_running(self, needles: list[str], timeout: float) -> None:
        def everything_up() -> bool:
            cmdlines = self.look()
            return all(any(n in c for c in cmdlines) for n in needles) and self.top.poll() is None
        wait_for(everything_up, timeout, f"{', '.join(needles)} below PID {self.top.pid}", interval=0.3)

    def alive(self) -> list[str]:
        running = []
        for proc, cmdline in self.seen.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    running.append(f"{proc.pid} {cmdline}")
            except psutil.NoSuchProcess:
                pass
        return running

    def stop(self, sig: int) -> int:
        """Signal the top PID only; its exit code, once it and every process seen below it are gone."""
        self.look()
        os.kill(self.top.pid, sig)
        code = self.top.wait(timeout=STOP_BOUND)
        deadline = time.monotonic() + 5
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.alive(), f"still running after {signal.Signals(sig).name} to {self.top.pid}: {self.alive()}"
        return code

    def kill_leftovers(self) -> None:
        """After a failed test: nothing of it keeps running."""
        if self.top.poll() is None:
            self.top.kill()
            self.top.wait()
        for proc, _ in self.seen.values():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def test_toy_tree_with_an_orphan_goes_down_on_sigterm():
    top = supervisor([["sh", "-c", "sleep 300 & sleep 300 & wait"], ["sh", "-c", "(sleep 301 &) ; sleep 302"]], grace=5)
    tree = Tree(top)
    try:
        tree.wait_until_running(["sleep 300", "sleep 301", "sleep 302"], 10)
        assert len([c for c in tree.look() if c.startswith("sleep")]) == 4
        # The double-forked sleep was re-parented to the supervisor (a child subreaper), not to init.
        orphan = next(p for p, c in tree.seen.values() if c == "sleep 301")
        assert orphan.ppid() == top.pid
        assert tree.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    finally:
        tree.kill_leftovers()


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period():
    top = supervisor([["sh", "-c", "trap '' TERM; sleep 300"]], grace=1)
    tree = Tree(top)
    try:
        tree.wait_until_running(["sleep 300"], 10)
        started = time.monotonic()
        assert tree.stop(signal.SIGINT) == 128 + signal.SIGINT
        assert 0.9 < time.monotonic() - started < 10
    finally:
        tree.kill_leftovers()


def test_a_command_that_exits_takes_the_others_down_and_keeps_its_code():
    top = supervisor([["sh", "-c", "sleep 1; exit 3"], ["sh", "-c", "(sleep 303 &) ; sleep 304"]], grace=5)
    tree = Tree(top)
    try:
        tree.wait_until_running(["sleep 303", "sleep 304"], 10)
        assert top.wait(timeout=15) == 3
        assert not tree.alive()
    finally:
        tree.kill_leftovers()


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=flower_env())


def long_run_config(tmp_path: Path, model: Path) -> Path:
    """One site, one round that trains long enough to be stopped in the middle."""
    config = load_config(None, {
        "model.path": str(model), "data.labels": ["a", "b", "c"], "run.output_dir": str(tmp_path / "runs"),
        "federation.rounds": 1, "federation.min_clients": 1, "train.local_steps": 100_000, "train.batch_size": 4,
    })
    write_config(config, tmp_path / "run.toml")
    return tmp_path / "run.toml"


@pytest.mark.slow
@pytest.mark.parametrize("sig, mid_run", [(signal.SIGTERM, True), (signal.SIGINT, False)], ids=["sigterm-mid-run", "sigint-idle"])
def test_coordinator_and_site_leave_no_process_behind(sig, mid_run, tmp_path, tiny_models):
    port, state = free_port(), tmp_path / "coordinator"
    coordinator = Tree(start([*FEDLORA, "coordinator", "--insecure", "--state-dir", str(state), "--port", str(port)],
                             tmp_path / "coordinator.log"))
    site = Tree(start([*FEDLORA, "client", "--insecure", "--coordinator", f"127.0.0.1:{port}",  # retries until it listens
                       "--data-path", str(write_site_data(tmp_path / "site.jsonl", rows=30)),
                       "--model-path", str(tiny_models["bert"]), "--state-dir", str(tmp_path / "site"),
                       "--max-epsilon", "10", "--labels", "a,b,c", "--port", str(free_port())], tmp_path / "site.log"))
    try:
        coordinator.wait_until_running(["flower-superlink", "flower-superexec"], 180)
        if mid_run:
            submit = start([*FEDLORA, "run", "--detach", "--config", str(long_run_config(tmp_path, tiny_models["bert"])),
                            "--coordinator-dir", str(state)], tmp_path / "run.log")
        site.wait_until_running(["flower-supernode", "fedlora.client.site_executor"], 180)
        if mid_run:
            assert submit.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-2000:]
            coordinator.wait_until_running(["flwr-serverapp"], 180)
            site.wait_until_running(["fedlora.client.pinned_clientapp"], 180)

        assert site.stop(sig) == 128 + sig, (tmp_path / "site.log").read_text()[-2000:]
        assert coordinator.stop(sig) == 128 + sig, (tmp_path / "coordinator.log").read_text()[-2000:]
    finally:
        site.kill_leftovers()
        coordinator.kill_leftovers()

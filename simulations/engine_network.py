"""Where the simulation engine's network lives: a private, loopback-only namespace by
default, so that no other machine can reach Ray's processes while they run on real data.

`fedlora simulate` runs as two processes. The one the user started stays light and
supervises (`supervise_engine`): it re-runs the command as its child, the engine, and
on Ctrl-C or SIGTERM stops the whole tree (fedlora/process_tree.py), because Ray's own
processes outlive a driver interrupted while Ray starts. The engine, still
single-threaded, places itself (`place_engine`) before torch or Ray load:
- `simulation.ray_address` set: it joins that Ray cluster, which needs the network;
- `simulation.isolate_network = false`: the host network, as asked;
- otherwise it enters a private network namespace (fedlora/private_network.py), which
  everything Ray starts inherits;
- where that is impossible it refuses (IsolationRefused, exit 2), unless the network
  is allowed (`--allow-network`).
The engine says which in one line once the run's inputs are checked. The supervisor
stays in the host's network, so the sockets it sees there are exactly the ones other
machines could reach: it names them in one line once Ray's ports settle.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

from fedlora import private_network
from fedlora.config import Config, ConfigError

ISOLATED = "isolated"
OPEN = "open"
CLUSTER = "cluster"

# How `fedlora simulate` runs in this process: unset, it supervises; the supervisor sets
# "child" for the engine; tests that call the CLI in-process set "in-process" (no
# placement, no child) to see the run's input errors in their own process.
ENGINE_ENV = "FEDLORA_SIMULATION_ENGINE"
SUPERVISOR, CHILD, IN_PROCESS = "supervisor", "child", "in-process"


class IsolationRefused(ConfigError):
    """The engine cannot be isolated and the network was not allowed (exit 2)."""


@dataclass
class EnginePlacement:
    mode: str  # ISOLATED, OPEN or CLUSTER
    line: str  # what the operator is told

    def announce(self) -> None:
        say(self.line)


def say(text: str) -> None:
    print(f"fedlora: {text}", file=sys.stderr, flush=True)


def engine_role() -> str:
    """SUPERVISOR, CHILD or IN_PROCESS (see ENGINE_ENV)."""
    role = os.environ.get(ENGINE_ENV, "")
    return role if role in (CHILD, IN_PROCESS) else SUPERVISOR


def _asked_for_network(config: Config) -> EnginePlacement | None:
    sim = config.simulation
    if sim.ray_address:
        return EnginePlacement(CLUSTER, f"network isolation off: joining the Ray cluster at {sim.ray_address} "
                                        "(simulation.ray_address) needs the network")
    if not sim.isolate_network:
        return EnginePlacement(OPEN, "network isolation off (simulation.isolate_network = false): "
                                     "the simulation engine listens on this machine's network")
    return None


def _unavailable(reason: str, allow_network: bool) -> EnginePlacement:
    if not allow_network:
        raise IsolationRefused(f"network isolation unavailable: {reason}; Ray would listen on this machine's network "
                               "(use --allow-network to simulate anyway)")
    return EnginePlacement(OPEN, f"network isolation unavailable: {reason}; running on this machine's network (--allow-network)")


def place_engine(config: Config, allow_network: bool = False) -> EnginePlacement:
    """Decide where the engine's network lives and enter the private namespace if that is
    it. Call it while this process is single-threaded (before torch, Ray or gRPC load)."""
    if (placement := _asked_for_network(config)) is not None:
        return placement
    if private_network.only_loopback():
        return EnginePlacement(ISOLATED, "network isolated: this process sees loopback only; no other machine can reach the simulation")
    try:
        private_network.enter()
    except private_network.IsolationUnavailable as exc:
        return _unavailable(str(exc), allow_network)
    return EnginePlacement(ISOLATED, "network isolated: the simulation runs in a private network namespace "
                                     "(loopback only); no other machine can reach it")


def plan_runs(config: Config, allow_network: bool = False) -> EnginePlacement:
    """For a command that starts many `fedlora simulate` runs (`fedlora compare`): where
    their engines' network will live, decided once, without moving this process. Each
    run places its own engine; an OPEN plan from --allow-network means the runs must be
    told to run open (simulation.isolate_network = false)."""
    if (placement := _asked_for_network(config)) is not None:
        return placement
    if private_network.only_loopback():
        return EnginePlacement(ISOLATED, "network isolated: this process sees loopback only; no other machine can reach the simulations")
    if (reason := private_network.unavailable_reason()) is not None:
        return _unavailable(reason, allow_network)
    return EnginePlacement(ISOLATED, "network isolated: each run's simulation engine runs in a private network namespace "
                                     "(loopback only); no other machine can reach it")


def supervise_engine(argv: list[str], config: Config, allow_network: bool = False) -> int:
    """Run `fedlora ARGV` as the engine, a child process, and return its exit code (128+N
    when signal N stopped this supervisor: 130 for Ctrl-C, 143 for SIGTERM)."""
    from fedlora.process_tree import supervise

    stop = threading.Event()
    may_listen = config.simulation.ray_address or not config.simulation.isolate_network or allow_network
    if may_listen and not private_network.only_loopback():  # inside a private network there is nothing to report
        from fedlora.listening_ports import describe, report_when_settled

        # A local Ray has opened its ports once its raylet runs; a cluster's driver has no raylet here.
        report_when_settled(lambda ports: say(f"listening on this machine's network: {describe(ports)}"), stop,
                            after="" if config.simulation.ray_address else "raylet")
    try:
        return supervise([[sys.executable, "-m", "fedlora.cli", *argv]], env={**os.environ, ENGINE_ENV: CHILD})
    finally:
        stop.set()

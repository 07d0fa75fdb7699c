"""Where the simulation engine's network lives: a private, loopback-only namespace by
default, so that no other machine can reach Ray's processes while they run on real data.

`place_engine` decides and says so in one line (stderr):
- `simulation.ray_address` set: the run joins that Ray cluster, which needs the network;
- `simulation.isolate_network = false`: the host network, as asked;
- otherwise this process enters a private network namespace (fedlora/private_network.py)
  before Ray or torch start a thread, and everything it starts inherits it;
- where that is impossible it refuses (IsolationRefused, exit 2), unless the caller
  allows the network (`--allow-network`).
Where the engine runs on the host network, a second line names the ports it opened.

The process that decides then supervises the engine (`supervise_engine`): it re-runs the
command as a child, which inherits the namespace, and on Ctrl-C or SIGTERM stops the
whole tree (fedlora/process_tree.py): Ray's own processes outlive a driver interrupted
while Ray starts.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field

from fedlora import private_network
from fedlora.config import Config, ConfigError

ISOLATED = "isolated"
OPEN = "open"
CLUSTER = "cluster"


# Set by the supervising process for its engine child: the placement it made (a mode above).
ENGINE_CHILD_ENV = "FEDLORA_SIMULATION_ENGINE"


class IsolationRefused(ConfigError):
    """The engine cannot be isolated and the caller did not allow the network (exit 2)."""


@dataclass
class EnginePlacement:
    mode: str  # ISOLATED, OPEN or CLUSTER
    line: str  # what the operator is told
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def report_ports(self) -> None:
        """Off the private network: name the ports this process tree listens on, once Ray's settle."""
        if self.mode == ISOLATED:
            return
        from fedlora.listening_ports import describe, report_when_settled

        # A local Ray has opened its ports once its raylet runs; a driver of a cluster has no raylet here.
        report_when_settled(lambda ports: say(f"listening on this machine's network: {describe(ports)}"), self._stop,
                            after="raylet" if self.mode == OPEN else "")

    def done(self) -> None:
        self._stop.set()


def say(text: str) -> None:
    print(f"fedlora: {text}", file=sys.stderr, flush=True)


def place_engine(config: Config, allow_network: bool = False) -> EnginePlacement:
    """Decide where the engine's network lives and enter the private namespace if that is
    it. Call it while this process is single-threaded (before torch, Ray or gRPC load)."""
    sim = config.simulation
    if sim.ray_address:
        placement = EnginePlacement(CLUSTER, f"network isolation off: joining the Ray cluster at {sim.ray_address} "
                                             "(simulation.ray_address) needs the network")
    elif not sim.isolate_network:
        placement = EnginePlacement(OPEN, "network isolation off (simulation.isolate_network = false): "
                                          "the simulation engine listens on this machine's network")
    elif private_network.only_loopback():
        placement = EnginePlacement(ISOLATED, "network isolated: this process sees loopback only; no other machine can reach the simulation")
    else:
        try:
            private_network.enter()
            placement = EnginePlacement(ISOLATED, "network isolated: the simulation runs in a private network namespace "
                                                  "(loopback only); no other machine can reach it")
        except private_network.IsolationUnavailable as exc:
            if not allow_network:
                raise IsolationRefused(f"network isolation unavailable: {exc}; Ray would listen on this machine's network "
                                       "(use --allow-network to simulate anyway)") from None
            placement = EnginePlacement(OPEN, f"network isolation unavailable: {exc}; running on this machine's network "
                                              "(--allow-network)")
    say(placement.line)
    return placement


def supervise_engine(argv: list[str], placement: EnginePlacement) -> int:
    """Run `fedlora ARGV` as the engine, a child in this process's network, and return its
    exit code (128+N when signal N stopped this supervisor: 130 for Ctrl-C, 143 for SIGTERM)."""
    from fedlora.process_tree import supervise

    placement.report_ports()
    try:
        return supervise([[sys.executable, "-m", "fedlora.cli", *argv]], env={**os.environ, ENGINE_CHILD_ENV: placement.mode})
    finally:
        placement.done()


def engine_child() -> bool:
    """True in the engine child a supervisor started; a child meant to be isolated checks that it is."""
    mode = os.environ.get(ENGINE_CHILD_ENV)
    if mode == ISOLATED and not private_network.only_loopback():
        raise RuntimeError(f"{ENGINE_CHILD_ENV}={mode} but this process sees more than loopback")
    return mode in (ISOLATED, OPEN, CLUSTER)

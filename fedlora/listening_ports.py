"""Which ports this process and its descendants listen on, told once they settle.

Where the simulation engine runs without a private network (fedlora/private_network.py),
the operator is told which ports Ray opened on every interface. Ray opens them while it
starts (GCS, raylet, object manager, one per worker), so the report waits until the set
stops changing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import psutil

SETTLE_SECONDS = 3.0
POLL_SECONDS = 0.5


def listening_ports(root: psutil.Process | None = None) -> set[tuple[str, str, int]]:
    """(protocol, address, port) of every listening TCP socket and bound UDP socket of
    `root` (default: this process) and its descendants."""
    root = root or psutil.Process()
    found: set[tuple[str, str, int]] = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in connections:
            tcp = conn.type == socket.SOCK_STREAM
            if (tcp and conn.status == psutil.CONN_LISTEN) or (not tcp and not conn.raddr):
                found.add(("TCP" if tcp else "UDP", conn.laddr.ip, conn.laddr.port))
    return found


def describe(ports: set[tuple[str, str, int]]) -> str:
    """'TCP 6379, 40123 on 0.0.0.0; UDP ...' grouped by protocol and address."""
    groups: dict[tuple[str, str], list[int]] = {}
    for proto, addr, port in ports:
        groups.setdefault((proto, addr), []).append(port)
    where = lambda addr: f"all interfaces ({addr})" if addr in ("0.0.0.0", "::", "") else addr  # noqa: E731
    return "; ".join(f"{proto} {', '.join(str(p) for p in sorted(nums))} on {where(addr)}"
                     for (proto, addr), nums in sorted(groups.items())) or "none seen"


def _running(name: str) -> bool:
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == name:
                return True
        except psutil.Error:
            pass
    return False


def report_when_settled(say: Callable[[set[tuple[str, str, int]]], None], stop: threading.Event,
                        after: str = "") -> threading.Thread:
    """Start a daemon thread that calls `say(ports)` once, when this process tree has
    listened on the same non-empty set of ports for SETTLE_SECONDS, counted from when a
    descendant named `after` runs (e.g. "raylet"); never, if `stop` is set first."""

    def watch() -> None:
        last: set[tuple[str, str, int]] = set()
        since = time.monotonic()
        while not stop.wait(POLL_SECONDS):
            try:
                now = listening_ports() if not after or _running(after) else set()
            except psutil.Error:
                continue
            if now != last:
                last, since = now, time.monotonic()
            elif now and time.monotonic() - since >= SETTLE_SECONDS:
                say(now)
                return

    thread = threading.Thread(target=watch, name="fedlora-listening-ports", daemon=True)
    thread.start()
    return thread

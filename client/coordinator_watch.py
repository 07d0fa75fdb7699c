"""A site that cannot reach its coordinator says so in fedlora's words, and can give up.

Flower's SuperNode retries its connection forever and says only "Connection attempt
failed", without the address or what to check. While the site runs, a thread here tries
to open the connection the SuperNode needs (gRPC over TLS with the site's --root-cert,
or plain under --insecure) every few seconds; while that fails, `fedlora client` says
once a minute which address it cannot reach, since when, and what to check. With
--give-up-after, a site still cut off after that long stops (exit 4), so that a service
manager or a script can tell "no coordinator" from a crash.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

PROBE_SECONDS = 10.0  # how often the connection is tried
PROBE_TIMEOUT = 5.0  # how long one try waits for the channel (TCP, TLS, HTTP/2) to be ready
SAY_EVERY_SECONDS = 60.0
EXIT_UNREACHABLE = 4
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CoordinatorUnreachable(RuntimeError):
    """The site gave up: its coordinator stayed unreachable for --give-up-after."""


def parse_duration(text: str) -> float:
    """'90s', '5m', '2h', '1d' or plain seconds ('300') -> seconds (> 0); ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a duration such as 90s, 5m or 2h, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def channel_ready(address: str, root_cert: Path | None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a gRPC channel to `address` becomes ready (TLS checked against `root_cert`;
    None: plain, as under --insecure): the connection a SuperNode opens first."""
    import grpc

    channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(root_cert.read_bytes())) if root_cert
               else grpc.insecure_channel(address))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()  # a fresh channel per try: gRPC's own reconnect backoff would lag a coordinator that comes up


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class CoordinatorWatch:
    """Call `start()`, then the instance itself often (supervise's `while_running`): it
    prints the reminder and raises CoordinatorUnreachable past `give_up_after` seconds."""

    def __init__(self, address: str, root_cert: Path | None, give_up_after: float | None,
                 probe: Callable[[], bool] | None = None, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.address, self.root_cert, self.give_up_after = address, root_cert, give_up_after
        self.probe = probe or (lambda: channel_ready(address, root_cert))
        self.clock, self.say = clock, say
        self._lock = threading.Lock()
        self._down_since: float | None = None  # clock() of the first failed try since the last good one
        self._down_since_utc = ""
        self._said: float | None = None  # clock() of the last reminder
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._watch, name="coordinator-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.record(self.probe())
            self._stop.wait(PROBE_SECONDS)

    def record(self, reached: bool) -> None:
        """One try's outcome."""
        with self._lock:
            if reached:
                if self._said is not None:
                    self.say(f"[fedlora] reached the coordinator at {self.address} again")
                self._down_since, self._said = None, None
            elif self._down_since is None:
                self._down_since = self.clock()
                self._down_since_utc = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    def __call__(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            now = self.clock()
            down = now - self._down_since
            if self._said is None or now - self._said >= SAY_EVERY_SECONDS:
                self._said = now
                self.say(f"[fedlora] cannot reach the coordinator at {self.address} since {self._down_since_utc} "
                         f"({_minutes(down)}): {self.checks()}")
            if self.give_up_after is not None and down >= self.give_up_after:
                raise CoordinatorUnreachable(f"cannot reach the coordinator at {self.address} since "
                                             f"{self._down_since_utc}: gave up after {_minutes(down)} (--give-up-after)")

    def checks(self) -> str:
        """What the operator can check, in the order a connection needs them."""
        tls = ("" if self.root_cert is None else
               f", and that {self.root_cert} (--root-cert) holds the CA that signed its certificate")
        return (f"check that `fedlora coordinator` runs there and listens on that port, that --coordinator names it, "
                f"that no firewall between here and there blocks the port{tls}")

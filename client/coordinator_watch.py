"""A site that cannot reach its coordinator says so in fedlora's words, and can give up.

Flower's SuperNode retries its connection forever and says only "Connection attempt
failed", without the address or what to check. While the site runs, a thread here asks
the coordinator's health endpoint every few seconds, over the connection the SuperNode
uses: Flower 1.42's SuperLink serves its Fleet API as HTTP/1.1 (FastAPI), HTTPS checked
against the site's --root-cert, or plain HTTP under --insecure; a gRPC probe never got
an answer from it, TLS or not, and said "cannot reach" beside a connected SuperNode.
While that fails, `fedlora client` says once a minute which address it cannot reach,
since when, and what to check. With --give-up-after, a site still cut off after that
long stops (exit 4), so that a service manager or a script can tell "no coordinator"
from a crash. FEDLORA_COORDINATOR_PROBE_SECONDS sets how often it asks (default 10 s).
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

PROBE_SECONDS = 10.0  # how often the connection is tried
PROBE_SECONDS_ENV = "FEDLORA_COORDINATOR_PROBE_SECONDS"
PROBE_TIMEOUT = 5.0  # how long one try waits for the answer (TCP, TLS, HTTP)
HEALTH_PATH = "/health"  # the SuperLink's health endpoint: 200 while it serves
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


def probe_seconds(say: Callable[[str], None]) -> float:
    """How often the watch asks: FEDLORA_COORDINATOR_PROBE_SECONDS (> 0), else 10 s. A bad
    value is said and set aside: it must not keep a site from joining."""
    text = os.environ.get(PROBE_SECONDS_ENV, "").strip()
    try:
        value = float(text) if text else PROBE_SECONDS
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        say(f"[fedlora] {PROBE_SECONDS_ENV}={text!r} is not a number of seconds > 0: asking the coordinator every "
            f"{PROBE_SECONDS:.0f} s")
        return PROBE_SECONDS
    return value


def coordinator_answers(address: str, root_cert: Path | None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the SuperLink at `address` answers its health endpoint, as the SuperNode
    connects: HTTPS verified against `root_cert` (the host name included), or plain HTTP
    when None (--insecure). httpx, as Flower's own client, so that proxy settings in the
    environment apply alike."""
    import httpx

    try:
        verify: ssl.SSLContext | bool = False if root_cert is None else ssl.create_default_context(cafile=str(root_cert))
        scheme = "http" if root_cert is None else "https"
        with httpx.Client(verify=verify, timeout=timeout) as client:
            return client.get(f"{scheme}://{address}{HEALTH_PATH}").status_code == 200
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ssl.SSLError, ValueError):
        return False  # refused, timed out, TLS not vouched for by root_cert, not an HTTP server, a certificate gone


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class CoordinatorWatch:
    """Call `start()`, then the instance itself often (supervise's `while_running`): it
    prints the reminder and raises CoordinatorUnreachable past `give_up_after` seconds."""

    def __init__(self, address: str, root_cert: Path | None, give_up_after: float | None,
                 probe: Callable[[], bool] | None = None, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = lambda line: print(line, flush=True), every: float | None = None):
        self.address, self.root_cert, self.give_up_after = address, root_cert, give_up_after
        self.probe = probe or (lambda: coordinator_answers(address, root_cert))
        self.clock, self.say = clock, say
        self.every = probe_seconds(say) if every is None else every  # seconds between tries
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
            self._stop.wait(self.every)

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

"""A site restarted right after a crash rejoins: it waits out the coordinator's hold.

Flower 1.42's SuperLink keeps a node marked online until two heartbeat intervals
(2 x 30 s, neither configurable from the SuperNode) after its last heartbeat, and
refuses to activate a node it holds online: a site restarted a few seconds after a
crash gets "[code: 2004] Failed to activate SuperNode." and exits, exactly as a site
whose key is not registered does. The site cannot ask which of the two it is, so it
keeps its own evidence instead: while the SuperNode runs, `fedlora client` touches
STATE_DIR/supernode-alive every few seconds. A stop by signal (Ctrl-C, SIGTERM) lets
the SuperNode leave the coordinator, and the file is removed; after a crash it stays,
and its time says when the node was last known alive. A restart waits until the
coordinator's hold on that node has surely lapsed, saying so, and then connects.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

ALIVE_FILE = "supernode-alive"
TOUCH_SECONDS = 5.0
# The SuperLink's hold after the last heartbeat (HEARTBEAT_PATIENCE 2 x 30 s), plus the
# touch period (the crash can come up to TOUCH_SECONDS after the last touch) and a margin.
HOLD_SECONDS = 2 * 30.0 + TOUCH_SECONDS + 5.0
STOPPED_BY_SIGNAL = {128 + s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}


class AliveMarker:
    def __init__(self, state_dir: Path):
        self.path = state_dir / ALIVE_FILE
        self._touched = 0.0

    def wait_for_release(self, now: float | None = None) -> float:
        """Sleep until a crashed predecessor's hold has lapsed; returns the seconds waited."""
        if not self.path.exists():
            return 0.0
        age = (time.time() if now is None else now) - self.path.stat().st_mtime
        wait = max(0.0, HOLD_SECONDS - age)
        if wait > 0:
            print(f"[fedlora] this site stopped without leaving the coordinator {age:.0f} s ago (a crash?); the "
                  f"coordinator holds it online until its heartbeat lapses: waiting {wait:.0f} s before rejoining",
                  flush=True)
            time.sleep(wait)
        return wait

    def touch(self) -> None:
        """While the SuperNode runs (called often; writes every TOUCH_SECONDS)."""
        if time.monotonic() - self._touched >= TOUCH_SECONDS:
            self.path.touch()
            self._touched = time.monotonic()

    def stopped(self, exit_code: int) -> None:
        """After the SuperNode is gone: a stop by signal let it leave the coordinator."""
        if exit_code in STOPPED_BY_SIGNAL:
            self.path.unlink(missing_ok=True)

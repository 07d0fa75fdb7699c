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

A stop by signal is put on record too (STATE_DIR/supernode-stopped, its time the
stop's): the SuperNode sends Flower's deactivation as it stops (it gets one SIGTERM
only, however the site is stopped: fedlora/process_tree.py, sigterm_once), but a
deactivation can still be lost (the coordinator unreachable at that moment, the
SuperNode killed at the end of the grace period). So when the coordinator refuses a
restarted site with code 2004 and the site's own last connection ended (a stop or a
crash) less than HOLD_SECONDS ago, the refusal may be that hold: the site says so and
tries again RETRY_SECONDS after each refusal until HOLD_SECONDS after that stop. A refusal with no such stop on record,
or after that window, is the key's: REFUSAL_LINE, and the site exits non-zero.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

ALIVE_FILE = "supernode-alive"
STOPPED_FILE = "supernode-stopped"
TOUCH_SECONDS = 5.0
# The SuperLink's hold after the last heartbeat: a node stays online until
# HEARTBEAT_PATIENCE x heartbeat_interval after its activation or last heartbeat
# (flwr/server/superlink/linkstate/sql_linkstate.py, activate_node and
# acknowledge_node_heartbeat; in_memory_linkstate.py the same), and activate_node refuses
# a node that is still online. Flower 1.42: HEARTBEAT_PATIENCE = 2 and the SuperNode sends
# HEARTBEAT_DEFAULT_INTERVAL = 30 s (flwr/common/constant.py; flwr/supernode/
# fleet_http_connection.py, not configurable), so 60 s; plus the touch period (the crash
# can come up to TOUCH_SECONDS after the last touch) and a margin.
FLOWER_HOLD_SECONDS = 2 * 30.0
HOLD_SECONDS = FLOWER_HOLD_SECONDS + TOUCH_SECONDS + 5.0
RETRY_SECONDS = 5.0
STOPPED_BY_SIGNAL = {128 + s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
# Flower's ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED (flwr/supercore/error/base.py), as the
# SuperNode prints it before it exits: its key is not registered, or its node is still online.
REFUSED_CODE = "[code: 2004]"
REFUSAL_LINE = "the coordinator refused this site's key (not registered, or still held online)"


def refused_by_coordinator(line: str) -> bool:
    """Whether a line of the SuperNode's output is Flower's activation refusal (code 2004)."""
    return REFUSED_CODE in line


class AliveMarker:
    def __init__(self, state_dir: Path):
        self.path = state_dir / ALIVE_FILE
        self.stopped_path = state_dir / STOPPED_FILE
        self._touched = 0.0

    def last_left(self) -> tuple[str, float] | None:
        """How and when this site's last connection ended, by its own record: ("crashed",
        its last sign of life) or ("stopped", the stop by signal), the later of the two;
        None when neither is on record. Read it before the SuperNode starts (it touches)."""
        found = []
        for kind, path in (("crashed", self.path), ("stopped", self.stopped_path)):
            try:
                found.append((path.stat().st_mtime, kind))
            except FileNotFoundError:
                pass
        if not found:
            return None
        at, kind = max(found)
        return kind, at

    @staticmethod
    def rejoin_deadline(last_left: tuple[str, float] | None, now: float | None = None) -> float | None:
        """After a refusal with code 2004: until when (wall time) it may be the coordinator's
        hold on this site's own last connection, so worth retrying; None: the key's refusal."""
        if last_left is None:
            return None
        deadline = last_left[1] + HOLD_SECONDS
        return deadline if deadline > (time.time() if now is None else now) else None

    def refused(self) -> None:
        """The SuperNode was refused: it was never online, so no crash to record."""
        self.path.unlink(missing_ok=True)

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
        """After the SuperNode is gone: a stop by signal let it leave the coordinator (and
        its time is kept, in case the coordinator did not hear it)."""
        if exit_code in STOPPED_BY_SIGNAL and self.path.exists():
            self.stopped_path.touch()
            self.path.unlink(missing_ok=True)

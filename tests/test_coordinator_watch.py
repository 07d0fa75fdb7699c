"""A site that cannot reach its coordinator says so in fedlora's words every minute
(address, since when, what to check), and `--give-up-after` ends it with exit 4
(client/coordinator_watch.py)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedlora.client.coordinator_watch import (
    EXIT_UNREACHABLE, SAY_EVERY_SECONDS, CoordinatorUnreachable, CoordinatorWatch, parse_duration,
)
from fedlora.flower_env import flower_env
from tests.helpers.site_data import write_site_data

ROOT = Path(__file__).resolve().parents[1]


def test_durations():
    assert [parse_duration(t) for t in ("90s", "5m", "2h", "1d", "300", "1.5m")] == [90, 300, 7200, 86400, 300, 90]
    for bad in ("", "5 minutes", "-3s", "0", "m"):
        with pytest.raises(ValueError, match="expected a duration such as 90s, 5m or 2h"):
            parse_duration(bad)


def test_the_site_says_it_once_a_minute_and_gives_up_after_the_duration():
    now, said = [0.0], []
    watch = CoordinatorWatch("coordinator.example.org:9092", Path("/site/ca.pem"), give_up_after=150.0,
                             clock=lambda: now[0], say=said.append)
    watch()  # reached, or not tried yet: nothing to say
    watch.record(False)
    for second in range(0, 150, 5):  # supervise calls it every poll
        now[0] = float(second)
        watch()
    assert len(said) == 3 and all(line.startswith("[fedlora] cannot reach the coordinator at coordinator.example.org:9092 "
                                                  "since ") for line in said)  # at 0, 60 and 120 s
    assert [re.search(r"\((\d+ \w+)\)", line).group(1) for line in said] == ["0 s", "1 min", "2 min"]
    assert said[0].endswith("check that `fedlora coordinator` runs there and listens on that port, that --coordinator "
                            "names it, that no firewall between here and there blocks the port, and that /site/ca.pem "
                            "(--root-cert) holds the CA that signed its certificate")
    now[0] = 150.0
    with pytest.raises(CoordinatorUnreachable, match=r"coordinator.example.org:9092 since .*: gave up after 2 min"):
        watch()

    watch = CoordinatorWatch("c:9092", None, give_up_after=None, clock=lambda: now[0], say=said.append)
    said.clear()
    watch.record(False)
    watch()
    watch.record(True)  # the coordinator came up: said once, and the reminders stop
    now[0] += 10 * SAY_EVERY_SECONDS
    watch()
    assert said[1] == "[fedlora] reached the coordinator at c:9092 again" and len(said) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_site_pointed_where_nothing_listens_says_so_and_gives_up(tmp_path):
    port = free_port()  # nothing listens here
    state = tmp_path / "state"
    command = [sys.executable, "-m", "fedlora.cli", "client", "--insecure", "--coordinator", f"127.0.0.1:{port}",
               "--data-path", str(write_site_data(tmp_path / "notes.jsonl", rows=30)), "--state-dir", str(state),
               "--max-epsilon", "5", "--port", str(free_port()), "--give-up-after", "4s"]
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=flower_env(), timeout=300)
    assert proc.returncode == EXIT_UNREACHABLE, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = [line for line in proc.stdout.splitlines() if line.startswith("[fedlora] cannot reach the coordinator")]
    assert said and said[0].startswith(f"[fedlora] cannot reach the coordinator at 127.0.0.1:{port} since "), proc.stdout
    assert "check that `fedlora coordinator` runs there" in said[0] and "--root-cert" not in said[0]
    assert re.fullmatch(rf"fedlora: cannot reach the coordinator at 127\.0\.0\.1:{port} since \S+ \S+ UTC: gave up after "
                        r"\d+ s \(--give-up-after\)", proc.stderr.strip().splitlines()[-1]), proc.stderr[-3000:]
    assert time.monotonic() - started < 240
    # The SuperNode and the site's executor went down with it.
    left = [p for p in psutil.process_iter(["cmdline"]) if str(state) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
    assert not (state / "supernode-alive").exists()  # a restart need not wait out a coordinator's hold

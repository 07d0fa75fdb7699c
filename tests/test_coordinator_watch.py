"""A site that cannot reach its coordinator says so in fedlora's words every minute
(address, since when, what to check), and `--give-up-after` ends it with exit 4
(client/coordinator_watch.py); a site connected to its coordinator says nothing of the
kind, with TLS or without (the probe asks the SuperLink's HTTP health endpoint, as the
SuperNode connects)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from fedlora.client.coordinator_watch import (
    EXIT_UNREACHABLE, PROBE_SECONDS, PROBE_SECONDS_ENV, SAY_EVERY_SECONDS, CoordinatorUnreachable, CoordinatorWatch,
    parse_duration,
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


def test_the_probe_interval_is_the_sites_to_set(monkeypatch):
    tries, said = [], []
    watch = CoordinatorWatch("c:9092", None, give_up_after=None, probe=lambda: tries.append(time.monotonic()) or True,
                             say=said.append, every=0.05)
    watch.start()
    time.sleep(0.5)
    watch.stop()
    assert len(tries) >= 4 and not said  # every 0.05 s, not every 10
    monkeypatch.setenv(PROBE_SECONDS_ENV, "0.5")
    assert CoordinatorWatch("c:9092", None, None, say=said.append).every == 0.5
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv(PROBE_SECONDS_ENV, bad)
        assert CoordinatorWatch("c:9092", None, None, say=said.append).every == PROBE_SECONDS
    assert len(said) == 4 and said[0] == (f"[fedlora] {PROBE_SECONDS_ENV}='soon' is not a number of seconds > 0: "
                                          "asking the coordinator every 10 s")


@contextmanager
def coordinator(tmp_path: Path, name: str, *tls: str):
    """`fedlora coordinator` on 127.0.0.1 (insecure unless `tls` gives --certs DIR); yields
    (address, the process, its log), and stops it (SIGTERM: it takes its SuperLink down)."""
    port, log = free_port(), tmp_path / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedlora.cli", "coordinator", "--state-dir", str(tmp_path / name),
                                 "--port", str(port), *(tls or ("--insecure",))], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=flower_env())
    try:
        deadline = time.monotonic() + 120
        while "Application startup complete" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.mark.slow
def test_a_site_connected_to_an_insecure_coordinator_says_nothing_until_it_goes(tmp_path):
    """A real site asks its coordinator every 0.5 s: silent while connected, then it says
    so once the coordinator is stopped, gives up after --give-up-after (exit 4), and
    leaves no process and no alive marker behind."""
    state, site_log = tmp_path / "site", tmp_path / "site.log"
    with coordinator(tmp_path, "coordinator") as (address, coordinator_proc, _):
        command = [sys.executable, "-m", "fedlora.cli", "client", "--insecure", "--coordinator", address,
                   "--data-path", str(write_site_data(tmp_path / "notes.jsonl", rows=30)), "--state-dir", str(state),
                   "--max-epsilon", "5", "--port", str(free_port()), "--give-up-after", "3s"]
        with open(site_log, "w") as out:
            site = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**flower_env(), PROBE_SECONDS_ENV: "0.5"})
        try:
            deadline = time.monotonic() + 180
            while "Connection successful" not in site_log.read_text():  # the SuperNode's line, relayed
                assert site.poll() is None and time.monotonic() < deadline, site_log.read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(4.0)  # 8 probes while connected
            connected = site_log.read_text()
            assert site.poll() is None, connected[-3000:]
            assert "cannot reach the coordinator" not in connected, connected[-3000:]
            coordinator_proc.send_signal(signal.SIGTERM)
            coordinator_proc.wait(timeout=60)
            assert site.wait(timeout=120) == EXIT_UNREACHABLE, site_log.read_text()[-3000:]
        finally:
            if site.poll() is None:
                site.send_signal(signal.SIGTERM)
                site.wait(timeout=60)
    after = site_log.read_text()[len(connected):]
    said = [line for line in after.splitlines() if line.startswith("[fedlora] cannot reach the coordinator")]
    assert said and said[0].startswith(f"[fedlora] cannot reach the coordinator at {address} since "), after[-3000:]
    assert "check that `fedlora coordinator` runs there" in said[0] and "--root-cert" not in said[0]  # --insecure: no CA to check
    assert re.search(rf"fedlora: cannot reach the coordinator at {re.escape(address)} since .*: gave up after \d+ s "
                     r"\(--give-up-after\)", after), after[-3000:]
    # The SuperNode and the site's executor went down with it, and a restart need not wait out a hold.
    left = [p for p in psutil.process_iter(["cmdline"]) if str(state) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
    assert not (state / "supernode-alive").exists()

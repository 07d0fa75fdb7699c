"""Restarts that work however the sites were stopped (issue 28, item 2): sites
stopped together with SIGTERM to their process groups (what `kill %1 %2` does) all
leave the coordinator and all rejoin when restarted at once, and a site killed with
SIGKILL, restarted at once, waits out the coordinator's hold and rejoins with its node
id (client/site_rejoin.py); and the rule a site applies when the coordinator refuses it
with Flower's code 2004."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from fedlora.client.site_rejoin import (
    ALIVE_FILE, FLOWER_HOLD_SECONDS, HOLD_SECONDS, REFUSAL_LINE, STOPPED_FILE, AliveMarker, refused_by_coordinator,
)
from tests.helpers.deployment import Deployment, kill, online_sites, wait_for, wait_for_site_logs


def test_a_refusal_after_a_recent_stop_of_its_own_is_retried_until_the_hold_lapses(tmp_path):
    marker = AliveMarker(tmp_path)
    assert marker.last_left() is None and marker.rejoin_deadline(None) is None  # no recent stop: the key is refused
    marker.touch()
    marker.stopped(128 + signal.SIGTERM)  # a clean stop: the alive file goes, the stop is on record
    assert not (tmp_path / ALIVE_FILE).exists() and (tmp_path / STOPPED_FILE).exists()
    kind, at = marker.last_left()
    assert kind == "stopped" and at == pytest.approx(time.time(), abs=5)
    assert marker.rejoin_deadline(marker.last_left()) == pytest.approx(at + HOLD_SECONDS)
    long_ago = time.time() - HOLD_SECONDS - 1
    os.utime(tmp_path / STOPPED_FILE, (long_ago, long_ago))
    assert marker.rejoin_deadline(marker.last_left()) is None  # past the window: refused for good
    marker.path.touch()  # running again, then a crash: the alive file is the newer evidence
    assert marker.last_left()[0] == "crashed"
    marker.refused()  # a refused SuperNode was never online: no crash on record
    assert not (tmp_path / ALIVE_FILE).exists() and marker.last_left()[0] == "stopped"
    assert refused_by_coordinator("Failed to initialize the connection to the SuperLink.\n"
                                  "[code: 2004] Failed to activate SuperNode.")
    assert not refused_by_coordinator("[code: 2001] something else")
    assert "not registered, or still held online" in REFUSAL_LINE


def test_the_figures_are_flowers():
    """The hold and the refusal's code as the installed Flower has them (a Flower upgrade fails here)."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
    from flwr.supercore.error.base import ApiErrorCode

    assert FLOWER_HOLD_SECONDS == HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
    assert refused_by_coordinator(f"[code: {int(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)}] Failed to activate SuperNode.")


class _NoWatch:
    def __init__(self, *_args):
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __call__(self) -> None:
        pass


def test_run_site_retries_a_refusal_within_the_window_then_names_it(tmp_path, monkeypatch, capsys):
    """run_site's loop, with the SuperNode refused every time (code 2004) and a clock of its own."""
    from fedlora.client import site_agent

    clock, runs = [1_000_000.0], []

    def refused_supernode(commands, env, while_running, sigterm_once, watch_output):
        runs.append(clock[0])
        assert sigterm_once == (1,) and "flower-supernode" in commands[1][0]
        watch_output[1]("[code: 2004] Failed to activate SuperNode.\n")
        return 1

    monkeypatch.setattr(site_agent, "supervise", refused_supernode)
    monkeypatch.setattr(site_agent, "_pause", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    monkeypatch.setattr(site_agent, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(site_agent, "validate_site", lambda site: None)
    monkeypatch.setattr(site_agent, "approved_apps", lambda site: ["sha256:0"])
    monkeypatch.setattr(site_agent, "CoordinatorWatch", _NoWatch)
    site = site_agent.SiteSettings(superlink="127.0.0.1:9", data_path=tmp_path / "notes.jsonl", state_dir=tmp_path,
                                   insecure=True, no_privacy_limit=True)
    (tmp_path / STOPPED_FILE).touch()
    os.utime(tmp_path / STOPPED_FILE, (clock[0] - 20, clock[0] - 20))  # stopped by signal 20 s ago

    assert site_agent.run_site(site) == 1
    out = capsys.readouterr()
    deadline = runs[0] - 20 + HOLD_SECONDS
    assert runs == [runs[0] + 5 * i for i in range(len(runs))] and runs[-1] == deadline  # every 5 s, the last at the deadline
    assert "previous connection ended 20 s ago (a stop)" in out.out and f"for up to {HOLD_SECONDS - 20:.0f} s" in out.out
    assert out.err.strip() == f"fedlora: {REFUSAL_LINE}"

    (tmp_path / STOPPED_FILE).unlink()  # no recent stop of its own: the key's refusal, at once
    runs.clear()
    assert site_agent.run_site(site) == 1 and len(runs) == 1
    out = capsys.readouterr()
    assert "trying again" not in out.out and out.err.strip() == f"fedlora: {REFUSAL_LINE}"


@pytest.mark.slow
def test_sites_stopped_together_rejoin_at_once_and_a_crashed_one_after_the_hold(tmp_path, tiny_models):
    """Two sites stopped together with SIGTERM and a third killed with SIGKILL, all
    restarted at once, on one coordinator: the two left and rejoin at once; the crashed
    one could not leave, says it waits for the coordinator's hold, and rejoins with its
    node id after it. (One deployment for both: the crashed site's hold, a Flower
    constant of about a minute, covers the others' restart.)"""
    d = Deployment(tmp_path, tiny_models["bert"])
    home = d.state / "flwr-home"
    names = ["site-0", "site-1"]  # two stopped together: a third would only repeat them
    crashed_marker = tmp_path / "sites" / "crashed" / ALIVE_FILE

    try:
        sites = [d.site(name) for name in names]
        crashed = d.site("crashed")
        # The sites' logs say when each is in; the coordinator's list (a process each time) is asked once.
        wait_for_site_logs([tmp_path / f"site-{name}.log" for name in [*names, "crashed"]], 120, "the three sites to connect")
        first = online_sites(home)
        assert len(first) == 3, first
        wait_for(crashed_marker.exists, 30, "the crashed site to mark itself alive")
        kill(crashed)  # SIGKILL to the whole site: its SuperNode cannot leave the coordinator
        assert crashed_marker.exists()
        for site in sites:  # together, each to its whole process group: the SuperNodes get the signal twice
            os.killpg(site.pid, signal.SIGTERM)
        assert [site.wait(timeout=60) for site in sites] == [128 + signal.SIGTERM] * 2
        still_online = online_sites(home)
        assert len(still_online) == 1  # the two left the coordinator; the crashed one is held online
        (held,) = still_online

        restarted = [d.restart(name) for name in names]  # all at once
        crashed_again = d.restart("crashed")
        before = {n["online-at"] for n in first}
        crashed_log = tmp_path / "site-crashed-restart.log"
        wait_for(lambda: "waiting" in crashed_log.read_text(), 60, "the crashed site to say it waits")
        wait_for_site_logs([tmp_path / f"site-{name}-restart.log" for name in names], 90, "the two stopped sites to rejoin")
        wait_for_site_logs([crashed_log], HOLD_SECONDS + 60, "the crashed site to rejoin after the hold",
                           needle=f"SuperNode ID: {held['node-id']}")
        online = online_sites(home)
        assert len([n for n in online if n["online-at"] not in before]) == 3, online  # the two and the crashed one
        rejoined = [n for n in online if n["node-id"] == held["node-id"] and n["online-at"] != held["online-at"]]
        assert rejoined and crashed_again.poll() is None, crashed_log.read_text()[-3000:]
        assert "Failed to activate" not in crashed_log.read_text()
        for name, proc in zip(names, restarted):
            assert proc.poll() is None, (tmp_path / f"site-{name}-restart.log").read_text()[-3000:]

        # Stopped by SIGTERM, the site leaves the coordinator and the marker goes: the next start does not wait.
        os.kill(crashed_again.pid, signal.SIGTERM)
        assert crashed_again.wait(timeout=60) == 128 + signal.SIGTERM
        assert not crashed_marker.exists()
    finally:
        d.close()

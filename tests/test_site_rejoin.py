"""A site restarted right after a crash rejoins the coordinator (client/site_rejoin.py):
with a real TLS coordinator and site, and the marker's rules on their own."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedlora.client.site_rejoin import ALIVE_FILE, HOLD_SECONDS, AliveMarker
from fedlora.server.coordinator_service import list_sites
from tests.helpers.deployment import Deployment, kill, wait_for


def test_a_restart_waits_only_for_what_is_left_of_the_hold(tmp_path, monkeypatch, capsys):
    slept: list[float] = []
    monkeypatch.setattr("fedlora.client.site_rejoin.time.sleep", slept.append)
    marker = AliveMarker(tmp_path)
    assert marker.wait_for_release() == 0.0 and slept == []  # no marker: a first start, or a clean stop
    marker.touch()
    crashed = time.time() - 20
    os.utime(tmp_path / ALIVE_FILE, (crashed, crashed))
    waited = marker.wait_for_release()
    assert waited == pytest.approx(HOLD_SECONDS - 20, abs=1.0) and slept == [waited]
    assert "waiting" in capsys.readouterr().out
    os.utime(tmp_path / ALIVE_FILE, (crashed - HOLD_SECONDS, crashed - HOLD_SECONDS))
    assert marker.wait_for_release() == 0.0  # long ago: the hold has lapsed
    marker.stopped(1)  # the SuperNode died on its own: it may not have left the coordinator
    assert (tmp_path / ALIVE_FILE).exists()
    marker.stopped(128 + signal.SIGTERM)  # stopped by signal: it left
    assert not (tmp_path / ALIVE_FILE).exists()


@pytest.mark.slow
def test_a_site_restarted_right_after_a_crash_rejoins(tmp_path, tiny_models):
    d = Deployment(tmp_path, tiny_models["bert"])
    home = d.state / "flwr-home"
    marker = tmp_path / "sites" / "site-0" / ALIVE_FILE
    try:
        site = d.site("site-0")
        (first,) = wait_for(lambda: [n for n in list_sites(home) if n["status"] == "online"], 90, "the site to connect")
        wait_for(marker.exists, 30, "the site to mark itself alive")
        kill(site)  # SIGKILL to the whole site: its SuperNode cannot leave the coordinator
        assert marker.exists()

        restarted = d.restart("site-0")  # at once
        log = tmp_path / "site-site-0-restart.log"
        wait_for(lambda: "waiting" in log.read_text(), 60, "the restarted site to say it waits")
        rejoined = wait_for(lambda: [n for n in list_sites(home) if n["status"] == "online" and n["online-at"] != first["online-at"]],
                            HOLD_SECONDS + 60, "the restarted site to rejoin")
        assert rejoined[0]["node-id"] == first["node-id"] and restarted.poll() is None, log.read_text()[-3000:]
        assert "Failed to activate" not in log.read_text()

        # Stopped by SIGTERM, the site leaves the coordinator and the marker goes: the next start does not wait.
        os.kill(restarted.pid, signal.SIGTERM)
        assert restarted.wait(timeout=60) == 128 + signal.SIGTERM
        assert not marker.exists()
    finally:
        d.close()

"""The rules of the alive marker by which a site restarted right after a crash waits for
the coordinator's hold (client/site_rejoin.py). The real crash and rejoin, with a TLS
coordinator, run beside three sites stopped together in tests/test_site_restart.py."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedlora.client.site_rejoin import ALIVE_FILE, HOLD_SECONDS, AliveMarker


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

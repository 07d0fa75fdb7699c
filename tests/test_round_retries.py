"""A round that cannot gather federation.min_clients updates is tried again a bounded
number of times, then the run stops with a clear message (the real coordinator and
three virtual sites in process, two of which fail every training call); a retry asks
only the sites that failed."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, Message
from tests.helpers.client_apps import client_app_with_train, run_in_process



def train(msg: Message, context: Context) -> Message:
    from fedlora.client.client_app import train as honest_train

    if int(context.node_config["partition-id"]) in (1, 2):
        raise RuntimeError("disk full")  # becomes an error reply at the coordinator
    return honest_train(msg, context)


failing = client_app_with_train(train)


def test_a_round_short_of_min_clients_is_retried_then_the_run_stops(tmp_path, monkeypatch):
    from fedlora.server.message_exchange import FederationError

    overrides = {"federation.rounds": 2, "federation.min_clients": 2, "federation.round_retries": 1}
    with pytest.raises(FederationError, match=r"round 1: fewer than federation.min_clients = 2 usable updates in 2 attempts"):
        run_in_process(failing, tmp_path / "run", monkeypatch, 3, overrides)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]  # no half-done round was written
    ledger = json.loads((tmp_path / "run" / "sites" / "0" / "privacy-ledger.json").read_text())
    # The healthy site delivered in attempt 1 and was not asked (nor spent budget) again.
    assert [m["round"] for m in ledger["runs"][0]["mechanisms"] if m["kind"] == "train"] == [1]

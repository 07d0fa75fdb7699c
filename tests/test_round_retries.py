"""A round that cannot gather federation.min_clients updates is tried again a bounded
number of times, then the run stops with a clear message (a real simulation in which
two of three sites fail every training call); a retry asks only the sites that failed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flwr.app import Context, Message
from tests.client_apps import client_app_with_train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def train(msg: Message, context: Context) -> Message:
    from client.client_app import train as honest_train

    if int(context.node_config["partition-id"]) in (1, 2):
        raise RuntimeError("disk full")  # becomes an error reply at the coordinator
    return honest_train(msg, context)


failing = client_app_with_train(train)


def test_a_round_short_of_min_clients_is_retried_then_the_run_stops(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    from fedlora.config import load_config
    from fedlora.flower_env import FLOWER_OFFLINE_ENV
    from server.federation import FederationError
    from server.server_app import make_server_app
    from simulations.runner import prepare

    for k, v in FLOWER_OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = prepare(load_config(None, {
        "run.output_dir": str(tmp_path / "run"), "simulation.clients": 3, "federation.rounds": 2, "federation.min_clients": 2,
        "federation.round_retries": 1, "simulation.dataset_size": 300, "train.local_steps": 1, "train.batch_size": 16,
        "simulation.cpus_per_client": 1,
    }))
    with pytest.raises(FederationError, match=r"round 1: fewer than federation.min_clients = 2 usable updates in 2 attempts"):
        run_simulation(make_server_app(config), failing, num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0]  # no half-done round was written
    ledger = json.loads((tmp_path / "run" / "sites" / "0" / "privacy-ledger.json").read_text())
    # The healthy site delivered in attempt 1 and was not asked (nor spent budget) again.
    assert [m["round"] for m in ledger["runs"][0]["mechanisms"] if m["kind"] == "train"] == [1]

"""ClientApps for simulation tests: the real client's handlers, with `train` (and
optionally `evaluate`) replaced by a test's own (which usually calls the real one and
then misbehaves), and the real simulation that runs such an app against the real
coordinator."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

ROOT = Path(__file__).resolve().parents[1]
Handler = Callable[[Message, Context], Message]


def client_app_with_train(train: Handler, evaluate: Handler | None = None) -> ClientApp:
    from fedlora.client.site_data import VirtualSites
    from fedlora.simulations.virtual_sites import partition_rows

    app = ClientApp(mods=[VirtualSites(partition_rows)])
    app.train()(train)

    @app.evaluate()
    def real_or_given_evaluate(msg: Message, context: Context) -> Message:
        from fedlora.client.client_app import evaluate as real_evaluate

        return (evaluate or real_evaluate)(msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        from fedlora.client.client_app import query as real_query

        return real_query(msg, context)

    return app


def run_small_simulation(app: ClientApp, run_dir: Path, monkeypatch: pytest.MonkeyPatch, sites: int,
                         overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """A real Flower simulation (Ray, `sites` SuperNodes) of the real coordinator against
    `app`, on a 300-note default dataset, 1 local step of batch 16; returns metrics.jsonl's
    rows. Exceptions from the coordinator propagate."""
    from flwr.simulation import run_simulation

    from fedlora.config import load_config
    from fedlora.flower_env import FLOWER_OFFLINE_ENV
    from fedlora.server.server_app import make_server_app
    from fedlora.simulations.runner import prepare

    for k, v in FLOWER_OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    # Ray workers import the test's module by name: make the checkout importable there.
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = prepare(load_config(None, {
        "run.output_dir": str(run_dir), "simulation.clients": sites, "simulation.dataset_size": 300,
        "train.local_steps": 1, "train.batch_size": 16, "simulation.cpus_per_client": 1, **overrides,
    }))
    try:
        run_simulation(make_server_app(config), app, num_supernodes=sites,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    finally:
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return rows

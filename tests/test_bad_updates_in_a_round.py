"""A site that sends a broken update (NaN) or a hostile one (a huge norm) is rejected
and counted, and the round completes with the others: a real simulation in which one
virtual site's ClientApp corrupts what the real client code would have sent."""

from __future__ import annotations

import json
import os

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from tests.client_apps import client_app_with_train

pytestmark = pytest.mark.slow


def train(msg: Message, context: Context) -> Message:
    from client.client_app import train as honest_train
    from fedlora.adapter_state import from_record, to_record

    reply = honest_train(msg, context)
    partition = int(context.node_config["partition-id"])
    if partition in (0, 1):
        adapter = from_record(reply.content["arrays"])
        key = next(iter(adapter))
        if partition == 0:
            adapter[key] = torch.full_like(adapter[key], float("nan"))
        else:
            adapter = {k: v * 1e4 for k, v in adapter.items()}
        reply = Message(content=RecordDict({"arrays": to_record(adapter), "metrics": reply.content["metrics"]}), reply_to=msg)
    return reply


attacked = client_app_with_train(train)


def test_nan_and_huge_norm_updates_are_rejected_and_the_round_completes(tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    from fedlora.config import load_config
    from fedlora.flower_env import FLOWER_OFFLINE_ENV
    from server.server_app import make_server_app
    from simulations.runner import prepare

    for k, v in FLOWER_OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    # Ray workers import this module by name: make the checkout importable there.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = prepare(load_config(None, {
        "run.output_dir": str(tmp_path / "run"), "simulation.clients": 5, "federation.rounds": 1, "federation.min_clients": 3,
        "simulation.dataset_size": 300, "train.local_steps": 1, "train.batch_size": 16, "simulation.cpus_per_client": 1,
    }))
    run_simulation(make_server_app(config), attacked, num_supernodes=5,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients_ok"] == 3 and rows[1]["updates_rejected"] == 2 and rows[1]["clients_failed"] == 2
    assert rows[1]["failures"] == {"rejected: non-finite": 1, "rejected: outlier": 1}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

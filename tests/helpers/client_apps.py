"""ClientApps for simulation tests: the real client's handlers, with `train` (and
optionally `evaluate`) replaced by a test's own (which usually calls the real one and
then misbehaves), and two ways to run such an app against the real coordinator: the
real Flower simulation (Ray; for what the engine does) and the same federation in
process (for what the coordinator and the sites do: seconds, not a Ray cluster)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

ROOT = Path(__file__).resolve().parents[2]
Handler = Callable[[Message, Context], Message]


def client_app_with_train(train: Handler, evaluate: Handler | None = None, notes_node_ids: bool = False) -> ClientApp:
    """`notes_node_ids`: each virtual site notes its node id in the run directory, as in
    `fedlora simulate` (the coordinator then calls it "site <partition-id>")."""
    from fedlora.client.site_data import VirtualSites
    from fedlora.simulations.virtual_node_ids import NotesNodeId
    from fedlora.simulations.virtual_sites import partition_rows

    app = ClientApp(mods=[VirtualSites(partition_rows), *([NotesNodeId()] if notes_node_ids else [])])
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


class VirtualSitesGrid:
    """A Grid that hands each message to `app` for its virtual site (node config
    `partition-id`), with that node's own Context kept between messages, as the
    simulation engine does; an exception in the app becomes the engine's error reply."""

    def __init__(self, app: ClientApp, sites: int):
        self.app = app
        self.contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                                    node_config={"partition-id": n - 1, "num-partitions": sites})
                         for n in range(1, sites + 1)}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        from flwr.common.constant import ErrorCode

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - as the engine: the coordinator gets an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=msg)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def run_in_process(app: ClientApp, run_dir: Path, monkeypatch: pytest.MonkeyPatch, sites: int,
                   overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """`run_small_simulation`'s federation without the engine: the real coordinator
    (run_federation) and `app` at `sites` virtual sites, one message at a time, in this
    process. Returns metrics.jsonl's rows; exceptions from the coordinator propagate."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.config import load_config
    from fedlora.server.federation import run_federation
    from fedlora.simulations.runner import prepare

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what the ServerApp process sets
        monkeypatch.setattr(TaskIdentity, attr, value)
    config = prepare(load_config(None, {
        "run.output_dir": str(run_dir), "simulation.clients": sites, "simulation.dataset_size": 300,
        "train.local_steps": 1, "train.batch_size": 16, **overrides,
    }))
    try:
        run_federation(VirtualSitesGrid(app, sites), config)
    finally:
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return rows

"""One message through a site's real ClientApp, as Flower delivers it (`send`), and a
tiny BERT site to send it to (the `site` fixture: its run config and node config)."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.adapter_state import adapter_of, to_record
from fedlora.base_model import build_peft_model
from fedlora.config import Config, load_config
from fedlora.messages import config_record
from tests.helpers.site_data import write_site_data


def send(config: Config, node_config: dict, message_type: str = MessageType.TRAIN, server_round: int = 1, app=None) -> Message:
    """One message through the site's ClientApp (handlers and mods), as Flower delivers it."""
    if app is None:
        from fedlora.client.client_app import app

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    model = build_peft_model(config.model, config.lora, num_labels=max(1, len(config.data.labels)), seed=config.run.seed)
    msg = Message(content=RecordDict({"arrays": to_record(adapter_of(model)), "config": config_record(config, server_round)}),
                  dst_node_id=7, message_type=message_type, group_id=str(server_round))
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    return app(msg, context)


@pytest.fixture
def site(tmp_path, tiny_models):
    config = load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "run.output_dir": str(tmp_path / "run"),
        "federation.rounds": 4, "train.local_steps": 2, "train.batch_size": 16, "privacy.target_epsilon": 4.0,
        "federation.evaluate_every": 1,
    })
    node = {"data-path": str(write_site_data(tmp_path / "notes.jsonl", users=30)), "state-dir": str(tmp_path / "state"), "labels": "a,b,c"}
    return config, node

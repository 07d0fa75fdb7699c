"""Deployed-style sites in process: the real site ClientApp behind a Grid that delivers
each message to it (`InProcessGrid`), five such sites with their own node keys, data and
state (`federation`, `NODES`), the coordinator's task identity (`coordinator_identity`),
and one secure round over them (`attempt`)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from fedlora.adapter_state import adapter_of
from fedlora.base_model import build_peft_model
from fedlora.client.client_app import app as site_app
from fedlora.client.model_cache import cached_model
from fedlora.client.site_keys import create_site_key
from fedlora.config import load_config
from fedlora.server.message_exchange import Envelope
from fedlora.server.progress import Progress
from fedlora.server.secure_round import secure_train
from tests.helpers.site_data import write_site_data

NODES = [12231148781181418480, 2396574274762215067, 77, 9_000_000_000_000_000_001, 5]  # uint64 ids, as Flower's


class InProcessGrid:
    """Delivers each message to the real site ClientApp of its node, with that node's own
    Context kept between messages (as its SuperNode does). `drop[node]` lists the message
    types the node never answers (it went away): the reply is the SuperLink's error.
    `tamper(msg)` may alter a message on its way down (a malicious coordinator)."""

    def __init__(self, node_configs: dict[int, dict], drop: dict[int, set[str]] | None = None,
                 tamper: Callable[[Message], None] | None = None):
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config={})
                         for n, c in node_configs.items()}
        self.drop, self.tamper = drop or {}, tamper
        self.replies: dict[str, Message] = {}
        self.trained: dict[int, dict[str, torch.Tensor]] = {}  # node -> its adapter right after training

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type in self.drop.get(node, set()):
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg)
            else:
                if self.tamper:
                    self.tamper(msg)
                reply = site_app(msg, self.contexts[node])
                if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
                    config = load_config(None, {k: v for k, v in msg.content["config"].items() if not k.startswith("fedlora.")})
                    self.trained[node] = {k: v.clone() for k, v in adapter_of(cached_model(config, config.data.labels).model).items()}
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.fixture
def coordinator_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture
def federation(tmp_path, tiny_models, coordinator_identity):
    """Five deployed-style sites: each its own node key, data file and state dir, and one
    peer-keys file with every site's public key."""
    config = load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "run.output_dir": str(tmp_path / "run"),
        "federation.rounds": 2, "train.local_steps": 1, "train.batch_size": 16, "federation.secure_aggregation": True,
        "federation.round_timeout": 5.0,
    })
    publics = []
    nodes = {}
    for i, n in enumerate(NODES):
        private, public = create_site_key(tmp_path / "keys", f"site-{i}")
        publics.append(public.read_text())
        nodes[n] = {"data-path": str(write_site_data(tmp_path / f"site-{i}.jsonl", rows=60 + 20 * i)),
                    "state-dir": str(tmp_path / f"state-{i}"), "node-key": str(private), "max-epsilon": 20.0,
                    "labels": "a,b,c"}
    peer_keys = tmp_path / "consortium.pub"
    peer_keys.write_text("".join(publics))
    for node_config in nodes.values():
        node_config["peer-keys"] = str(peer_keys)
    model = build_peft_model(config.model, config.lora, num_labels=3, seed=config.run.seed)
    return config, nodes, adapter_of(model)


def attempt(config, nodes, global_adapter, **grid_options):
    grid = InProcessGrid(nodes, **grid_options)
    result = secure_train(grid, Envelope(config, ""), dict.fromkeys(nodes, global_adapter), (), 1, Progress(2, io.StringIO()))
    return grid, result

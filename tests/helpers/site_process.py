"""One ClientApp `train` call, in this process, as Flower's deployment engine makes it
(a fresh process per message). Run as a script, it prints the reply's metrics as JSON:

    python -m tests.helpers.site_process CONFIG.toml ROUND '{"state-dir": "...", "data-path": "..."}'
"""

from __future__ import annotations

import json
import sys
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.adapter_state import adapter_of, to_record
from fedlora.base_model import build_peft_model
from fedlora.config import Config, load_config
from fedlora.messages import config_record


def train_once(config: Config, server_round: int, node_config: dict[str, Any], node_id: int = 7) -> Message:
    """The reply of client_app.train to the round's message carrying the initial adapter."""
    from fedlora.client.client_app import train

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, node_id
    model = build_peft_model(config.model, config.lora, num_labels=len(config.data.labels), seed=config.run.seed)
    msg = Message(
        content=RecordDict({"arrays": to_record(adapter_of(model)), "config": config_record(config, server_round)}),
        dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(server_round),
    )
    context = Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})
    return train(msg, context)


if __name__ == "__main__":
    reply = train_once(load_config(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
    print(json.dumps(dict(reply.content["metrics"])))

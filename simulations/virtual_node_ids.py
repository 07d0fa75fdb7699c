"""Each virtual site notes its Flower node id in its own folder of the run directory,
RUN_DIR/sites/<partition-id>/node-id, so that the coordinator's console lines and the
report call it "site <partition-id>" (server/site_names.py): a simulation's node ids are
random, and the coordinator has no other way to tell which partition a node serves.
One machine runs every party of a simulation; a deployed site has no such file."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora.atomic_file import write_atomic
from fedlora.server.site_names import VIRTUAL_NODE_FILE

RUN_DIR_KEY = "run.output_dir"  # the run config's key, as the config record carries it


class NotesNodeId:
    """A ClientApp mod (module-level, so the simulation engine ships it by reference)."""

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if "partition-id" in context.node_config and "config" in msg.content.config_records:
            run_dir = msg.content["config"].get(RUN_DIR_KEY)
            if run_dir:
                note_node_id(Path(str(run_dir)) / "sites" / str(int(context.node_config["partition-id"])), context.node_id)
        return call_next(msg, context)


def note_node_id(site_dir: Path, node_id: int) -> None:
    path = site_dir / VIRTUAL_NODE_FILE
    if path.is_file():
        return
    site_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, f"{node_id}\n")  # never half-written: the coordinator may read it at any time

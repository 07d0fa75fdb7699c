"""One ClientApp `train` call, in this process, as Flower's deployment engine makes it
(a fresh process per message). Run as a script, it prints the reply's metrics as JSON:

    python -m tests.helpers.site_process CONFIG.toml ROUND '{"state-dir": "...", "data-path": "..."}'

`fresh_processes` runs scripts each in a fresh process as a deployed site does: forked from
one server that imported the third-party modules and none of fedlora's handlers
(client/pinned_clientapp.py's task server), so each costs milliseconds, not 9 s of imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
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


# The task server's warm-up, then a fork per job line on stdin: the child runs the job's
# script as __main__ with its argv and its output in a file; the server answers the exit code.
_FORK_SERVER = """
import json, os, sys, traceback
from fedlora.client.pinned_clientapp import warm_imports
warm_imports()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        code = 0
        try:
            sys.argv = ["-c", *job["argv"]]
            exec(compile(job["script"], "<job>", "exec"), {"__name__": "__main__"})
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def fresh_processes(jobs: list[tuple[str, list[str]]], cwd: Path, folder: Path) -> list[tuple[int, str]]:
    """Each (script, argv) in a fresh process, one after another; their (exit code, output)."""
    server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], cwd=cwd, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    results = []
    try:
        for number, (script, argv) in enumerate(jobs):
            output = folder / f"fresh-process-{number}.log"
            server.stdin.write(json.dumps({"script": script, "argv": argv, "output": str(output)}) + "\n")
            server.stdin.flush()
            results.append((int(server.stdout.readline() or 1), output.read_text() if output.exists() else ""))
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    return results


if __name__ == "__main__":
    reply = train_once(load_config(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
    print(json.dumps(dict(reply.content["metrics"])))

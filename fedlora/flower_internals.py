"""Every part of Flower's internals that fedlora relies on, in one table.

App pinning (client/pinned_clientapp.py), the site executor (client/site_executor.py)
and the app hash (fedlora/app_hash.py) run Flower's own steps in fedlora's order, so
they use functions that are not Flower's public API. They are named here, with what
fedlora passes them, so that a Flower upgrade fails in tests/test_flower_internals.py
first, naming the internal that moved, instead of at a site's first task.

Names resolve on first use (PEP 562 `__getattr__`): importing this module loads no
part of Flower, and each caller still imports only what it uses.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute, the keyword or positional parameters fedlora passes)
INTERNALS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # the error codes and record kinds a reply is checked against (client/reply_guard.py,
    # server/site_replies.py)
    "SType": ("flwr.common.constant", "SType", ()),
    # the pinned ClientApp process (client/pinned_clientapp.py; ErrorCode: also the reply guard)
    "LoadClientAppError": ("flwr.clientapp.client_app", "LoadClientAppError", ()),
    "load_app": ("flwr.supercore.object_ref", "load_app", ("module_attribute_str", "error_type", "project_dir")),
    "install_from_fab": ("flwr.cli.install", "install_from_fab", ("fab_file", "skip_prompt")),
    "get_project_dir": ("flwr.common.config", "get_project_dir", ("fab_id", "fab_version", "fab_hash")),
    "ErrorCode": ("flwr.common.constant", "ErrorCode", ()),
    "SubStatus": ("flwr.common.constant", "SubStatus", ()),
    "HeartbeatSender": ("flwr.supercore.heartbeat", "HeartbeatSender", ()),
    "make_task_heartbeat_fn_http": ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http", ()),
    "RuntimeTokenHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", ()),
    "RuntimeVersionHttpInterceptor": ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",)),
    "make_simple_http_retry_invoker": ("flwr.supercore.retry", "make_simple_http_retry_invoker", ()),
    "RuntimeHttpClient": ("flwr.supercore.runtime", "RuntimeHttpClient", ()),
    "pull_task_input": ("flwr.supernode.runtime.run_clientapp", "pull_task_input", ()),
    "push_message": ("flwr.supernode.runtime.run_clientapp", "push_message", ()),
    "push_task_output": ("flwr.supernode.runtime.run_clientapp", "push_task_output", ("client", "context", "sub_status", "details")),
    "start_parent_process_monitor": ("flwr.supercore.app_utils", "start_parent_process_monitor", ()),
    # the site executor (client/site_executor.py)
    "AcquireTaskRequest": ("flwr.proto.runtime_pb2", "AcquireTaskRequest", ()),
    "TaskType": ("flwr.supercore.constant", "TaskType", ()),
    "SuperExecAuthHttpInterceptor": ("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor",
                                     ("master_secret", "protected_methods")),
    "load_superexec_auth_secret": ("flwr.supercore.auth", "load_superexec_auth_secret", ()),
    # the app hash (fedlora/app_hash.py): Flower's own FAB builder and its .gitignore rules
    "build_fab_from_files": ("flwr.cli.build", "build_fab_from_files", ()),
    "build_pathspec": ("flwr.cli.utils", "build_pathspec", ()),
    "load_gitignore_patterns": ("flwr.cli.utils", "load_gitignore_patterns", ()),
}


def __getattr__(name: str) -> Any:
    if name not in INTERNALS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute, _ = INTERNALS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup is a plain one
    return value


# The coordinator's registered site keys (server/registered_keys.py): Flower's SuperLink keeps
# each registered node's public key (PEM) in its database's `node` table, node ids as signed
# 64-bit integers; an unregistered node keeps its row with status "unregistered". Read here,
# read-only, as Flower's own node authentication reads it (SqlLinkState.get_node_id_by_public_key).
SUPERLINK_NODE_KEYS_SQL = "SELECT node_id, public_key FROM node WHERE status != 'unregistered' AND public_key IS NOT NULL"


def registered_node_keys(database: Any) -> dict[int, bytes]:
    """node id -> the PEM public key a SuperLink's database registers for it (nodes not
    unregistered). `database`: the path of the SuperLink's `--database` file."""
    import sqlite3
    from pathlib import Path

    connection = sqlite3.connect(f"{Path(database).resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        rows = connection.execute(SUPERLINK_NODE_KEYS_SQL).fetchall()
    finally:
        connection.close()
    return {int(node) & 0xFFFF_FFFF_FFFF_FFFF: bytes(key) for node, key in rows}

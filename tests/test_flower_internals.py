"""Each part of Flower's internals that fedlora relies on (fedlora/flower_internals.py)
is still where fedlora looks for it and takes what fedlora passes: after a Flower
upgrade, this file fails first and names the internal that moved."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora import flower_internals
from fedlora.flower_internals import INTERNALS

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("fedlora", "client", "server", "strategies", "privacy", "simulations")
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation")  # Flower's documented API

# What fedlora uses beyond a name and its parameters: members and methods.
MEMBERS = {
    "ErrorCode": ("INVALID_FAB", "CLIENT_APP_RAISED_EXCEPTION"),
    "SubStatus": ("FAILED", "COMPLETED"),
    "TaskType": ("CLIENT_APP",),
    "SType": ("NUMPY",),
}
METHODS = {  # (name, method) -> the parameters fedlora passes
    ("RuntimeHttpClient", "from_server_address"): ("server_address", "insecure", "root_certificates", "interceptors",
                                                   "retry_invoker"),
    ("RuntimeHttpClient", "AcquireTask"): (),
    ("HeartbeatSender", "start"): (),
    ("HeartbeatSender", "stop"): (),
}


@pytest.mark.parametrize("name", sorted(INTERNALS))
def test_each_internal_is_where_fedlora_looks_and_takes_what_it_passes(name):
    module, attribute, params = INTERNALS[name]
    value = getattr(importlib.import_module(module), attribute, None)
    assert value is not None, f"Flower moved {module}.{attribute} (fedlora.flower_internals.{name})"
    assert getattr(flower_internals, name) is value
    if params:
        missing = [p for p in params if p not in inspect.signature(value).parameters]
        assert not missing, f"{module}.{attribute} no longer takes {missing}"
    for member in MEMBERS.get(name, ()):
        assert hasattr(value, member), f"{module}.{attribute} has no {member}"
    for (owner, method), method_params in METHODS.items():
        if owner == name:
            bound = getattr(value, method, None)
            assert bound is not None, f"{module}.{attribute} has no {method}"
            if method_params:
                missing = [p for p in method_params if p not in inspect.signature(bound).parameters]
                assert not missing, f"{module}.{attribute}.{method} no longer takes {missing}"


def test_pull_task_input_still_gives_message_context_run_and_fab():
    """client/pinned_clientapp.py unpacks four values and reads run.run_id, run.fab_id,
    run.fab_version, fab.content and fab.hash_str."""
    from flwr.app import Context, Message
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    returned = inspect.signature(flower_internals.pull_task_input).return_annotation
    assert returned == tuple[Message, Context, Run, Fab], returned
    run_fields = inspect.signature(Run).parameters
    assert {"run_id", "fab_id", "fab_version"} <= set(run_fields), list(run_fields)
    assert {"content", "hash_str"} <= set(inspect.signature(Fab).parameters)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        flower_internals.nothing_here  # noqa: B018


def test_fedlora_reaches_flower_internals_only_through_the_table():
    """Outside fedlora/flower_internals.py, fedlora imports only Flower's public API."""
    import ast

    offenders = []
    for folder in FLOORS:
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "flower_internals.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for name in names:
                    if name.startswith("flwr") and not name.startswith(PUBLIC):
                        offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_importing_the_table_loads_no_part_of_flower():
    probe = "import sys, fedlora.flower_internals; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_registered_node_keys_reads_the_keys_flowers_superlink_registered(tmp_path):
    """server/registered_keys.py reads the coordinator's registered site keys from its
    SuperLink's database: a node Flower's own LinkState registers is found with its key
    (a uint64 node id, stored signed), and an unregistered one is not."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    database = tmp_path / "superlink.db"
    state = LinkStateFactory(str(database), NoOpFederationManager(), ObjectStoreFactory()).state()
    keys = [public_key_to_bytes(ec.generate_private_key(ec.SECP384R1()).public_key()) for _ in range(3)]
    nodes = [state.create_node("owner", "operator", key, 30.0) for key in keys]
    state.delete_node("owner", nodes[2])  # `fedlora unregister-site`
    assert flower_internals.registered_node_keys(database) == {nodes[0]: keys[0], nodes[1]: keys[1]}

"""The coordinator's log lines name a site as its reports and console lines do
(server/site_names.py): "north-clinic (node 2)" where the operator named it, "site 1"
for a simulation's virtual site, its node id otherwise. The real coordinator and three
virtual sites in process: one site's training raises (an error reply), another sends a
non-finite update (rejected)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedlora.server import site_names
from tests.helpers.client_apps import client_app_with_train, run_in_process


def train(msg: Message, context: Context) -> Message:
    from fedlora.adapter_state import from_record, to_record
    from fedlora.client.client_app import train as honest_train

    partition = int(context.node_config["partition-id"])
    if partition == 1:
        raise RuntimeError("disk full")  # the engine's error reply
    reply = honest_train(msg, context)
    if partition == 2:
        adapter = {k: torch.full_like(v, float("nan")) for k, v in from_record(reply.content["arrays"]).items()}
        reply = Message(content=RecordDict({"arrays": to_record(adapter), "metrics": reply.content["metrics"]}), reply_to=msg)
    return reply


deployed = client_app_with_train(train)
simulated = client_app_with_train(train, notes_node_ids=True)


def run(app, tmp_path, monkeypatch, caplog) -> tuple[list[str], list[dict]]:
    with caplog.at_level(logging.INFO, logger="fedlora.server"):
        rows = run_in_process(app, tmp_path / "run", monkeypatch, 3, {"federation.rounds": 1, "federation.min_clients": 1})
    return [r.getMessage() for r in caplog.records if r.name == "fedlora.server"], rows


@pytest.mark.slow
def test_a_deployments_log_lines_name_the_operators_sites(tmp_path, monkeypatch, caplog, capsys):
    coordinator = tmp_path / "coordinator"  # a deployed ServerApp runs in the coordinator's state dir
    coordinator.mkdir()
    site_names.record(coordinator, 2, "north-clinic")  # node 3 has no name: its node id
    monkeypatch.chdir(coordinator)
    lines, rows = run(deployed, tmp_path, monkeypatch, caplog)
    assert "round 1 train: north-clinic (node 2) failed: RuntimeError: disk full" in lines, lines
    assert any(line.startswith("round 1: update from node 3 rejected: ") for line in lines), lines
    assert not [line for line in lines if "node 2" in line and "north-clinic (node 2)" not in line], lines
    # The console line and the run's record call the site the same.
    assert "round 1: north-clinic (node 2) train: error: other; node 3 train: rejected: non-finite" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / site_names.RUN_NAMES_FILE).read_text()) == {"2": "north-clinic (node 2)"}
    assert [s["node"] for s in rows[1]["sites"] if s["train"] != "ok"] == [2, 3]


def test_a_simulations_log_lines_name_its_virtual_sites(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # no operator's names here
    lines, _ = run(simulated, tmp_path, monkeypatch, caplog)
    assert "round 1 train: site 1 failed: RuntimeError: disk full" in lines, lines
    assert any(line.startswith("round 1: update from site 2 rejected: ") for line in lines), lines
    assert not [line for line in lines if "node " in line], lines

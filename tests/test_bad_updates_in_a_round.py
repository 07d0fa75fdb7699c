"""A site that sends a broken update (NaN) or a hostile one (a huge norm) is rejected
and counted, and the round completes with the others: the real coordinator and five
virtual sites in process, two of whose ClientApps corrupt what the real client code
would have sent."""

from __future__ import annotations


import pytest
import torch
from flwr.app import Context, Message, RecordDict
from tests.helpers.client_apps import client_app_with_train, run_in_process



def train(msg: Message, context: Context) -> Message:
    from fedlora.client.client_app import train as honest_train
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


@pytest.mark.slow
def test_nan_and_huge_norm_updates_are_rejected_and_the_round_completes(tmp_path, monkeypatch):
    rows = run_in_process(attacked, tmp_path / "run", monkeypatch, 5, {"federation.rounds": 1, "federation.min_clients": 3})
    assert rows[1]["clients_ok"] == 3 and rows[1]["updates_rejected"] == 2 and rows[1]["clients_failed"] == 2
    assert rows[1]["failures"] == {"rejected: non-finite": 1, "rejected: outlier": 1}
    sites = rows[1]["sites"]
    assert sorted(s["train"] for s in sites) == ["ok", "ok", "ok", "rejected: non-finite", "rejected: outlier"]
    assert all((s["evaluate"] == "ok") == (s["train"] == "ok") for s in sites)  # only the aggregated sites evaluate
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

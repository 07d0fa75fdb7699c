"""Site-controlled privacy in federations of the real ClientApp: an audit of every
message a client sends (the default pretrained model, error replies included), and a
label column of names that never reaches the coordinator. Both run the real coordinator
and the real sites in process (tests/helpers/client_apps.run_in_process): what they test
is what a site's handlers and reply guard let out, which is the same whichever engine
carries it; the engine's own runs are in tests/test_simulation.py. Sites declining at
their limits: tests/test_site_limits_in_a_federation.py."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import load_config
from tests.helpers.client_apps import run_in_process


# --- The real ClientApp with a mod that records every reply it sends, each pickled into a
# folder the test reads.
def record_outgoing(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    content = reply.content if reply.has_content() else RecordDict()
    captured = {
        "type": msg.metadata.message_type,
        "array_records": {name: {k: (a.dtype, tuple(a.shape), a.data) for k, a in rec.items()}
                          for name, rec in content.array_records.items()},
        "metric_records": {name: dict(rec) for name, rec in content.metric_records.items()},
        "config_records": {name: dict(rec) for name, rec in content.config_records.items()},
        "error": reply.has_error(),
        "reason": reply.error.reason if reply.has_error() else None,
    }
    folder = Path(os.environ["FEDLORA_AUDIT_DIR"])
    (folder / f"{os.getpid()}-{msg.metadata.message_id}.pkl").write_bytes(pickle.dumps(captured))
    return reply


def audited_app() -> ClientApp:
    """The real handlers behind the real reply guard; the recorder sees what leaves it."""
    from fedlora.client.client_app import evaluate, query, train
    from fedlora.client.reply_guard import guarded_replies
    from fedlora.client.site_data import VirtualSites
    from fedlora.simulations.virtual_sites import partition_rows

    app = ClientApp(mods=[record_outgoing, guarded_replies, VirtualSites(partition_rows)])
    app.train()(train)
    app.evaluate()(evaluate)
    app.query()(query)
    return app


audited = audited_app()


CANARY = "zebracanary"


@pytest.mark.slow
def test_every_message_a_client_sends_holds_only_adapter_tensors_and_whitelisted_scalars(tmp_path, monkeypatch):
    from fedlora.messages import DECLINED_METRICS, EVALUATE_METRICS, QUERY_METRICS, TRAIN_METRICS
    from fedlora.privacy.privacy_statement import check_statement

    labels = ["ward-north", "ward-south", "ward-east"]
    data = tmp_path / "notes.jsonl"
    with data.open("w") as fh:
        for i in range(300):
            text = f"{CANARY} patient {i} reports {['chest pain', 'a broken wrist', 'an itchy rash'][i % 3]}"
            fh.write(json.dumps({"text": text, "label": labels[i % 3], "user_id": f"mrn-{i % 40:05d}"}) + "\n")
    audit = tmp_path / "audit"
    audit.mkdir()
    monkeypatch.setenv("FEDLORA_AUDIT_DIR", str(audit))
    overrides = {"simulation.dataset": str(data), "simulation.partition": "iid", "federation.rounds": 2,
                 "privacy.unit": "user", "simulation.dataset_size": 600, "train.batch_size": 16, "train.local_steps": 2,
                 "federation.evaluate_every": 1}
    rows = run_in_process(audited, tmp_path / "run", monkeypatch, 3, overrides)
    config = load_config(None, {**overrides, "run.output_dir": str(tmp_path / "run")})
    assert rows[-1]["round"] == 2 and rows[-1]["clients_ok"] == 3

    from fedlora.base_model import build_peft_model
    from fedlora.adapter_state import adapter_of

    adapter = adapter_of(build_peft_model(config.model, config.lora, num_labels=3, seed=0))
    whitelist = {"train": set(TRAIN_METRICS) | set(DECLINED_METRICS), "evaluate": set(EVALUATE_METRICS), "query": set(QUERY_METRICS)}
    replies = [pickle.loads(p.read_bytes()) for p in audit.iterdir()]
    assert sorted({r["type"] for r in replies}) == ["evaluate", "query", "train"]
    assert sum(r["type"] == "train" for r in replies) == 6  # 3 sites x 2 rounds, every one captured
    secrets = [CANARY, "mrn-0", "chest pain", *labels]
    for reply in replies:
        assert not reply["error"]
        if reply["type"] in ("train", "evaluate"):
            # The site's signed privacy statement: exactly its fixed, typed fields, each the run's
            # config or an epsilon the reply's metrics carry (privacy/privacy_statement.py).
            assert set(reply["config_records"]) == {"statement"}
            fields = check_statement(reply["config_records"]["statement"])
            assert (fields["run"], fields["message"], fields["unit"], fields["dp-mode"]) == (
                config.run.output_dir, reply["type"], "user", "local")
            assert fields["total-epsilon"] == reply["metric_records"]["metrics"]["epsilon"]
        else:
            assert reply["config_records"] == {}
        assert set(reply["metric_records"]) <= {"metrics"}
        for key, value in reply["metric_records"].get("metrics", {}).items():
            assert key in whitelist[reply["type"]]
            assert isinstance(value, (int, float)) and not isinstance(value, bool)
        if reply["type"] == "train":
            (arrays,) = reply["array_records"].values()
            assert set(arrays) == set(adapter)  # exactly the adapter's tensors: nothing else rides along
            for key, (dtype, shape, raw) in arrays.items():
                assert dtype == "float32" and shape == tuple(adapter[key].shape)  # no token ids, no labels
                for secret in secrets:
                    assert secret.encode() not in raw
        else:
            assert reply["array_records"] == {}
        assert not any(s in json.dumps([reply["metric_records"], reply["config_records"]], default=repr) for s in secrets)


NAMES = ["Jane Doe", "John Roe", "Ada Lovelace"]


@pytest.mark.slow
def test_a_label_column_of_patient_names_never_reaches_the_coordinator(tmp_path, monkeypatch, capfd):
    """The coordinator points data.label_column at a column of patient names. Partition 0
    keeps to its own label column and declines; the others follow the run (a simulation
    policy that leaves the columns to the run) and fail on the names: as a category."""
    data = tmp_path / "notes.jsonl"
    with data.open("w") as fh:
        for i in range(150):
            fh.write(json.dumps({"text": f"note {i} about a cough", "label": "abc"[i % 3], "patient": NAMES[i % 3]}) + "\n")
    audit = tmp_path / "audit"
    audit.mkdir()
    monkeypatch.setenv("FEDLORA_AUDIT_DIR", str(audit))
    from fedlora.server.message_exchange import FederationError

    # The driver refuses these labels on the operator's machine before Ray starts
    # (simulations/label_check.py); what is tested here is the sites, so it stands aside.
    monkeypatch.setattr("fedlora.simulations.runner.check_labels", lambda *_args, **_kwargs: None)
    with pytest.raises(FederationError, match="fewer than federation.min_clients"):  # no site can train
        run_in_process(own_label_column_site, tmp_path / "run", monkeypatch, 3, {
            "simulation.dataset": str(data), "simulation.partition": "iid", "federation.rounds": 1,
            "federation.round_retries": 0, "data.label_column": "patient", "data.labels": ["x", "y", "z"],
        })
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["failures"] == {"declined: site policy: label-column": 1, "error: data error": 2}
    replies = [pickle.loads(p.read_bytes()) for p in audit.iterdir()]
    assert {r["reason"] for r in replies if r["error"]} == {"data error"}
    received = json.dumps(replies, default=repr)
    seen = capfd.readouterr()
    for name in NAMES:
        assert name not in received  # replies and error reasons
        assert name not in (tmp_path / "run" / "metrics.jsonl").read_text()
        assert name not in seen.out + seen.err  # the coordinator's log (and, in a simulation, the sites')


def _own_label_column(msg: Message, context: Context, call_next) -> Message:
    if int(context.node_config["partition-id"]) == 0:
        context.node_config = {**context.node_config, "label-column": "label"}
    return call_next(msg, context)


def own_label_column_app() -> ClientApp:
    from fedlora.client.client_app import evaluate, query, train
    from fedlora.client.reply_guard import guarded_replies
    from fedlora.client.site_data import VirtualSites
    from fedlora.simulations.virtual_sites import partition_rows

    app = ClientApp(mods=[record_outgoing, guarded_replies, _own_label_column, VirtualSites(partition_rows)])
    app.train()(train)
    app.evaluate()(evaluate)
    app.query()(query)
    return app


own_label_column_site = own_label_column_app()

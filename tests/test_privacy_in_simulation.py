"""Site-controlled privacy in real simulations (Flower's simulation engine, the
default pretrained model): sites declining at the round their limits say or
calibrating to their limits, their ledgers, central DP's accounting, and an audit of
every message a client sends, error replies included."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.privacy.accounting import epsilon_of
from tests.helpers.client_apps import client_app_with_train

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parent.parent

# --- A ClientApp whose partition 0 is a stricter site: its node config sets max-epsilon,
# and it calibrates its noise to that limit instead of declining.
STRICT_LIMIT = 6.5


def _with_node_config(context: Context) -> Context:
    if int(context.node_config["partition-id"]) == 0:
        context.node_config = {**context.node_config, "max-epsilon": STRICT_LIMIT, "calibrate-to-limit": True}
    return context


def strict_train(msg: Message, context: Context) -> Message:
    from fedlora.client.client_app import train

    return train(msg, _with_node_config(context))


strict_site = client_app_with_train(strict_train)


# --- The real ClientApp with a mod that records every reply it sends (Ray workers are
# separate processes, so each reply is pickled into a folder the test reads).
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


def run(tmp_path, monkeypatch, client_app, overrides: dict, clients: int):
    from flwr.simulation import run_simulation

    from fedlora.config import load_config
    from fedlora.flower_env import FLOWER_OFFLINE_ENV
    from fedlora.server.server_app import make_server_app
    from fedlora.simulations.runner import prepare

    for k, v in FLOWER_OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = prepare(load_config(None, {
        "run.output_dir": str(tmp_path / "run"), "simulation.clients": clients, "simulation.cpus_per_client": 1,
        "simulation.dataset_size": 600, "train.batch_size": 16, "train.local_steps": 2,
        "federation.evaluate_every": 1, **overrides,
    }))
    run_simulation(make_server_app(config), client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return config, rows


def ledger_json(state_dir: Path, capsys) -> dict:
    from fedlora.cli import main

    assert main(["privacy", str(state_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sites_decline_at_the_round_their_limits_say_or_calibrate_to_them(tmp_path, monkeypatch, capsys):
    config, rows = run(tmp_path, monkeypatch, strict_site, {
        "federation.rounds": 3, "federation.min_clients": 2, "privacy.site_max_epsilon": 7.5, "simulation.partition": "iid",
        "simulation.site_policy.calibrate_to_limit": False,
        "privacy.central": True, "privacy.central_noise_multiplier": 0.5, "privacy.central_clip_norm": 5.0,
    }, clients=4)
    sites = tmp_path / "run" / "sites"
    ledgers = {pid: ledger_json(sites / str(pid), capsys) for pid in range(4)}

    # Partitions 1-3 plan the run's 8 (3 rounds and 4 evaluations) but stop at the run's
    # site_max_epsilon = 7.5 without more noise: round 3 is declined by all three, and with
    # one site left (fewer than min_clients) the run ends cleanly.
    assert [r["clients_ok"] for r in rows] == [0, 4, 4, 0]
    assert [r["clients_declined"] for r in rows] == [0, 0, 0, 3]
    assert rows[3]["failures"] == {"declined: privacy budget": 3}
    # The run says it ended early, and that partition 0 trained round 3 (spending budget) for nothing.
    assert [r["ended_early"] for r in rows[1:]] == [False, False, True]
    assert [r["clients_discarded"] for r in rows[1:]] == [0, 0, 1]
    assert len(rows) == 4 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    for pid in (1, 2, 3):
        (site_run,) = ledgers[pid]["runs"]
        assert [(r["kind"], r["round"]) for r in site_run["rounds"]] == [
            ("evaluation", 0), ("train", 1), ("evaluation", 1), ("train", 2), ("evaluation", 2)]
        assert [d["round"] for d in site_run["declined"]] == [3]
        assert site_run["epsilon"] <= 7.5 < site_run["declined"][0]["epsilon_would_be"]
    planned = sorted(s["planned_epsilon"] for s in rows[1]["site_privacy"])  # listed by node id, not partition
    assert planned[1:] == pytest.approx([config.privacy.target_epsilon] * 3, rel=0.02)

    # Partition 0's own limit (6.5) is below the run's plan: it adds noise and trains every round.
    (strict_run,) = ledgers[0]["runs"]
    assert [r["round"] for r in strict_run["rounds"] if r["kind"] == "train"] == [1, 2, 3]
    assert strict_run["declined"] == []
    assert ledgers[0]["max_epsilon"] == STRICT_LIMIT and STRICT_LIMIT - 0.3 < ledgers[0]["epsilon_total"] <= STRICT_LIMIT
    strict_noise = [r["noise_multiplier"] for r in strict_run["rounds"] if r["kind"] == "train"]
    other_noise = [r["noise_multiplier"] for r in ledgers[1]["runs"][0]["rounds"] if r["kind"] == "train"]
    assert min(strict_noise) > max(other_noise)
    assert planned[0] == pytest.approx(STRICT_LIMIT, abs=0.05)

    # The coordinator's figures are the sites' own: the largest epsilon any site reached.
    assert rows[3]["epsilon_max"] == pytest.approx(max(ledger["epsilon_total"] for ledger in ledgers.values()))

    # Central DP: one Gaussian mechanism per aggregated round over all sites (q = 1).
    assert rows[1]["central_epsilon"] == pytest.approx(epsilon_of([(0.5, 1.0, 1)], config.privacy.delta, "prv"), rel=1e-9)
    assert rows[2]["central_epsilon"] == pytest.approx(epsilon_of([(0.5, 1.0, 1)] * 2, config.privacy.delta, "prv"), rel=1e-9)
    assert rows[2]["central_noise_std"] == pytest.approx(0.5 * 5.0 / 4)


CANARY = "zebracanary"


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
    config, rows = run(tmp_path, monkeypatch, audited, {
        "simulation.dataset": str(data), "simulation.partition": "iid", "federation.rounds": 2, "privacy.unit": "user",
    }, clients=3)
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
        run(tmp_path, monkeypatch, own_label_column_site, {
            "simulation.dataset": str(data), "simulation.partition": "iid", "federation.rounds": 1,
            "federation.round_retries": 0, "data.label_column": "patient", "data.labels": ["x", "y", "z"],
        }, clients=3)
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

"""Site-controlled privacy in real simulations (Flower's simulation engine, the
default pretrained model): sites declining at the round their limits say, their
ledgers, central DP's accounting, and an audit of every message a client sends."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from privacy.accounting import epsilon_of
from tests.client_apps import client_app_with_train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

# --- A ClientApp whose partition 0 is a stricter site: its node config sets max-epsilon.
STRICT_LIMIT = 6.5


def _with_node_config(context: Context) -> Context:
    if int(context.node_config["partition-id"]) == 0:
        context.node_config = {**context.node_config, "max-epsilon": STRICT_LIMIT}
    return context


def strict_train(msg: Message, context: Context) -> Message:
    from client.client_app import train

    return train(msg, _with_node_config(context))


strict_site = client_app_with_train(strict_train)


# --- The real ClientApp with a mod that records every reply it sends (Ray workers are
# separate processes, so each reply is pickled into a folder the test reads).
def record_outgoing(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    content = reply.content
    captured = {
        "type": msg.metadata.message_type,
        "array_records": {name: {k: (a.dtype, tuple(a.shape), a.data) for k, a in rec.items()}
                          for name, rec in content.array_records.items()},
        "metric_records": {name: dict(rec) for name, rec in content.metric_records.items()},
        "config_records": {name: dict(rec) for name, rec in content.config_records.items()},
        "error": reply.has_error(),
    }
    folder = Path(os.environ["FEDLORA_AUDIT_DIR"])
    (folder / f"{os.getpid()}-{msg.metadata.message_id}.pkl").write_bytes(pickle.dumps(captured))
    return reply


def audited_app() -> ClientApp:
    from client.client_app import evaluate, query, train

    app = ClientApp(mods=[record_outgoing])
    app.train()(train)
    app.evaluate()(evaluate)
    app.query()(query)
    return app


audited = audited_app()


def run(tmp_path, monkeypatch, client_app, overrides: dict, clients: int):
    from flwr.simulation import run_simulation

    from fedlora.config import load_config
    from fedlora.flower_env import FLOWER_OFFLINE_ENV
    from server.server_app import make_server_app
    from simulations.runner import prepare

    for k, v in FLOWER_OFFLINE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config = prepare(load_config(None, {
        "run.output_dir": str(tmp_path / "run"), "simulation.clients": clients, "simulation.cpus_per_client": 1,
        "simulation.dataset_size": 600, "train.batch_size": 16, "train.local_steps": 2, **overrides,
    }))
    run_simulation(make_server_app(config), client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return config, rows


def ledger_json(state_dir: Path, capsys) -> dict:
    from fedlora.cli import main

    assert main(["privacy", str(state_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sites_decline_at_the_round_their_limits_say_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    config, rows = run(tmp_path, monkeypatch, strict_site, {
        "federation.rounds": 3, "federation.min_clients": 2, "privacy.site_max_epsilon": 7.5, "simulation.partition": "iid",
        "privacy.central": True, "privacy.central_noise_multiplier": 0.5, "privacy.central_clip_norm": 5.0,
    }, clients=4)
    sites = tmp_path / "run" / "sites"
    strict = ledger_json(sites / "0", capsys)
    (strict_run,) = strict["runs"]
    one_round = strict_run["history"][:1]
    # Partition 0's own limit (6.5) lies between its epsilon after one and after two rounds.
    assert epsilon_of(one_round, config.privacy.delta, "prv") < STRICT_LIMIT < epsilon_of(one_round * 2, config.privacy.delta, "prv")

    # Round 1: all four train. Round 2: partition 0 declines, three train. Round 3 would take
    # every site past privacy.site_max_epsilon = 7.5 (planned: 8): all decline and the run ends.
    assert [r["clients_ok"] for r in rows] == [0, 4, 3, 0]
    assert [r["clients_declined"] for r in rows] == [0, 0, 1, 4]
    assert rows[2]["failures"] == {"declined: privacy budget": 1}
    assert len(rows) == 4 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    assert [r["round"] for r in strict_run["rounds"]] == [1]
    assert [d["round"] for d in strict_run["declined"]] == [2, 3]
    assert strict["max_epsilon"] == STRICT_LIMIT and strict["epsilon_total"] <= STRICT_LIMIT
    for pid in (1, 2, 3):
        ledger = ledger_json(sites / str(pid), capsys)
        (site_run,) = ledger["runs"]
        assert [r["round"] for r in site_run["rounds"]] == [1, 2]
        assert [d["round"] for d in site_run["declined"]] == [3]
        assert site_run["epsilon"] <= 7.5 < site_run["declined"][0]["epsilon_would_be"]
    # The coordinator's figures are the sites' own: the largest epsilon any site reached.
    assert rows[3]["epsilon_max"] == pytest.approx(max(ledger_json(sites / str(p), capsys)["epsilon_total"] for p in range(4)))
    planned = [s["planned_epsilon"] for s in rows[1]["site_privacy"]]
    assert planned == pytest.approx([config.privacy.target_epsilon] * 4, rel=0.02)

    # Central DP: one Gaussian mechanism per aggregated round over all sites (q = 1).
    assert rows[1]["central_epsilon"] == pytest.approx(epsilon_of([(0.5, 1.0, 1)], config.privacy.delta, "prv"), rel=1e-9)
    assert rows[2]["central_epsilon"] == pytest.approx(epsilon_of([(0.5, 1.0, 1)] * 2, config.privacy.delta, "prv"), rel=1e-9)
    assert rows[2]["central_noise_std"] == pytest.approx(0.5 * 5.0 / 3)


CANARY = "zebracanary"


def test_every_message_a_client_sends_holds_only_adapter_tensors_and_whitelisted_scalars(tmp_path, monkeypatch):
    from fedlora.messages import DECLINED_METRICS, EVALUATE_METRICS, QUERY_METRICS, TRAIN_METRICS

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
        assert not reply["error"] and reply["config_records"] == {}
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
        assert not any(s in json.dumps(reply["metric_records"]) for s in secrets)

"""Sites declining at the round their limits say, or calibrating their noise to them, in a
federation of the real coordinator and the real site ClientApp at four virtual sites, in
process (tests/helpers/client_apps.py: run_in_process); their ledgers and central DP's
accounting. The simulation engine itself is tested in tests/test_simulation.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message

from fedlora.config import load_config
from fedlora.privacy.accounting import epsilon_of
from tests.helpers.client_apps import client_app_with_train, run_in_process

pytestmark = pytest.mark.slow

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



def run(tmp_path, monkeypatch, client_app, overrides: dict, clients: int):
    rows = run_in_process(client_app, tmp_path / "run", monkeypatch, clients, {
        "simulation.dataset_size": 600, "train.batch_size": 16, "train.local_steps": 2, "federation.evaluate_every": 1,
        **overrides})
    return load_config(tmp_path / "run" / "config.toml"), rows


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

"""The site's privacy ledger and budget guard, through the real ClientApp `train`.

Each call below is what a deployed site does for one message; the restart test runs
every round in a fresh process, as Flower's deployment engine does.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.config import load_config, write_config
from fedlora.privacy.accounting import epsilon_of
from fedlora.privacy.site_ledger import LEDGER_FILE, LedgerError, Mechanism, SiteLedger
from tests.helpers.site_data import write_site_data
from tests.helpers.site_process import fresh_processes, train_once

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def site(tmp_path, tiny_models):
    """A run config for a tiny BERT site, its data file and node config."""
    config = load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "run.output_dir": str(tmp_path / "run"),
        "federation.rounds": 4, "train.local_steps": 2, "train.batch_size": 16, "privacy.target_epsilon": 4.0,
        "federation.evaluate_every": 1,
    })
    path = tmp_path / "config.toml"
    write_config(config, path)
    node = {"data-path": str(write_site_data(tmp_path / "notes.jsonl")), "state-dir": str(tmp_path / "state"), "labels": "a,b,c"}
    return config, path, node


@pytest.mark.slow
def test_ledger_written_across_process_restarts_matches_one_uninterrupted_run(site, tmp_path):
    config, path, node = site
    # A fresh Python process per message, like a deployed site's task server.
    script = "import runpy; runpy.run_module('tests.helpers.site_process', run_name='__main__')"
    for code, output in fresh_processes([(script, [str(path), str(r), json.dumps(node)]) for r in (1, 2, 3)], ROOT, tmp_path):
        assert code == 0, output[-2000:]
    restarted = SiteLedger.load(node["state-dir"])

    one_process = {**node, "state-dir": str(tmp_path / "state-one")}
    for server_round in (1, 2, 3):
        reply = train_once(config, server_round, one_process)
    uninterrupted = SiteLedger.load(one_process["state-dir"])

    assert [m.round for m in restarted.runs[0].mechanisms] == [1, 2, 3]
    assert restarted.history() == uninterrupted.history()  # sigma and q come from the site's data, not the process
    eps = epsilon_of(uninterrupted.history(), config.privacy.delta, "prv")
    assert restarted.epsilon(config.privacy.delta, "prv") == pytest.approx(eps, rel=1e-9)
    assert reply.content["metrics"]["epsilon"] == pytest.approx(eps, rel=1e-9)
    # Calibrated for 4 rounds and 5 evaluations: after 3 rounds the site is below its target, and
    # expects to end at it once the 4th round and the evaluations (none were asked here) are spent.
    from fedlora.client.site_privacy import eval_mechanism

    assert eps < config.privacy.target_epsilon
    evaluations = [eval_mechanism(config)] * (config.federation.rounds + 1)
    history = uninterrupted.history()
    whole_run = epsilon_of(history + history[-1:] + evaluations, config.privacy.delta, "prv")
    assert whole_run == pytest.approx(config.privacy.target_epsilon, abs=0.02) and whole_run <= config.privacy.target_epsilon
    assert eps < reply.content["metrics"]["planned-epsilon"] < whole_run


def test_guard_declines_exactly_at_the_round_that_would_exceed_the_limit(site):
    config, _, node = site
    first = train_once(config, 1, node)
    mechanism = SiteLedger.load(node["state-dir"]).history()[0]
    # A limit between the epsilon of 2 and of 3 rounds: round 3 must be declined, round 2 not.
    eps2, eps3 = (epsilon_of([mechanism] * k, config.privacy.delta, "prv") for k in (2, 3))
    limit = (eps2 + eps3) / 2
    node = {**node, "max-epsilon": limit, "calibrate-to-limit": False}  # the guard alone, without more noise
    assert "declined" not in first.content["metrics"]
    assert "declined" not in train_once(config, 2, node).content["metrics"]
    third = train_once(config, 3, node)
    assert third.content["metrics"]["declined"] == 1
    assert "arrays" not in third.content.array_records  # nothing trained, nothing sent
    assert third.content["metrics"]["epsilon"] == pytest.approx(eps2, rel=1e-9)
    assert third.content["metrics"]["epsilon-would-be"] == pytest.approx(eps3, rel=1e-9)
    assert train_once(config, 4, node).content["metrics"]["declined"] == 1  # the budget never comes back

    ledger = SiteLedger.load(node["state-dir"])
    assert [m.round for m in ledger.runs[0].mechanisms] == [1, 2]
    assert [d.round for d in ledger.runs[0].declined] == [3, 4]
    assert ledger.epsilon(config.privacy.delta, "prv") <= limit


def test_site_limit_wins_over_the_coordinators(site):
    config, _, node = site
    config.privacy.site_max_epsilon = 100.0  # the coordinator would allow anything
    reply = train_once(config, 1, {**node, "max-epsilon": 0.01})
    assert reply.content["metrics"]["declined"] == 1


def test_ledger_composes_runs(site, tmp_path):
    config, _, node = site
    train_once(config, 1, node)
    config.run.output_dir = str(tmp_path / "another-run")
    reply = train_once(config, 1, node)
    ledger = SiteLedger.load(node["state-dir"])
    assert [r.run for r in ledger.runs] == [str(tmp_path / "run"), str(tmp_path / "another-run")]
    both = epsilon_of(ledger.history(), config.privacy.delta, "prv")
    assert both > ledger.runs[1].epsilon
    assert reply.content["metrics"]["epsilon"] == pytest.approx(both, rel=1e-9)


@pytest.mark.slow
def test_client_killed_mid_round_keeps_its_entry_and_the_retry_is_charged_again(site, tmp_path):
    """The entry is written before training (issue 25: whatever follows reading the data
    depends on it, an error included), so a site killed while training has been charged,
    and the coordinator's retry is charged again: a crash over-counts, which is safe."""
    config, _, node = site
    config.train.local_steps = 2000  # long enough to be killed while training
    config.privacy.accountant = "rdp"  # what is tested is when the entry is written; RDP calibrates in a blink
    path = tmp_path / "long.toml"
    write_config(config, path)
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.site_process", str(path), "1", json.dumps(node)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger_path = Path(node["state-dir"]) / LEDGER_FILE

    def charged() -> bool:  # the ledger is replaced atomically: a read sees a whole file
        return ledger_path.exists() and any(r.mechanisms for r in SiteLedger.load(node["state-dir"]).runs)

    deadline = time.monotonic() + 300
    while not charged() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # training (2,000 steps: minutes)
    assert proc.poll() is None, "the site finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [m.round for m in SiteLedger.load(node["state-dir"]).runs[0].mechanisms] == [1]  # charged before training

    config.train.local_steps = 2
    train_once(config, 1, node)  # the coordinator's retry of round 1
    ledger = SiteLedger.load(node["state-dir"])
    assert [m.round for m in ledger.runs[0].mechanisms] == [1, 1]


def test_a_crash_while_writing_keeps_the_previous_ledger(tmp_path, monkeypatch):
    ledger = SiteLedger.load(tmp_path)
    ledger.record("run-a", "prv", 1e-5, Mechanism(1, 1.1, 0.05, 4), limit=math.inf)
    before = (tmp_path / LEDGER_FILE).read_text()

    def crash(*_):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(LedgerError, match="cannot write"):
        SiteLedger.load(tmp_path).record("run-a", "prv", 1e-5, Mechanism(2, 1.1, 0.05, 4), limit=math.inf)
    assert (tmp_path / LEDGER_FILE).read_text() == before
    assert SiteLedger.load(tmp_path).history() == [(1.1, 0.05, 4)]


def test_an_unreadable_ledger_stops_training_instead_of_resetting(tmp_path):
    (tmp_path / LEDGER_FILE).write_text('{"runs": [{"run": ')
    with pytest.raises(LedgerError, match="unreadable"):
        SiteLedger.load(tmp_path)


def test_privacy_command_json_and_table(site, capsys):
    from fedlora.cli import main

    config, _, node = site
    train_once(config, 1, {**node, "max-epsilon": 50.0})
    train_once(config, 2, {**node, "max-epsilon": 50.0})
    assert main(["privacy", node["state-dir"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (run,) = out["runs"]
    assert run["accountant"] == "prv" and run["delta"] == config.privacy.delta
    assert len(run["history"]) == 2 and all(len(h) == 3 for h in run["history"])
    assert run["epsilon"] == pytest.approx(epsilon_of([tuple(h) for h in run["history"]], run["delta"], "prv"), rel=1e-9)
    assert out["max_epsilon"] == 50.0 and out["budget_left"] == pytest.approx(50.0 - run["epsilon"])

    assert main(["privacy", node["state-dir"]]) == 0
    table = capsys.readouterr().out
    assert "budget left" in table and config.run.output_dir in table

    assert main(["privacy", str(Path(node["state-dir"]) / "nowhere")]) == 2
    assert "no privacy ledger here" in capsys.readouterr().err


def test_a_deployed_site_without_state_dir_refuses_to_train_under_dp(site):
    config, _, node = site
    with pytest.raises(ValueError, match="state-dir"):
        train_once(config, 1, {"data-path": node["data-path"], "labels": "a,b,c"})


def test_noise_calibration_is_kept_in_the_state_dir_for_the_next_process(site, monkeypatch):
    import fedlora.client.site_privacy as site_privacy
    from fedlora.text_data import Example

    config, _, node = site
    train = [Example([101, 2000, 102], 0) for _ in range(200)]
    first = site_privacy.calibrated_plan(config, train, Path(node["state-dir"]))

    def no_search(*_):
        raise AssertionError("calibrated again although the state dir has it")

    monkeypatch.setattr(site_privacy, "calibrate_noise", no_search)  # a fresh process would have to search
    again = site_privacy.calibrated_plan(config, train, Path(node["state-dir"]))
    assert again == first
    with pytest.raises(AssertionError, match="calibrated again"):  # another plan is not taken from the cache
        site_privacy.calibrated_plan(config, train[:100], Path(node["state-dir"]))


def test_a_larger_delta_from_the_coordinator_does_not_unlock_spent_budget(site):
    config, _, node = site
    train_once(config, 1, node)
    spent = SiteLedger.load(node["state-dir"]).epsilon(config.privacy.delta, "prv")
    node = {**node, "max-epsilon": spent + 0.01}
    config.privacy.delta = 0.2  # a new run whose delta would make the same history look far cheaper
    config.run.output_dir = str(Path(config.run.output_dir).with_name("run-b"))
    reply = train_once(config, 1, node)
    assert dict(reply.content["metrics"]) == {"declined": 1, "policy.max-delta": 1}  # above the site's max-delta
    # A site whose own policy accepts that delta still counts what it spent at the ledger's 1e-5.
    reply = train_once(config, 1, {**node, "max-delta": 0.5, "calibrate-to-limit": False})
    assert reply.content["metrics"]["declined"] == 1
    assert reply.content["metrics"]["epsilon"] == pytest.approx(spent, rel=1e-9)  # stated at the ledger's 1e-5


def test_a_site_with_a_limit_declines_a_run_without_dp(site):
    config, _, node = site
    config.privacy.enabled = False
    reply = train_once(config, 1, {**node, "max-epsilon": 5.0, "allow-no-dp": True})
    assert dict(reply.content["metrics"]) == {"declined": 1, "policy.max-epsilon": 1}
    assert "arrays" not in reply.content.array_records
    reply = train_once(config, 1, node)  # no limit, but the policy does not allow runs without DP
    assert dict(reply.content["metrics"]) == {"declined": 1, "policy.allow-no-dp": 1}
    # A site that set no limit and allows it trains without DP.
    assert "arrays" in train_once(config, 1, {**node, "allow-no-dp": True}).content.array_records

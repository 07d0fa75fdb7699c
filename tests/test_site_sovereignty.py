"""The site is sovereign: its own policy decides before any data is read, nothing but
fixed error categories leaves on failure, and every released number is accounted.

Each message goes through the real ClientApp object (`fedlora.client.client_app.app`, with
its reply guard), as Flower calls it in a site's ClientApp process.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest
from dp_accounting import dp_event, pld
from flwr.app import Message, MessageType, RecordDict

from fedlora.privacy.accounting import epsilon_of
from fedlora.privacy.site_audit import read_audit
from fedlora.privacy.site_ledger import SiteLedger
from tests.helpers.site_messages import send, site  # noqa: F401 - the fixture

NAMES = ["Jane Doe", "John Roe", "Ada Lovelace"]


REQUESTS = [  # (what the coordinator asks, the site's node config, the key that declines it)
    ({"privacy.delta": 1e-3}, {}, "max-delta"),
    ({"privacy.unit": "user"}, {}, "privacy-unit"),
    ({"privacy.unit": "user", "privacy.user_column": "row_id"}, {"privacy-unit": "user"}, "user-column"),
    ({"privacy.enabled": False}, {}, "allow-no-dp"),
    ({"privacy.enabled": False}, {"allow-no-dp": True, "max-epsilon": 10.0}, "max-epsilon"),
    ({"data.label_column": "patient"}, {}, "label-column"),
    ({"data.text_column": "notes"}, {"text-column": "text"}, "text-column"),
    ({"data.prompt_column": "question"}, {}, "prompt-column"),
    ({"data.response_column": "answer"}, {}, "response-column"),
]


@pytest.mark.parametrize("asked, own, key", REQUESTS, ids=[r[2] for r in REQUESTS])
@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY])
def test_a_request_outside_the_policy_is_declined_with_the_key_before_any_data_is_read(site, tmp_path, asked, own, key, message_type):
    config, node = site
    for name, value in asked.items():
        section, field = name.split(".")
        setattr(getattr(config, section), field, value)
    # No data file at all: a site that read data before checking would fail with a data error instead.
    node = {**node, **own, "data-path": str(tmp_path / "absent.jsonl")}
    reply = send(config, node, message_type)
    assert not reply.has_error()
    assert dict(reply.content["metrics"]) == {"declined": 1, f"policy.{key}": 1}
    assert "arrays" not in reply.content.array_records  # nothing trained, nothing sent
    ledger = SiteLedger.load(node["state-dir"])
    assert ledger.history() == []
    assert [(d.reason, d.message) for r in ledger.runs for d in r.declined] == [(f"site policy: {key}", message_type)]
    audit = read_audit(node["state-dir"])
    assert [e["event"] for e in audit] == ["request", "declined"] and audit[1]["reason"] == f"site policy: {key}"


def test_the_site_caps_evaluations_per_run(site):
    config, node = site
    node = {**node, "max-evaluations": 2}
    assert "declined" not in send(config, node, MessageType.EVALUATE, 0).content["metrics"]
    assert "declined" not in send(config, node, MessageType.EVALUATE, 1).content["metrics"]
    third = send(config, node, MessageType.EVALUATE, 2)
    assert dict(third.content["metrics"]) == {"declined": 1, "policy.max-evaluations": 1}
    config.run.output_dir += "-another-run"  # the cap is per run; the ledger counts across runs
    assert "declined" not in send(config, node, MessageType.EVALUATE, 0).content["metrics"]
    kinds = [m.kind for r in SiteLedger.load(node["state-dir"]).runs for m in r.mechanisms]
    assert kinds == ["evaluation"] * 3


def test_a_deployed_site_ignores_the_runs_site_policy_table(site):
    """The coordinator's [simulation.site_policy] is for virtual sites only."""
    config, node = site
    config.privacy.delta = 1e-3
    config.simulation.site_policy.max_delta = 0.5
    config.privacy.site_max_epsilon = 1000.0
    assert dict(send(config, node).content["metrics"]) == {"declined": 1, "policy.max-delta": 1}


def write_named_rows(path: Path) -> Path:
    with path.open("w") as fh:
        for i in range(60):
            fh.write(json.dumps({"text": f"note {i}", "label": "abc"[i % 3], "patient": NAMES[i % 3]}) + "\n")
    return path


def test_an_error_leaves_as_a_fixed_category_without_any_data_value(site, tmp_path, caplog):
    """A site whose policy (wrongly) names a column of patient names as its label column:
    the names reach neither the reply nor its error reason; the site's log has the details."""
    config, node = site
    config.data.label_column, config.data.labels = "patient", ["x", "y", "z"]
    node = {**node, "data-path": str(write_named_rows(tmp_path / "named.jsonl")), "label-column": "patient", "labels": "x,y,z"}
    with caplog.at_level(logging.ERROR, logger="fedlora.client"):
        for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
            reply = send(config, node, message_type)
            assert reply.has_error() and reply.error.reason == "data error"
    assert "data error" in caplog.text and "row 1" in caplog.text  # the operator can find the row
    assert not any(name in caplog.text for name in NAMES)  # fedlora's messages never quote a value


def test_a_reply_outside_the_whitelist_or_an_exception_leaves_only_as_a_category(site):
    """The reply guard itself, around handlers with the bugs it exists for."""
    from flwr.app import ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp

    from fedlora.client.reply_guard import guarded_replies

    app = ClientApp(mods=[guarded_replies])

    @app.train()
    def extra_record(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3}), "row": ConfigRecord({"name": NAMES[0]})}), reply_to=msg)

    @app.evaluate()
    def unlisted_metric(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3, "row-7-label": 2})}), reply_to=msg)

    @app.query()
    def raising(msg, context):
        raise ValueError(f"label {NAMES[0]!r} is not in data.labels")

    config, node = site
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY):
        reply = send(config, node, message_type, app=app)
        assert reply.has_error() and reply.error.reason == "internal error"


def test_evaluation_releases_noisy_sums_charged_to_the_ledger(site):
    from fedlora.client.site_privacy import EVAL_RELEASES, eval_mechanism

    config, node = site
    sigma, rate, releases = eval_mechanism(config)
    assert (rate, releases) == (1.0, EVAL_RELEASES)
    reply = send(config, node, MessageType.EVALUATE, 0)
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "eval-correct", "eval-loss-sum", "epsilon", "noise-multiplier"}
    assert metrics["noise-multiplier"] == sigma  # the config's, so the report can show the figures' noise
    assert metrics["num-examples"] != int(metrics["num-examples"])  # a noisy count, not the count (48 rows)
    (run,) = SiteLedger.load(node["state-dir"]).runs
    assert [(m.kind, m.noise_multiplier, m.sample_rate, m.steps) for m in run.mechanisms] == [("evaluation", sigma, 1.0, 3)]
    assert metrics["epsilon"] == pytest.approx(epsilon_of([(sigma, 1.0, 3)], config.privacy.delta, "prv"), rel=1e-9)


def test_release_noise_has_the_accounted_scale():
    from fedlora.privacy.noisy_release import noisy_sum

    draws = [noisy_sum(10.0, 5.0, 2.0) for _ in range(20000)]
    assert statistics.fmean(draws) == pytest.approx(10.0, abs=0.25)
    assert statistics.stdev(draws) == pytest.approx(10.0, rel=0.03)  # noise_multiplier * sensitivity


def gaussian_events(history):
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(
            dp_event.GaussianDpEvent(sigma) if q == 1.0 else dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)),
            steps)
        for sigma, q, steps in history
    ])


def test_the_planned_run_spends_the_target_by_an_independent_count(site, tmp_path):
    """Training and the planned evaluations together spend privacy.target_epsilon, and the
    evaluations alone privacy.eval_epsilon, by Google's dp-accounting (PLD)."""
    from fedlora.client.local_training import DPPlan
    from fedlora.client.site_privacy import calibrated_plan, eval_mechanism
    from fedlora.text_data import Example

    config, _ = site
    train = [Example([1, 2, 3], 0) for _ in range(192)]
    plan: DPPlan = calibrated_plan(config, train, tmp_path)
    evaluations = [eval_mechanism(config, tmp_path)] * (config.federation.rounds + 1)
    training = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * config.federation.rounds
    for history, target in ((evaluations, config.privacy.eval_epsilon), (training + evaluations, config.privacy.target_epsilon)):
        reference = pld.PLDAccountant(value_discretization_interval=1e-4)
        reference.compose(gaussian_events(history))
        assert reference.get_epsilon(config.privacy.delta) == pytest.approx(target, rel=2e-2)


def test_a_site_below_the_runs_plan_calibrates_to_its_limit_and_takes_part_in_every_round(site):
    config, node = site
    config.privacy.accountant = "rdp"  # the same logic as PRV, at a fraction of the accounting time
    limit = 2.5  # the run plans 4.0
    strict = {**node, "max-epsilon": limit}
    assert dict(send(config, {**strict, "calibrate-to-limit": False}).content["metrics"])["declined"] == 1
    noise = []
    for server_round in range(1, config.federation.rounds + 1):
        for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
            reply = send(config, {**strict, "state-dir": node["state-dir"] + "-calibrated"}, message_type, server_round)
            assert "declined" not in reply.content["metrics"], (server_round, message_type)
            if message_type == MessageType.TRAIN:
                noise.append(reply.content["metrics"]["noise-multiplier"])
    ledger = SiteLedger.load(node["state-dir"] + "-calibrated")
    spent = ledger.epsilon(config.privacy.delta, "rdp")
    assert limit - 0.15 < spent <= limit  # the limit is used, never exceeded (one evaluation was not asked)
    full_plan = send(config, {**node, "state-dir": node["state-dir"] + "-plain"}).content["metrics"]["noise-multiplier"]
    assert min(noise) > full_plan  # more noise than the run's own plan, in every round


def test_fedlora_privacy_shows_the_audit_log_and_the_reasons(site, capsys):
    from fedlora.cli import main

    config, node = site
    send(config, node, MessageType.EVALUATE, 0)
    config.privacy.delta = 1e-3  # the same run, now asking for a larger delta
    assert dict(send(config, node, MessageType.TRAIN, 1).content["metrics"]) == {"declined": 1, "policy.max-delta": 1}
    assert main(["privacy", node["state-dir"], "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (audit,) = summary["audit"]
    assert audit["run"] == config.run.output_dir and audit["messages"] == 2
    assert [a["delta"] for a in audit["asked"]] == [1e-5, 1e-3]
    assert [(d["round"], d["message"], d["reason"]) for d in audit["declined"]] == [(1, "train", "site policy: max-delta")]
    assert [r["kind"] for run in summary["runs"] for r in run["rounds"]] == ["evaluation"]
    assert main(["privacy", node["state-dir"]]) == 0
    table = capsys.readouterr().out
    assert "declined round 1 train: site policy: max-delta" in table and "evaluation" in table

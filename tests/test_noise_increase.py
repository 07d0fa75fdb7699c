"""Useless training is said, and can be refused: a site whose own limit would raise its
noise far past the run's plan declines (policy `max-noise-increase`, before it trains or
spends), the coordinator names every site that trained with raised noise (console,
metrics.jsonl), and a run that too few sites could train for that reason ends early with a
line that says the budgets are nearly spent and where to read them (exit 3).

Through the real site ClientApp and the real coordinator loop, delivered in process
(tests/helpers/in_process.py: InProcessGrid)."""

from __future__ import annotations

import io
import json

import pytest
from flwr.app import MessageType

from fedlora.config import load_config
from fedlora.privacy.site_ledger import SiteLedger
from fedlora.run_outcome import EXIT_ENDED_EARLY, ended_early, metrics_rows
from fedlora.server.progress import Progress
from tests.helpers.in_process import InProcessGrid, coordinator_identity  # noqa: F401 - fixture
from tests.helpers.site_data import write_site_data
from tests.helpers.site_messages import send

TIGHT_LIMIT = 0.7  # the run plans 8 (0.5 of it for evaluations): training within 0.7 needs far more noise


@pytest.fixture
def run_config(tmp_path, tiny_models):
    return load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "run.output_dir": str(tmp_path / "run"),
        "federation.rounds": 2, "train.local_steps": 1, "train.batch_size": 16, "privacy.accountant": "rdp",
        "federation.evaluate_every": 1, "federation.round_timeout": 30.0, "privacy.eval_epsilon": 0.5,
    })


def node(tmp_path, name: str, **policy) -> dict:
    return {"data-path": str(write_site_data(tmp_path / f"{name}.jsonl", rows=96)), "state-dir": str(tmp_path / name),
            "labels": "a,b,c", **policy}


def test_a_site_declines_noise_past_its_cap_naming_the_key_and_spends_nothing_on_it(run_config, tmp_path):
    tight = node(tmp_path, "tight", **{"max-epsilon": TIGHT_LIMIT})
    reply = send(run_config, tight, MessageType.TRAIN, 1)
    assert dict(reply.content["metrics"]) == {"declined": 1, "policy.max-noise-increase": 1}
    (run,) = SiteLedger.load(tight["state-dir"]).runs
    assert run.mechanisms == [] and [d.reason for d in run.declined] == ["site policy: max-noise-increase"]

    # Without the cap the same site trains, and says both figures: its noise and the plan's.
    uncapped = node(tmp_path, "uncapped", **{"max-epsilon": TIGHT_LIMIT, "max-noise-increase": 0})
    metrics = dict(send(run_config, uncapped, MessageType.TRAIN, 1).content["metrics"])
    assert metrics["noise-multiplier"] > 4 * metrics["planned-noise-multiplier"] > 0
    assert metrics["run-epsilon"] == pytest.approx(metrics["epsilon"])  # a fresh ledger: this run is all of it
    # A site whose limit affords the plan trains at the plan's noise (the cap never bites).
    roomy = dict(send(run_config, node(tmp_path, "roomy", **{"max-epsilon": 50.0}), MessageType.TRAIN, 1).content["metrics"])
    assert roomy["noise-multiplier"] == pytest.approx(roomy["planned-noise-multiplier"])


@pytest.mark.parametrize("value", ["0.5", "-1", "inf", "x"])
def test_a_bad_cap_is_one_line_naming_the_key(run_config, tmp_path, value):
    from fedlora.client.site_policy import PolicyError, site_policy

    with pytest.raises(PolicyError, match=r"node config 'max-noise-increase' must be"):
        site_policy(run_config, {**node(tmp_path, "bad"), "max-noise-increase": value})


def federate(config, nodes: dict[int, dict]) -> tuple[list[dict], str]:
    from fedlora.server.federation import run_federation
    from fedlora.server import federation

    stream = io.StringIO()
    original = federation.Progress
    federation.Progress = lambda rounds: Progress(rounds, stream)
    try:
        run_dir, rows = run_federation(InProcessGrid(nodes), config)
    finally:
        federation.Progress = original
    assert metrics_rows(run_dir.path) == json.loads(json.dumps(rows))
    return rows, stream.getvalue()


def test_raised_noise_is_said_and_sites_at_their_cap_end_the_run_early_with_where_to_read_budgets(
        run_config, tmp_path, coordinator_identity, capsys):  # noqa: F811
    # Two sites: one within the plan; one whose limit raises its noise (no cap): the run trains
    # and names it, on the console and in metrics.jsonl.
    config = run_config
    config.federation.min_clients = 2
    nodes = {11: node(tmp_path, "roomy", **{"max-epsilon": 50.0}),
             12: node(tmp_path, "tight", **{"max-epsilon": TIGHT_LIMIT, "max-noise-increase": 0})}
    rows, console = federate(config, nodes)
    assert [r["clients_ok"] for r in rows] == [0, 2, 2] and ended_early(rows, 2) is None
    for row in rows[1:]:
        (raised,) = row["noise_raised"]
        assert raised["node"] == 12 and raised["increase"] > 4
        assert raised["noise_multiplier"] == pytest.approx(raised["increase"] * raised["planned_noise_multiplier"])
        assert f"round {row['round']}: node 12 calibrated to its limit: noise {raised['noise_multiplier']:.3g}, " in console
    assert "node 11 calibrated" not in console
    # This run's own spending is reported apart from the site's ledger total.
    assert all(s["run_epsilon"] is not None for r in rows[1:] for s in r["site_privacy"])

    # The same sites with the default cap (4x): the tight one declines, too few can train, the run ends early.
    config.run.output_dir = str(tmp_path / "run-capped")
    nodes[12] = node(tmp_path, "tight-capped", **{"max-epsilon": TIGHT_LIMIT})
    rows, console = federate(config, nodes)
    assert rows[-1]["ended_early"] and rows[-1]["failures"] == {"declined: site policy: max-noise-increase": 1}
    message = ended_early(rows, 2)
    assert message is not None and EXIT_ENDED_EARLY == 3  # what `fedlora simulate` / `fedlora run` exit with
    assert "privacy budgets are nearly spent" in message and "max-noise-increase" in message
    assert "fedlora privacy STATE_DIR" in message
    assert "site policy: max-noise-increase" in console

    # What `fedlora run` ends with for this run directory: exit 3, and the line on stderr.
    from fedlora.cli.deployment import _show_finished_run

    assert _show_finished_run(config, None) == EXIT_ENDED_EARLY
    err = capsys.readouterr().err
    assert "[fedlora] run ended early: 0 of 2 rounds trained" in err
    assert "[fedlora] the sites' privacy budgets are nearly spent" in err

"""What the report says about a run (server/run_report.py), from a synthetic run directory
as the coordinator and the simulation write it: sites by name in every legend and table,
coinciding lines kept apart, this run's spending apart from the ledger total against the
site's limit, the sites that calibrated to their limit, the validation curve's noise, the
exact held-out score with its per-label accuracy and confusion matrix, whole-number ticks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedlora.config import load_config, write_config
from fedlora.server import site_names
from fedlora.server.run_report import noise_scale, write_report
from tests.helpers.run_dirs import write_run


def figure(page: str, name: str) -> str:
    match = re.search(rf'<figure id="{name}">(.*?)</figure>', page, re.S)
    assert match, name
    return match.group(1)


def series_positions(page: str, gid: str) -> list[tuple[float, float]]:
    """The (x, y) of each marker matplotlib drew for series `gid`."""
    match = re.search(rf'<g id="{gid}">(.*?)</g>\s*</g>', page, re.S)
    assert match, gid
    return [(float(x), float(y)) for x, y in re.findall(r'<use [^>]*x="([-\d.]+)" y="([-\d.]+)"', match.group(1))]


def simulation_run(tmp_path: Path) -> Path:
    """A simulation's run: nodes 11 and 12 are partitions 0 and 1 (they noted their node ids),
    node 13 never said; node 12 had spent 6.1 in an earlier run, limit 8 for every site."""
    run_dir = write_run(tmp_path / "run")
    write_config(load_config(None, {"federation.rounds": 3, "privacy.site_max_epsilon": 8.0}), run_dir / "config.toml")
    for partition, node in ((0, 11), (1, 12)):
        (run_dir / "sites" / str(partition)).mkdir(parents=True)
        (run_dir / "sites" / str(partition) / site_names.VIRTUAL_NODE_FILE).write_text(f"{node}\n")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        r = row["round"]
        for site in row["site_privacy"]:
            if site["epsilon"] is not None:
                # Nodes 11 and 12 spend alike this run (their lines would coincide); 12's ledger held 6.1 before.
                site["run_epsilon"] = 0.6 * r if site["node"] != 13 else site["epsilon"]
                site["epsilon"] = 0.6 * r + (6.1 if site["node"] == 12 else 0.0) if site["node"] != 13 else site["epsilon"]
        row.update({"eval_noise_multiplier": 5.0, "eval_sites": 2, "eval_units": 400.0})
        if r == 2:
            row["sites"] = [{"node": 11, "train": "ok", "evaluate": "ok"}, {"node": 12, "train": "ok", "evaluate": "ok"},
                            {"node": 13, "train": "node unavailable", "evaluate": None}]
            row["noise_raised"] = [{"node": 12, "site": "site 1", "noise_multiplier": 8.0, "planned_noise_multiplier": 0.57,
                                    "increase": 8.0 / 0.57}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "test.json").write_text(json.dumps({
        "notes": 1000, "accuracy": 0.824, "loss": 0.61, "labels": ["cardiology", "orthopedics", "dermatology"],
        "confusion": [[300, 20, 10], [30, 280, 20], [40, 56, 244]], "per_class_accuracy": [300 / 330, 280 / 330, 244 / 340]}))
    return run_dir


def test_the_report_names_sites_keeps_lines_apart_and_shows_spending_against_the_limit(tmp_path):
    run_dir = simulation_run(tmp_path)
    page = write_report(run_dir).read_text()

    epsilon = figure(page, "epsilon")
    for legend in ("site 0: ledger total", "site 0: this run", "site 1: ledger total", "site 1: this run", "node 13: ledger total"):
        assert legend in epsilon
    assert "node 11" not in page and "node 12" not in page  # called by their partitions, everywhere
    assert "limit 8 (" in epsilon and "caps the ledger total" in epsilon and "caps this run" in epsilon
    # Sites 0 and 1 spent exactly alike this run: their points are drawn apart, not on top of each other.
    same = zip(series_positions(page, "series-run-epsilon-11"), series_positions(page, "series-run-epsilon-12"))
    assert all(a[0] != b[0] and a[1] == pytest.approx(b[1]) for a, b in same)
    # Why site 1 spent less than the target in this run.
    assert "site 1 had spent about 6.1 in earlier runs, so of its limit 8 about 1.9 was left" in page
    assert "site 0 had spent" not in page

    # The failure table names the site; the calibrated site is said.
    assert re.search(r"<td>2</td><td>node unavailable</td><td>node 13</td>", page)
    assert "site 1 calibrated to its limit: noise 8, 14x the plan (0.57)" in page

    # The exact held-out score, per label, and the confusion matrix.
    assert "accuracy <b>0.8240</b>" in page and '<table id="confusion">' in page
    assert "<th>dermatology</th><td>40</td><td>56</td><td>244</td><td>340</td><td>0.718</td>" in page

    # The validation curve with its noise: a band, and its scale in the caption.
    assert 'id="noise-eval_accuracy"' in figure(page, "quality")
    assert "one standard deviation of the noise the sites added, noise multiplier 5 on each" in figure(page, "quality")

    # Sites per round: whole-number ticks only.
    ticks = re.findall(r'<g id="ytick_\d+">.*?<text[^>]*>([^<]*)</text>', figure(page, "participation"), re.S)
    assert ticks and all(re.fullmatch(r"[−-]?\d+", t.strip()) for t in ticks), ticks


def test_the_noise_scale_is_the_spread_of_the_pooled_ratio():
    """k sites each add N(0, sigma^2) to a count and to a sum: the ratio's spread, by simulation."""
    import numpy as np

    rng = np.random.default_rng(0)
    sigma, sites, units, accuracy = 5.0, 3, 600.0, 0.7
    correct = accuracy * units + rng.normal(0, sigma, (200_000, sites)).sum(axis=1)
    count = units + rng.normal(0, sigma, (200_000, sites)).sum(axis=1)
    row = {"eval_noise_multiplier": sigma, "eval_sites": sites, "eval_units": units, "eval_accuracy": accuracy}
    assert noise_scale(row, "eval_accuracy", 1.0) == pytest.approx(float(np.std(correct / count)), rel=0.02)
    assert noise_scale({**row, "eval_noise_multiplier": None}, "eval_accuracy", 1.0) is None


def test_a_deployments_report_uses_the_names_the_run_recorded(tmp_path):
    run_dir = write_run(tmp_path / "run")
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    site_names.record(coordinator, 11, "north-clinic")
    assert site_names.record_run_labels(run_dir, coordinator, [11, 12]) == {11: "north-clinic (node 11)"}
    page = write_report(run_dir).read_text()  # without the coordinator's state dir: the run kept the names
    assert "north-clinic (node 11): ledger total" in page and "node 12: ledger total" in page


def test_the_deployed_coordinator_takes_the_names_from_its_state_dir_and_keeps_them_with_the_run(tmp_path, monkeypatch):
    """A deployed ServerApp runs in the SuperLink's directory, which `fedlora coordinator` makes its state dir."""
    from fedlora.server.federation import site_labels
    from fedlora.server.run_directory import RunDirectory

    coordinator, run_dir = tmp_path / "coordinator", tmp_path / "run"
    coordinator.mkdir()
    run_dir.mkdir()
    site_names.record(coordinator, 11, "north-clinic")
    monkeypatch.chdir(coordinator)
    assert site_labels(RunDirectory(run_dir), [11, 12]) == {11: "north-clinic (node 11)"}
    monkeypatch.chdir(tmp_path)  # later, elsewhere: the run directory remembers
    assert site_names.run_labels(run_dir) == {11: "north-clinic (node 11)"}


def test_the_report_says_which_rounds_were_securely_aggregated(tmp_path):
    run_dir = write_run(tmp_path / "plain")
    assert "No round was securely aggregated" in write_report(run_dir).read_text()
    run_dir = write_run(tmp_path / "secure")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        row["secure_aggregation"] = True
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(run_dir).read_text()
    assert "Every trained round was aggregated under secure aggregation" in page
    rows[2]["secure_aggregation"] = False
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "Rounds 1, 3 were aggregated under secure aggregation" in write_report(run_dir).read_text()

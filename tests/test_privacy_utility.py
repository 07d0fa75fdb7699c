"""`fedlora compare --epsilons`: the privacy-utility curve's options, settings per point,
table and self-contained page (the runs themselves are real `fedlora simulate` runs)."""

from __future__ import annotations

import math
import re
import statistics

import pytest

from fedlora.cli import main
from fedlora.config import load_config, parse_override
from fedlora.simulations.privacy_utility import NO_DP_LR, curve_page, curve_table, epsilon_settings, parse_epsilons, summarize


def test_epsilons_parse_sorted_with_inf_as_no_dp():
    assert parse_epsilons("8, 1,inf,2,4,2") == [1.0, 2.0, 4.0, 8.0, math.inf]


def test_each_point_keeps_evaluations_share_and_loads_as_a_valid_config():
    for epsilon in (0.5, 1.0, 8.0):
        config = load_config(None, dict(parse_override(item) for item in epsilon_settings(epsilon)))
        assert config.privacy.target_epsilon == epsilon
        assert config.privacy.eval_epsilon == pytest.approx(epsilon / 8)
    # The no-DP point (privacy.enabled = false, set by the cell) trains unclipped at its own rate.
    assert epsilon_settings(math.inf) == [f"train.lr={NO_DP_LR:g}"] and epsilon_settings(math.inf, 0.25) == ["train.lr=0.25"]


def results() -> list[dict]:
    runs = []
    for label, accuracies in (("1", [0.60, 0.64]), ("8", [0.85, 0.89]), ("no DP", [0.95, 0.97])):
        runs += [{"epsilon": label, "seed": s, "test_accuracy": a, "wall_seconds": 100.0 + s} for s, a in enumerate(accuracies)]
    return runs + [{"epsilon": "4", "seed": 0, "error": "boom"}]


def test_the_table_has_one_row_per_epsilon_with_mean_and_spread():
    points = summarize([1.0, 4.0, 8.0, math.inf], results())
    lines = curve_table(points).splitlines()
    assert len(lines) == 6
    assert lines[2] == f"| 1 | 2 | {statistics.mean([0.6, 0.64]):.3f} ± {statistics.stdev([0.6, 0.64]):.3f} | 0.600, 0.640 | 100 |"
    assert lines[3].startswith("| 4 | 1 | failed: boom |")
    assert lines[5].startswith("| no DP | 2 | 0.960 ± ")


def test_the_page_is_self_contained_with_the_dp_points_and_the_no_dp_line():
    points = summarize([1.0, 4.0, 8.0, math.inf], results())
    page = curve_page(points, curve_table(points), ["federation.rounds=3"], 2, "non-IID")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)  # nothing fetched from elsewhere
    assert 'id="series-dp"' in page and 'id="series-nodp"' in page
    assert "no DP (0.960)" in page and "federation.rounds=3" in page


def test_each_run_is_filed_under_its_epsilon_not_the_epsilon_it_spent(tmp_path, monkeypatch):
    from fedlora.simulations import privacy_utility

    calls = []

    def fake_cell(out, strategy, dp, partition, seed, extra):  # what compare_strategies.run_cell returns
        calls.append((dp, [e for e in extra if e.startswith(("privacy.", "train.lr="))]))
        return {"epsilon": 7.99 if dp else 0.0, "test_accuracy": 0.8 if dp else 0.9, "wall_seconds": 100.0}

    monkeypatch.setattr(privacy_utility, "run_cell", fake_cell)
    text = privacy_utility.curve(tmp_path / "c", [8.0, math.inf], ["train.lr=2"], seeds=1, no_dp_lr=0.3)
    # The user's rate is the DP points'; the no-DP point's own rate comes after it, so it wins there.
    assert calls == [(True, ["train.lr=2", "privacy.target_epsilon=8", "privacy.eval_epsilon=1"]),
                     (False, ["train.lr=2", "train.lr=0.3"])]
    lines = text.splitlines()
    assert lines[2] == "| 8 | 1 | 0.800 | 0.800 | 100 |" and lines[3] == "| no DP | 1 | 0.900 | 0.900 | 100 |"
    assert "at SGD rate\n0.3 (<code>--no-dp-lr</code>)" in (tmp_path / "c" / "curve.html").read_text()


@pytest.mark.parametrize("args", [["--epsilons", "1,x"], ["--epsilons", "0,8"], ["--epsilons", "8", "--partitions", "IID,non-IID"],
                                  ["--epsilons", "8,inf", "--no-dp-lr", "0"], ["--epsilons", "8,inf", "--no-dp-lr", "nan"],
                                  ["--epsilons", "8,inf", "--no-dp-lr", "inf"],
                                  ["--no-dp-lr", "0.5"]])
def test_bad_curve_options_are_one_line_errors(args, tmp_path, capsys):
    assert main(["compare", "--output", str(tmp_path / "c"), *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_help_states_the_no_dp_rate_the_curve_uses(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert f"default {NO_DP_LR:g}, the best" in " ".join(capsys.readouterr().out.split())

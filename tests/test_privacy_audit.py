"""`fedlora audit` (issue 27, item 4): canaries inserted once each, a membership score per
canary, the AUC of members against non-members with a bootstrap interval, with and without
noise at the same compute."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedlora.cli import main
from fedlora.simulations.privacy_audit import auc, auc_interval, make_canaries, membership_scores, roc_points


def rank_auc(members: np.ndarray, others: np.ndarray) -> float:
    """The AUC from ranks (Mann-Whitney), ties given their mean rank: an independent computation."""
    values = np.concatenate([members, others])
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # mean rank for ties
        ranks[values == value] = ranks[values == value].mean()
    n1, n2 = len(members), len(others)
    return (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n2)


def test_the_auc_is_the_mann_whitney_statistic_and_its_interval_holds_it():
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == 0.875  # 3 wins and one tie out of 4 pairs
    rng = np.random.default_rng(1)
    members, others = rng.normal(0.5, 1, 60).round(1), rng.normal(0, 1, 50).round(1)  # rounded: ties happen
    assert auc(members, others) == pytest.approx(rank_auc(members, others), abs=1e-12)
    low, high = auc_interval(members, others, seed=0)
    assert low < auc(members, others) < high and high - low < 0.4
    assert auc(others, members) == pytest.approx(1 - auc(members, others))
    roc = roc_points(members, others)
    assert roc[0] == (0.0, 0.0) and roc[-1] == (1.0, 1.0)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(roc, roc[1:]))  # thresholds fall: both rates rise


def test_a_shift_of_a_label_for_every_text_scores_no_canary_as_a_member():
    before = np.log(np.full((6, 3), 1 / 3))
    labels = np.array([0, 1, 2, 0, 1, 2])
    shifted = before + np.array([0.7, -0.2, 0.1])  # training moved each label's share alike for all texts
    assert np.allclose(membership_scores(before, shifted, labels), 0.0)
    every_label = before + np.arange(6)[:, None] * 0.3  # a text's labels moved together (log-probs do not sum to 1 here)
    assert np.allclose(membership_scores(before, every_label, labels), 0.0)
    remembered = shifted.copy()
    remembered[4, 1] += 1.0  # canary 4's own label rose beyond its label's shift
    scores = membership_scores(before, remembered, labels)
    assert scores.argmax() == 4 and scores[4] == pytest.approx(1 * 2 / 3 * (1 - 1 / 6))  # less its share of both means


def test_canaries_are_random_whole_words_half_inserted_once_across_the_sites():
    from fedlora.base_model import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir("default"))
    labels = ["a", "b", "c"]
    canaries = make_canaries(40, labels, tokenizer, sites=3, seed=0)
    assert canaries == make_canaries(40, labels, tokenizer, sites=3, seed=0)  # from the seed alone
    members = [c for c in canaries if c.member]
    assert len(members) == 20 and all(c.site is None for c in canaries if not c.member)
    assert sorted(c.site for c in members) == sorted([i % 3 for i in range(20)])
    assert {c.label for c in canaries} == set(labels) and len({c.text for c in canaries}) == 40
    vocab = tokenizer.get_vocab()
    assert all(word in vocab and word.isalpha() for c in canaries for word in c.text.split())


def test_audit_refuses_what_it_cannot_audit_in_one_line(tmp_path, capsys):
    assert main(["audit", "--canaries", "4", "--output", str(tmp_path / "a")]) == 2
    assert "--canaries 4: give at least 10" in capsys.readouterr().err
    assert main(["audit", "--set", "privacy.enabled=false", "--output", str(tmp_path / "a")]) == 2
    assert "privacy.enabled must be true" in capsys.readouterr().err


@pytest.mark.slow
def test_the_audit_sees_memorization_without_noise_and_stays_within_the_dp_bound_under_dp(tmp_path, capsys):
    """At reduced scale (2 sites of 100 notes, 6 rounds of 3 steps of batch 32, 80 canaries): with
    the noise off the members' scores stand out; under DP (epsilon 1 at this scale, where a
    canary is one of about 90 training records) the AUC stays within what epsilon 1 allows
    (measured 0.44-0.66). Epsilon 8 permits far more than chance (an AUC up to 0.9997):
    docs/privacy.md."""
    out = tmp_path / "audit"
    settings = ["simulation.clients=2", "simulation.dataset_size=200", "federation.rounds=6", "train.batch_size=32",
                "privacy.target_epsilon=1", "privacy.eval_epsilon=0.125"]
    argv = ["audit", "--canaries", "80", "--output", str(out), *(f"--set={s}" for s in settings)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "audit.json").read_text())
    no_noise, dp = result["arms"]
    assert no_noise["noise_multiplier"] == [0.0, 0.0] and all(s > 1.0 for s in dp["noise_multiplier"])
    assert no_noise["interval"][0] > 0.5 and result["audit_sees"], no_noise  # the audit can see
    # What DP promises is a bound, not chance: at epsilon 1 no test's AUC exceeds 0.731. (Requiring the
    # interval to hold 0.5 failed twice in about 50 runs, once each way: the bootstrap over canaries
    # does not see one training's shared noise.) Without noise the members reach 0.79-0.84.
    assert result["dp_auc_bound"] == pytest.approx(1 - 1 / (1 + math.e), abs=1e-4)
    assert dp["auc"] <= result["dp_auc_bound"], dp
    assert len(no_noise["member_scores"]) == 40 and len(dp["non_member_scores"]) == 40
    assert f"DP allows an AUC up to 0.7311; the DP training's {dp['auc']:.3f} is within it" in printed
    page = (out / "audit.html").read_text()
    assert page.count("<svg") == 2 and "http" not in page.replace("http://www.w3.org", "")
    # An audit is never overwritten.
    assert main(argv) == 2 and "holds an audit already" in capsys.readouterr().err


def test_the_dp_auc_bound_is_the_area_under_the_dp_trade_off_curve():
    """Against a numerical integration of DP's best trade-off of errors (the hypothesis-testing view)."""
    from fedlora.simulations.privacy_audit import dp_auc_bound

    alpha = np.linspace(0.0, 1.0, 2_000_001)
    for epsilon, delta in ((0.0, 0.0), (1.0, 0.0), (1.0, 1e-5), (3.0, 0.01), (8.0, 1e-5)):
        beta = np.maximum.reduce([np.zeros_like(alpha), 1 - delta - math.exp(epsilon) * alpha,
                                  math.exp(-epsilon) * (1 - delta - alpha)])
        area = float(((beta[1:] + beta[:-1]) / 2 * np.diff(alpha)).sum())
        assert dp_auc_bound(epsilon, delta) == pytest.approx(1 - area, abs=1e-6)
    assert dp_auc_bound(0.0, 0.0) == 0.5 and dp_auc_bound(1.0, 0.0) == pytest.approx(0.7311, abs=1e-4)


def test_an_audit_that_cannot_see_without_noise_says_its_dp_figure_shows_nothing():
    from fedlora.simulations.privacy_audit import audit_html, summary_line

    def arm(name: str, value: float, low: float, high: float) -> dict:
        return {"name": name, "auc": value, "interval": [low, high], "verdict": "consistent with chance: 0.5 is inside the interval",
                "noise_multiplier": [0.0], "seconds": 1.0, "member_scores": [0.1, 0.2], "non_member_scores": [0.0, 0.3],
                "roc": [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)]}

    result = {"arms": [arm("no noise", 0.51, 0.43, 0.59), arm("DP", 0.50, 0.42, 0.58)], "audit_sees": False, "epsilon": 8.0,
              "canaries": 4, "members": 2, "canary_words": 16, "sites": 5, "rounds": 32, "local_steps": 3, "batch_size": 64,
              "delta": 1e-5, "unit": "example", "score": "s", "written": "now", "dp_auc_bound": 0.99966}
    assert "the audit cannot see" in summary_line(result) and "consistent with chance" not in summary_line(result)
    assert "the audit cannot see" in audit_html(result)
    result["audit_sees"] = True
    assert summary_line(result).endswith("(consistent with chance: 0.5 is inside the interval; the DP bound is 0.9997)")

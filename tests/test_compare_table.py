"""`fedlora compare`'s table: one row per cell, mean ± sample standard deviation over
the seeds, failures counted, and bad options refused before any run starts."""

from __future__ import annotations

import statistics

import pytest

from fedlora.cli import main
from fedlora.simulations.compare_strategies import table


def run(seed: int, accuracy: float, wall: float) -> dict:
    return {"strategy": "fedavg", "dp": "yes", "partition": "non-IID", "seed": seed, "accuracy_round0": 0.2,
            "accuracy": accuracy, "bytes_up_per_site_round": 2000.0, "seconds_per_round": 10.0, "wall_seconds": wall,
            "epsilon": 7.9 + seed / 100}


def test_seeds_are_summarised_as_mean_and_spread():
    results = [run(0, 0.80, 100), run(1, 0.90, 110), run(2, 0.85, 120),
               {"strategy": "ffa", "dp": "yes", "partition": "IID", "seed": 0, "error": "boom"}]
    lines = table(results).splitlines()
    assert len(lines) == 4
    expected = f"{statistics.mean([0.8, 0.9, 0.85]):.3f} ± {statistics.stdev([0.8, 0.9, 0.85]):.3f}"
    assert lines[2].startswith("| fedavg | yes | non-IID | 3 | 0.200 ± 0.000 | " + expected + " | 2.0 | 10.0 | 110 | 7.92 |")
    assert "| ffa | yes | IID | 0 | failed: boom |" in lines[3]
    assert lines[2].endswith("| 7.92 |  |")  # no held-out test set drawn


def test_held_out_accuracy_is_summarised_when_drawn():
    results = [{**run(seed, 0.5, 100), "test_accuracy": acc} for seed, acc in enumerate([0.70, 0.74, 0.78])]
    assert table(results).splitlines()[2].endswith(f"| {statistics.mean([0.70, 0.74, 0.78]):.3f} ± {statistics.stdev([0.70, 0.74, 0.78]):.3f} |")


@pytest.mark.parametrize("args", [["--seeds", "0"], ["--partitions", "sideways"], ["--strategies", "nope"]])
def test_bad_options_are_one_line_errors(args, tmp_path, capsys):
    assert main(["compare", "--output", str(tmp_path / "c"), *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1

"""`fedlora bench dp` end to end through the CLI, on the tiny preset (a few steps)."""

from __future__ import annotations

import json

import pytest

from fedlora.cli import main


def run_json(capsys, *args: str) -> dict:
    assert main(["bench", "dp", "--model", "tiny", "--batch", "4", "--seq", "16", "--steps", "2", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_dp_json_has_positive_timings_and_memory(capsys):
    result = run_json(capsys)
    for key in ("plain_ms", "dp_ms", "ratio", "opacus_ms", "fast_ms", "opacus_ratio", "fast_ratio"):
        assert result[key] > 0, key
    for key in ("plain_peak_mb", "dp_peak_mb", "opacus_peak_mb", "fast_peak_mb"):
        assert result[key] >= 0, key  # an RSS delta can be 0 for a step this small
    assert result["device"] == "cpu" and result["dp_impl"] == "fast" and result["fast_covers"]
    assert result["dp_ms"] == result["fast_ms"] and result["ratio"] == pytest.approx(result["fast_ms"] / result["plain_ms"])
    assert (result["batch"], result["seq"]) == (4, 16)
    assert all(len(result["times_ms"][v]) == 2 for v in ("plain", "opacus", "fast"))
    # Same weights, batch and masks: the two DP paths' per-example norms agree.
    assert result["per_example_norm_max_rel_diff"] < 1e-5


def test_bench_dp_bf16_base_with_checkpointing(capsys):
    """bf16 base, fp32 adapters, reentrant activation checkpointing: both DP paths run
    and agree on every per-example norm."""
    result = run_json(capsys, "--dtype", "bf16", "--checkpointing")
    assert (result["dtype"], result["checkpointing"], result["dp_impl"]) == ("bf16", True, "fast")
    assert result["ratio"] > 0 and result["per_example_norm_max_rel_diff"] < 1e-5
    only_fast = run_json(capsys, "--dp-impl", "fast")
    assert "opacus_ms" not in only_fast and only_fast["dp_ms"] == only_fast["fast_ms"]


def test_bench_dp_table_and_errors(capsys):
    assert main(["bench", "dp", "--model", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    assert "plain LoRA" in table and "DP, fast LoRA path" in table and "DP, Opacus hooks" in table
    assert main(["bench", "dp", "--model", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err
    assert main(["bench", "dp", "--model", "tiny", "--batch", "0"]) == 2

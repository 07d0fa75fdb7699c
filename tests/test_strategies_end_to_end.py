"""Each adapter-aware strategy runs through `fedlora simulate --set strategy.name=NAME`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def simulate(tmp_path, name: str) -> tuple:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", "2", "--output", str(out),
           "--set", f"strategy.name={name}", "--set", "simulation.dataset_size=300", "--set", "train.local_steps=1",
           "--set", "train.batch_size=16", "--set", "simulation.cpus_per_client=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients_ok"] == 3 for r in rows[1:])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    return out, rows


def test_ffa_keeps_a_fixed_and_halves_bytes_up(tmp_path):
    out, rows = simulate(tmp_path, "ffa")
    first = load_file(str(out / "checkpoints" / "round-0001" / "adapter.safetensors"))
    second = load_file(str(out / "checkpoints" / "round-0002" / "adapter.safetensors"))
    assert all((first[k] == second[k]).all() for k in first if "lora_A" in k)
    assert any(not (first[k] == second[k]).all() for k in first if "lora_B" in k)
    full = sum(t.numel() * 4 for t in first.values())
    lora_a = sum(t.numel() * 4 for k, t in first.items() if "lora_A" in k)
    # Three sites each sent everything but A (plus small .npy headers).
    assert rows[1]["bytes_up"] < 3 * (full - lora_a) * 1.02 and lora_a > 0.4 * full


def test_exact_reports_the_energy_rank_r_keeps(tmp_path):
    _, rows = simulate(tmp_path, "exact")
    assert all(0 < r["exact_energy_kept"] <= 1 + 1e-9 for r in rows[1:])


def test_fedadam_checkpoints_its_moments(tmp_path):
    out, _ = simulate(tmp_path, "fedadam")
    state = load_file(str(out / "checkpoints" / "round-0002" / "strategy_state.safetensors"))
    assert int(state["step"]) == 2 and any(k.startswith("m/") for k in state) and any(k.startswith("v/") for k in state)

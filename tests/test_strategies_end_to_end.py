"""Each adapter-aware strategy runs end to end: the real coordinator with
`strategy.name=NAME` and the simulation's real site ClientApp at three virtual sites,
in process (what `fedlora simulate --set strategy.name=NAME` runs, without the engine:
tests/test_simulation.py runs the engine)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from fedlora.simulations.virtual_sites import simulated_site_app
from tests.helpers.client_apps import run_in_process


def simulate(tmp_path, monkeypatch, name: str) -> tuple:
    out = tmp_path / name
    rows = run_in_process(simulated_site_app(), out, monkeypatch, 3, {"federation.rounds": 2, "strategy.name": name})
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients_ok"] == 3 for r in rows[1:])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    return out, rows


@pytest.mark.slow
def test_ffa_keeps_a_fixed_and_halves_bytes_up(tmp_path, monkeypatch):
    out, rows = simulate(tmp_path, monkeypatch, "ffa")
    first = load_file(str(out / "checkpoints" / "round-0001" / "adapter.safetensors"))
    second = load_file(str(out / "checkpoints" / "round-0002" / "adapter.safetensors"))
    assert all((first[k] == second[k]).all() for k in first if "lora_A" in k)
    assert any(not (first[k] == second[k]).all() for k in first if "lora_B" in k)
    full = sum(t.numel() * 4 for t in first.values())
    lora_a = sum(t.numel() * 4 for k, t in first.items() if "lora_A" in k)
    # Three sites each sent everything but A (plus small .npy headers).
    assert rows[1]["bytes_up"] < 3 * (full - lora_a) * 1.02 and lora_a > 0.4 * full


@pytest.mark.slow
def test_exact_reports_the_energy_rank_r_keeps(tmp_path, monkeypatch):
    _, rows = simulate(tmp_path, monkeypatch, "exact")
    assert all(0 < r["exact_energy_kept"] <= 1 + 1e-9 for r in rows[1:])


def test_fedadam_checkpoints_its_moments(tmp_path, monkeypatch):
    out, _ = simulate(tmp_path, monkeypatch, "fedadam")
    state = load_file(str(out / "checkpoints" / "round-0002" / "strategy_state.safetensors"))
    assert int(state["step"]) == 2 and any(k.startswith("m/") for k in state) and any(k.startswith("v/") for k in state)

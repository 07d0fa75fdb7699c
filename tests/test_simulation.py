"""End to end: `fedlora simulate` on Flower's simulation engine (Ray) writes the
complete run directory of the contract, and each worker loads the base model once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from fedlora.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REQUIRED_KEYS = {"round", "clients_ok", "clients_failed", "train_loss", "eval_loss", "eval_accuracy",
                 "epsilon_max", "bytes_up", "bytes_down", "seconds"}


def test_three_clients_two_rounds_write_a_complete_run_directory(tmp_path):
    out, load_log = tmp_path / "run", tmp_path / "loads.txt"
    env = {**os.environ, "FEDLORA_MODEL_LOAD_LOG": str(load_log)}
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", "2", "--output", str(out),
           "--set", "simulation.dataset_size=300", "--set", "train.local_steps=2", "--set", "train.batch_size=16",
           "--set", "simulation.cpus_per_client=1", "--set", "simulation.test_notes=200",
           "--set", "federation.evaluate_every=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # config.toml: the fully resolved configuration, loadable, with the absolute output dir.
    config = load_config(out / "config.toml")
    assert config.run.output_dir == str(out.resolve()) and config.simulation.clients == 3
    labels = json.loads((out / "labels.json").read_text())
    assert labels == config.data.labels and len(labels) >= 5

    # metrics.jsonl: round 0 (before training) then one row per round.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
    # Round 0 trains nothing; its evaluation is a release too, accounted at each site.
    assert rows[0]["train_loss"] is None and 0.0 < rows[0]["epsilon_max"] < config.privacy.eval_epsilon
    assert all(r["clients_ok"] == 3 and r["clients_failed"] == 0 for r in rows[1:])
    # Every round is evaluated by every site. The accuracy is a ratio of noisy sums: clamped to
    # [0, 1], or None when the noise leaves no positive unit count (about 20 validation notes a
    # site here, so that happens in a few percent of runs).
    assert all(r["eval_sites"] == 3 for r in rows)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 if r["eval_units"] > 0 else r["eval_accuracy"] is None for r in rows)
    assert rows[1]["bytes_up"] > 0 and rows[1]["bytes_down"] >= rows[1]["bytes_up"]
    # DP on by default: noise calibrated so the last planned round spends the target epsilon.
    assert 0 < rows[1]["epsilon_max"] < rows[2]["epsilon_max"] <= config.privacy.target_epsilon + 1e-6
    assert rows[2]["epsilon_max"] >= config.privacy.target_epsilon - 0.1

    # report.html: written at the end of the run, one figure per plot, and the run directory is the last line.
    report = (out / "report.html").read_text()
    assert report.count("<figure") == 5 and "all 2 planned rounds trained" in report
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {out.resolve()}"
    # A clean terminal: no deprecation notice, no warning from Flower or its workers.
    terminal = proc.stdout + proc.stderr
    assert "DEPRECATED" not in terminal and "WARNING" not in terminal and "Warning" not in terminal, terminal[-3000:]

    # checkpoints/ for each round.
    for r in (1, 2):
        state = json.loads((out / "checkpoints" / f"round-{r:04d}" / "state.json").read_text())
        assert state["round"] == r

    # adapter/ loads as README shows (fedlora.load_adapter: the base model it names, checked
    # by fingerprint; a mean-pooling head for the default encoder), and holds exactly the
    # last round's global adapter.
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    import fedlora

    loaded_run = fedlora.load_adapter(out)
    model, tokenizer = loaded_run.model, loaded_run.tokenizer
    assert loaded_run.labels == labels
    loaded = get_peft_model_state_dict(model)
    final = load_file(str(out / "checkpoints" / "round-0002" / "adapter.safetensors"))
    assert set(loaded) == set(final)
    assert all(torch.equal(loaded[k].float(), final[k]) for k in final)

    # test.json: the final adapter scored on 200 fresh notes from another seed than the
    # sites' notes, exactly (no DP noise: no site holds them); recomputed here by hand.
    from fedlora.simulations.held_out_test import TEST_SEED_OFFSET
    from fedlora.simulations.triage_notes import generate_notes

    test = json.loads((out / "test.json").read_text())
    notes = generate_notes(200, config.run.seed + TEST_SEED_OFFSET)
    assert notes != generate_notes(300, config.run.seed)[:200]
    batch = tokenizer([n["text"] for n in notes], truncation=True, max_length=config.model.max_length, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        predicted = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    hits = sum(labels[int(p)] == n["label"] for p, n in zip(predicted, notes))
    assert test["notes"] == 200 and test["accuracy"] == pytest.approx(hits / 200, abs=1e-9)
    assert f"held-out test: accuracy {test['accuracy']:.4f} on 200 fresh notes" in proc.stdout

    # The base model is loaded at most once per worker process (never per client or round).
    pids = Counter(load_log.read_text().split())
    assert pids and max(pids.values()) == 1, pids

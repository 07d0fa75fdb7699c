"""Bad input is a one-line error that names the problem, before anything starts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora.cli import main
from fedlora.config import Config, ConfigError, load_config, parse_override
from fedlora.simulations.engine_network import ENGINE_ENV, IN_PROCESS


@pytest.fixture(autouse=True)
def _simulate_in_process(monkeypatch):
    """`fedlora simulate` checks its inputs in this process, not in an engine child
    (simulations/engine_network.py), so that capsys sees the one-line errors."""
    monkeypatch.setenv(ENGINE_ENV, IN_PROCESS)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["simulate", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_config_key_in_file(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlocal_stepz = 3\n")
    code, err = run_cli(capsys, "--config", str(path))
    assert code == 2 and len(err.splitlines()) == 1
    assert "train.local_stepz" in err and str(path) in err


def test_unknown_key_in_set(capsys):
    code, err = run_cli(capsys, "--set", "privacy.epsilon=3")
    assert code == 2 and len(err.splitlines()) == 1 and "privacy.epsilon" in err


def test_bad_value_names_the_key(capsys):
    code, err = run_cli(capsys, "--set", "train.batch_size=big")
    assert code == 2 and "train.batch_size" in err and "'big'" in err
    code, err = run_cli(capsys, "--set", "simulation.partition=random")
    assert code == 2 and "simulation.partition" in err and "dirichlet" in err


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    code, err = run_cli(capsys, "--set", f"simulation.dataset={missing}")
    assert code == 2 and len(err.splitlines()) == 1
    assert str(missing) in err and "does not exist" in err


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_cli(capsys, "--set", f"simulation.dataset={empty}")
    assert code == 2 and len(err.splitlines()) == 1 and str(empty) in err and "empty" in err


def test_label_column_that_does_not_exist(tmp_path, capsys):
    data = tmp_path / "notes.csv"
    data.write_text("text,department\nchest pain,cardiology\nrash,dermatology\n")
    code, err = run_cli(capsys, "--set", f"simulation.dataset={data}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "'label'" in err and str(data) in err and "department" in err


def test_tampered_default_model_is_refused(monkeypatch):
    from fedlora import model_folder

    model_folder.default_model_dir.cache_clear()
    monkeypatch.setattr(model_folder, "DEFAULT_MODEL_SHA256", "0" * 64)
    try:
        with pytest.raises(model_folder.ModelError, match="sha256"):
            model_folder.default_model_dir()
    finally:
        model_folder.default_model_dir.cache_clear()


def test_set_values_are_toml_and_bare_words_are_strings():
    assert parse_override("strategy.name=ffa") == ("strategy.name", "ffa")
    assert parse_override("simulation.dataset=/data/notes.jsonl") == ("simulation.dataset", "/data/notes.jsonl")
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("privacy.enabled=false") == ("privacy.enabled", False)
    assert parse_override('lora.target_modules=["q_proj","v_proj"]') == ("lora.target_modules", ["q_proj", "v_proj"])
    config = load_config(None, dict([parse_override("train.lr=1"), parse_override("lora.target_modules=all")]))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_flat_round_trip_and_file_round_trip(tmp_path):
    from fedlora.config import from_flat, write_config

    config = load_config(None, {"train.lr": 0.5, "data.labels": ["x", "y"]})
    assert from_flat(config.to_flat()) == config
    write_config(config, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == config
    with pytest.raises(ConfigError):
        from_flat({**Config().to_flat(), "nope.x": 1})


def test_replies_can_only_carry_whitelisted_metrics():
    from fedlora.messages import TRAIN_METRICS, metric_record

    record = metric_record({"num-examples": 3, "train-loss": 0.5, "epsilon": 1.0}, TRAIN_METRICS)
    assert dict(record) == {"num-examples": 3, "train-loss": 0.5, "epsilon": 1.0}
    with pytest.raises(ValueError, match="whitelist"):
        metric_record({"num-examples": 3, "first-note": 1.0}, TRAIN_METRICS)


def test_a_run_that_ends_early_exits_3_and_says_what_was_trained(monkeypatch, capsys):
    import fedlora.simulations.runner
    from fedlora.run_outcome import EXIT_ENDED_EARLY, ended_early

    done = [{"round": 0, "ended_early": False}, {"round": 1, "ended_early": False}]
    early = done + [{"round": 2, "ended_early": True, "clients_discarded": 1, "failures": {"declined: privacy budget": 2}}]
    assert ended_early(done, 1) is None and ended_early(early[:1], 3) is None
    assert ended_early(early, 3) == ("run ended early: 1 of 3 rounds trained; too few sites could train round 2 "
                                     "(declined: privacy budget); 1 site(s) trained in round 2 and their updates were discarded")
    for rows, code in ((done, 0), (early, EXIT_ENDED_EARLY)):
        run_dir = SimpleNamespace(path=Path("runs") / "early")  # what the real simulate returns: a RunDirectory
        monkeypatch.setattr(fedlora.simulations.runner, "simulate", lambda config, rows=rows, **_: (run_dir, rows))
        assert main(["simulate", "--rounds", "3"]) == code
        err = capsys.readouterr().err
        assert ("run ended early: 1 of 3 rounds trained" in err) == (code == EXIT_ENDED_EARLY)


def test_held_out_test_notes_need_the_generated_dataset(tmp_path, capsys):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(f'{{"text": "note {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(20)))
    code, err = run_cli(capsys, "--set", f"simulation.dataset={data}", "--set", "simulation.test_notes=100")
    assert code == 2 and len(err.splitlines()) == 1 and "simulation.test_notes" in err and "default" in err
    code, err = run_cli(capsys, "--set", "simulation.test_notes=-1")
    assert code == 2 and "simulation.test_notes" in err and ">= 0" in err


def test_an_unknown_key_is_named_with_its_source_and_the_closest_known_key(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlocal_stepz = 3\n")
    code, err = run_cli(capsys, "--config", str(path), "--set", "train.lr=0.01")
    assert code == 2 and err == f"fedlora: error: {path}: unknown key 'train.local_stepz' (did you mean 'train.local_steps'?)"
    path.write_text("[privacy]\nepsilon = 3\n")
    code, err = run_cli(capsys, "--config", str(path))
    assert err == (f"fedlora: error: {path}: unknown key 'privacy.epsilon' "
                   "(did you mean 'privacy.eval_epsilon' or 'privacy.target_epsilon'?)")
    path.write_text("[train]\nlearning_rate = 0.1\n")  # nothing close: no guess
    assert run_cli(capsys, "--config", str(path))[1] == f"fedlora: error: {path}: unknown key 'train.learning_rate'"
    path.write_text("[train]\nlr = 0.01\n")
    code, err = run_cli(capsys, "--config", str(path), "--set", "train.batchsize=8")
    assert code == 2 and err == "fedlora: error: --set: unknown key 'train.batchsize' (did you mean 'train.batch_size'?)"
    path.write_text("[train]\nbatch_size = 'big'\n")  # a bad value, too, is the file's
    code, err = run_cli(capsys, "--config", str(path), "--set", "train.lr=0.01")
    assert code == 2 and err.startswith(f"fedlora: error: {path}: key 'train.batch_size' must be int")

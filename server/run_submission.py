"""`fedlora run`: submit a federation run to a coordinator (a thin layer over `flwr run`).

The run configuration is validated here first, its `run.output_dir` made absolute
(the ServerApp runs in the coordinator's working directory), and every key is
passed to Flower as run config; `flwr run . --run-config ...` against the same
SuperLink is equivalent. With `--resume RUN_DIR` the run directory's own config is
submitted with `run.resume`, and the ServerApp continues after its last checkpoint.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.app_hash import AppHashError, installed_app_dir, stage_app
from fedlora.config import Config, ConfigError, load_config
from fedlora.flower_env import flower_env, flower_executable
from fedlora.server.coordinator_service import CONNECTION, wait_until_listening
from fedlora.server.run_directory import free_run_dir


def app_dir() -> Path:
    """The Flower App: the project folder holding pyproject.toml with [tool.flwr.app]."""
    try:
        return installed_app_dir()
    except AppHashError as exc:
        raise ConfigError(str(exc)) from None


def run_config_values(config: Config) -> dict[str, Any]:
    """Every key as Flower run config (which has no lists: they travel as "a,b,c")."""
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in config.to_flat().items()}


def resolved_config(config_path: str | None, overrides: dict[str, Any], resume: str | None) -> Config:
    if resume:
        run_dir = Path(resume).expanduser().resolve()
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"--resume {run_dir}: not a run directory (no config.toml)")
        config = load_config(run_dir / "config.toml", overrides)
        return replace(config, run=replace(config.run, output_dir=str(run_dir), resume=str(run_dir)))
    config = load_config(config_path, overrides)
    if config.model.task == "classification" and not config.data.labels:
        raise ConfigError(f"{config_path or 'config'}: key 'data.labels' is empty: list the label names (sites map labels to ids with it)")
    # The exact directory the ServerApp will pick (never an existing run's).
    return replace(config, run=replace(config.run, output_dir=str(free_run_dir(config.run.output_dir))))


def submit(config: Config, flwr_home: Path, stream: bool = True, app: Path | None = None) -> int:
    """`flwr run APP fedlora --run-config FILE [--stream]`; returns flwr's exit code.
    APP is the installed fedlora's app folder unless `app` names another one; what is
    submitted is a staged copy of the files Flower bundles from it (fedlora.app_hash.stage_app)."""
    app = app or app_dir()
    with tempfile.TemporaryDirectory(prefix="fedlora-app-") as staged:
        bundle = Path(staged) / "app"
        try:
            app_hash = stage_app(app, bundle)  # what each site checks against the hashes it approved
        except AppHashError as exc:
            raise ConfigError(str(exc)) from None
        run_config_file = Path(staged) / "fedlora-run-config.toml"  # beside the app, not in it: written after staging
        run_config_file.write_text(tomli_w.dumps(run_config_values(config)))
        command = [flower_executable("flwr"), "run", str(bundle), CONNECTION, "--run-config", str(run_config_file)]
        if stream:
            command.append("--stream")
        wait_until_listening(flwr_home)
        print(f"[fedlora] submitting run: {config.run.output_dir}", flush=True)
        print(f"[fedlora] app hash (sites run it only if they approved it): {app_hash}", flush=True)
        return subprocess.run(command, env=flower_env(flwr_home), cwd=app).returncode

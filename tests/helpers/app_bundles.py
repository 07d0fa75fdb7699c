"""The installed app folder copied as an operator would copy it, the one-line change an
attacker would make to it, and a `flwr run` of such a folder against a deployment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import tomli_w

from fedlora.app_hash import installed_app_dir, stage_app
from fedlora.flower_env import flower_env, flower_executable


def copy_app(dest: Path) -> Path:
    """The installed app folder as an operator would copy it: pyproject.toml and the
    files `fab-include` selects (the ones Flower puts in the bundle)."""
    stage_app(installed_app_dir(), dest)
    return dest


def change_one_line(app: Path, marker: Path) -> None:
    """The attack: one line of client/ changed to do something at import (here, leave a marker)."""
    path = app / "client" / "client_app.py"
    lines = path.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if line.startswith("app = site_app("))
    lines[index] = lines[index].rstrip("\n") + f"; __import__('pathlib').Path({str(marker)!r}).write_text('ran')\n"
    path.write_text("".join(lines))


def flwr_run_folder(app: Path, config_path: Path, flwr_home: Path, log: Path) -> tuple[Path, str]:
    """`flwr run APP fedlora --stream` with the config's keys as run config, as a
    coordinator would submit a folder of its own: (the run directory, what it printed)."""
    from fedlora.server.run_submission import resolved_config, run_config_values

    config = resolved_config(str(config_path), {}, None)
    run_config = log.with_suffix(".run-config.toml")
    run_config.write_text(tomli_w.dumps(run_config_values(config)))
    out = subprocess.run([flower_executable("flwr"), "run", str(app), "fedlora", "--run-config", str(run_config), "--stream"],
                         cwd=app, env=flower_env(flwr_home), capture_output=True, text=True, timeout=400)
    log.write_text(out.stdout + out.stderr)  # what the coordinator saw, for a failing assert
    return Path(config.run.output_dir), out.stdout + out.stderr

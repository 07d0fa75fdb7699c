"""`flwr run .` runs the same federation through Flower's own CLI (local SuperLink,
simulation runtime) and writes the same run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]


def test_flwr_run_dot_writes_a_run_directory(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # flwr starts flower-superlink by name
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39291",
        "FLWR_LOCAL_CONTROL_API_PORT": "39293",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    out = tmp_path / "run"
    run_config = (f'federation.rounds=1 train.local_steps=1 train.batch_size=16 simulation.clients=3 '
                  f'simulation.dataset_size=300 run.output_dir="{out}"')
    try:
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "--federation-config", "num-supernodes=3", "--run-config", run_config, "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients_ok"] == 3
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / "config.toml").is_file() and (out / "labels.json").is_file()
    finally:
        # `flwr run` leaves its local SuperLink running in the background: stop ours.
        import psutil

        for process in psutil.process_iter(["cmdline"]):
            if any(str(tmp_path) in part for part in process.info["cmdline"] or []):
                process.send_signal(signal.SIGTERM)

"""The run directory the coordinator writes (the public contract):

config.toml, metrics.jsonl (one row per round, round 0 = before training),
labels.json (classification), adapter/ (PEFT format), checkpoints/round-NNNN/.
Files are replaced atomically, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedlora.adapter_state import Adapter, save_adapter_file
from fedlora.config import Config, write_config


def free_run_dir(requested: str) -> Path:
    """`requested` as an absolute path; if it already holds a run, the next free
    `<name>-N` beside it, so an earlier run is never overwritten."""
    path = Path(requested).expanduser().resolve()
    candidate, n = path, 1
    while (candidate / "metrics.jsonl").exists() or (candidate / "config.toml").exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


class RunDirectory:
    def __init__(self, path: Path):
        self.path = path
        self.metrics_path = path / "metrics.jsonl"
        self.checkpoints = path / "checkpoints"

    @classmethod
    def create(cls, config: Config) -> tuple["RunDirectory", Config]:
        """A new run directory holding the resolved config (with its absolute output_dir)."""
        path = free_run_dir(config.run.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        config = replace(config, run=replace(config.run, output_dir=str(path)))
        run_dir = cls(path)
        write_config(config, path / "config.toml.tmp")
        os.replace(path / "config.toml.tmp", path / "config.toml")
        if config.model.task == "classification":
            run_dir.write_json("labels.json", config.data.labels)
        return run_dir, config

    def write_json(self, name: str, value: Any) -> None:
        tmp = self.path / f"{name}.tmp"
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, self.path / name)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def checkpoint(self, server_round: int, adapter: Adapter, strategy_state: Adapter, extra: dict[str, Any]) -> Path:
        """checkpoints/round-NNNN/: the global adapter, the strategy's state (tensors,
        e.g. server-optimizer moments) and state.json (round number and metrics)."""
        final = self.checkpoints / f"round-{server_round:04d}"
        tmp = self.checkpoints / f".round-{server_round:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter_file(adapter, tmp / "adapter.safetensors")
        save_adapter_file(strategy_state, tmp / "strategy_state.safetensors")
        state = {"round": server_round, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

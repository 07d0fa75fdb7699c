"""The run directory the coordinator writes (the public contract):

config.toml, metrics.jsonl (one row per round, round 0 = before training),
labels.json (classification), adapter/ (PEFT format), checkpoints/round-NNNN/.
Files are replaced atomically, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora.atomic_file import write_atomic
from fedlora.adapter_state import Adapter, load_adapter_file, save_adapter_file
from fedlora.config import Config, ConfigError, load_config, write_config


def free_run_dir(requested: str) -> Path:
    """`requested` as an absolute path; if it already holds a run, the next free
    `<name>-N` beside it, so an earlier run is never overwritten."""
    path = Path(requested).expanduser().resolve()
    candidate, n = path, 1
    while (candidate / "metrics.jsonl").exists() or (candidate / "config.toml").exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


@dataclass
class Resumed:
    """What a run directory holds for resuming: the last completed round (0 if none)."""

    round: int
    adapter: Adapter
    strategy_state: Adapter
    state: dict[str, Any]
    rows: list[dict[str, Any]]  # metrics rows up to that round, duplicates never kept


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
        write_config(config, path / "config.toml")
        if config.model.task == "classification":
            run_dir.write_json("labels.json", config.data.labels)
        return run_dir, config

    @classmethod
    def resume(cls, config: Config) -> tuple["RunDirectory", Config, Resumed]:
        """Reopen `config.run.resume`: its own config.toml (the run's resolved config) is
        the run's truth, except `federation.rounds`, which may be raised to go on further."""
        path = Path(config.run.resume).expanduser().resolve()
        if not (path / "config.toml").is_file():
            raise ConfigError(f"run.resume {str(path)!r}: not a run directory (no config.toml)")
        saved = load_config(path / "config.toml")
        saved = replace(saved, run=replace(saved.run, output_dir=str(path), resume=str(path)),
                        federation=replace(saved.federation, rounds=max(saved.federation.rounds, config.federation.rounds)))
        run_dir = cls(path)
        done = sorted(p for p in run_dir.checkpoints.glob("round-*") if (p / "state.json").is_file())
        last = int(done[-1].name.removeprefix("round-")) if done else 0
        rows = [json.loads(line) for line in run_dir.metrics_path.read_text().splitlines() if line.strip()] if run_dir.metrics_path.exists() else []
        rows = [r for r in rows if r["round"] <= last]
        # Rewrite metrics.jsonl without rows past the checkpoint: the resumed rounds write them anew.
        write_atomic(run_dir.metrics_path, "".join(json.dumps(r) + "\n" for r in rows), durable=True)
        if last == 0:
            return run_dir, saved, Resumed(0, {}, {}, {}, rows)
        folder = done[-1]
        state = json.loads((folder / "state.json").read_text())
        return run_dir, saved, Resumed(last, load_adapter_file(folder / "adapter.safetensors"),
                                       load_adapter_file(folder / "strategy_state.safetensors"), state, rows)

    def write_json(self, name: str, value: Any) -> None:
        write_atomic(self.path / name, json.dumps(value, indent=2) + "\n")

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

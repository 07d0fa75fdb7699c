"""Run directories as the coordinator writes them, for the commands that read one."""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.config import load_config, write_config


def write_run(run_dir: Path, private: bool = True, rounds: int = 3) -> Path:
    """A run directory as the coordinator writes it: config.toml, metrics.jsonl, adapter/."""
    run_dir.mkdir(parents=True)
    write_config(load_config(None, {"federation.rounds": rounds, "privacy.enabled": private}), run_dir / "config.toml")
    rows = [{"round": 0, "clients_ok": 0, "clients_failed": 0, "clients_declined": 0, "failures": {}, "train_loss": None,
             "eval_loss": 1.8, "eval_accuracy": 0.2, "epsilon_max": 0.4, "site_privacy": [], "bytes_up": 0, "bytes_down": 10**6,
             "seconds": 3.0, "sites": []}]
    for r in range(1, rounds + 1):
        # Node 11 trains every round; node 12 declines round 3; node 13 is lost after round 1.
        privacy = [{"node": 11, "declined": False, "epsilon": 2.0 * r}]
        privacy.append({"node": 12, "declined": r == 3, "epsilon": None if r == 3 else 2.5 * r})
        if r == 1:
            privacy.append({"node": 13, "declined": False, "epsilon": 2.2})
        failures = {"declined: privacy budget": 1} if r == 3 else {"node unavailable": 1} if r == 2 else {}
        rows.append({"round": r, "clients_ok": 3 if r == 1 else 2 if r == 2 else 1, "clients_failed": sum(failures.values()),
                     "clients_declined": int(r == 3), "failures": failures, "train_loss": None, "eval_loss": 1.8 - 0.3 * r,
                     "eval_accuracy": 0.2 + 0.2 * r, "epsilon_max": 2.5 * r, "site_privacy": privacy if private else [],
                     "bytes_up": 9 * 10**5, "bytes_down": 9 * 10**5, "seconds": 10.0, "ended_early": False})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "adapter").mkdir()
    return run_dir

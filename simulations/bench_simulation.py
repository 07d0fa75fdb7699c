"""`fedlora bench simulation`: throughput and memory of many virtual clients.

Each mode runs a real `fedlora simulate` (Flower's simulation engine, DP on) in a
child process on a tiny BERT built from a config (or the default MiniLM), and samples the resident memory
of the child's whole process tree (driver, Ray daemons and workers) every 0.2 s:

- "cached": fedlora's way, one base model per worker process, adapters swapped;
- "reload": the baseline that loads the base model on every client call (what
  FlowerTune does), `simulation.reload_base_model = true`.

Client updates per second = updates aggregated / seconds spent in rounds 1..R
(training and evaluation); base-model loads are counted from FEDLORA_MODEL_LOAD_LOG.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fedlora.flower_env import flower_env
from fedlora.simulations.tiny_models import build_tiny_model
from fedlora.simulations.triage_notes import DEPARTMENTS


@dataclass
class SimulationBenchOptions:
    clients: int
    rounds: int = 2
    clients_per_round: int = 10  # 0 = all
    notes_per_client: int = 20
    modes: tuple[str, ...] = ("cached", "reload")
    model: str = "tiny"  # or "default": the embedded pretrained MiniLM (22M parameters)


class TreeMemory:
    """Peak resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_total = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            sizes = []
            for p in processes:
                try:
                    sizes.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max([self.peak_single, *sizes])
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_mode(options: SimulationBenchOptions, mode: str, model: Path | str, workdir: Path) -> dict[str, Any]:
    run_dir, load_log = workdir / f"run-{mode}-{options.clients}", workdir / f"loads-{mode}-{options.clients}.log"
    per_round = options.clients_per_round or options.clients
    settings = {
        "model.path": str(model), "simulation.clients": options.clients, "simulation.partition": "iid",
        "simulation.dataset_size": options.clients * options.notes_per_client, "simulation.cpus_per_client": 1,
        "federation.rounds": options.rounds, "federation.clients_per_round": options.clients_per_round,
        "federation.min_clients": min(2, per_round), "train.local_steps": 1, "train.batch_size": 8,
        "simulation.reload_base_model": mode == "reload", "run.output_dir": str(run_dir),
    }
    command = [sys.executable, "-m", "fedlora.cli", "simulate"]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    env = {**flower_env(), "FEDLORA_MODEL_LOAD_LOG": str(load_log)}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(proc.pid)
    _, stderr = proc.communicate()
    memory.stop()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"simulation ({mode}, {options.clients} clients) failed:\n{stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    updates = sum(r["clients_ok"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {
        "mode": mode, "model": options.model, "clients": options.clients, "clients_per_round": per_round, "rounds": options.rounds,
        "updates": updates, "round_seconds": round(seconds, 2), "updates_per_s": round(updates / seconds, 3),
        "wall_s": round(wall, 1), "peak_rss_mb": round(memory.peak_total / 2**20, 1),
        "peak_process_rss_mb": round(memory.peak_single / 2**20, 1),
        "base_model_loads": len(load_log.read_text().splitlines()) if load_log.exists() else 0,
        "bytes_up_per_update": round(sum(r["bytes_up"] for r in rows) / max(1, updates)),
    }


def bench_simulation(options: SimulationBenchOptions, progress=print) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-sim-") as tmp:
        workdir = Path(tmp)
        model = "default" if options.model == "default" else build_tiny_model("bert", workdir / "tiny-bert", num_labels=len(DEPARTMENTS))
        results = []
        for mode in options.modes:
            progress(f"[fedlora] bench simulation: {mode}, {options.clients} clients, {options.rounds} rounds ...")
            results.append(run_mode(options, mode, model, workdir))
        return results


def format_table(results: list[dict[str, Any]]) -> str:
    header = ["mode", "clients", "per_round", "updates", "updates/s", "peak_rss_MB", "largest_proc_MB", "model_loads", "wall_s"]
    lines = [header] + [[r["mode"], str(r["clients"]), str(r["clients_per_round"]), str(r["updates"]), f"{r['updates_per_s']:.2f}",
                         f"{r['peak_rss_mb']:.0f}", f"{r['peak_process_rss_mb']:.0f}", str(r["base_model_loads"]), f"{r['wall_s']:.0f}"]
                        for r in results]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)

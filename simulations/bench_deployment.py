"""`fedlora bench deployment`: what one round costs a deployed site beyond training.

Flower's deployment engine runs every ClientApp message in a fresh process. This
starts fresh Python processes that do what a site's `train` call does, on the default
model and task, and times each phase: process start and imports (torch, transformers,
Flower, the ClientApp), the base-model load from local safetensors, putting the
global adapter in (from its wire record), reading and tokenizing the site's data, and
the local DP-SGD training (the default 4 steps of batch 64).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedlora.flower_env import flower_env

PHASES = ("start_and_imports_s", "model_load_s", "adapter_load_s", "data_s", "training_s")


def child(start_epoch: float, data_path: str, state_dir: str) -> None:
    """One site's train call, phase by phase; prints the timings as JSON."""
    t_main = time.time()
    import torch  # noqa: F401  (the imports a ClientApp process pays for)
    import transformers  # noqa: F401

    import fedlora.client.client_app  # noqa: F401
    from fedlora.client.local_training import frozen, train_locally
    from fedlora.client.model_cache import cached_model
    from fedlora.client.site_data import load_site_data
    from fedlora.client.site_privacy import calibrated_plan
    from fedlora.adapter_state import adapter_of, from_record, put_adapter, to_record
    from fedlora.config import load_config
    from fedlora.simulations.triage_notes import DEPARTMENTS

    t_imports = time.time()
    config = load_config(None, {"data.labels": list(DEPARTMENTS), "run.output_dir": state_dir})
    cached = cached_model(config, config.data.labels)
    t_model = time.time()
    record = to_record(adapter_of(cached.model))  # what arrives over the wire
    put_adapter(cached.model, from_record(record))
    t_adapter = time.time()
    site = load_site_data(config, config.data.labels, {"data-path": data_path}, cached.tokenizer)
    plan = calibrated_plan(config, site.train, Path(state_dir))
    t_data = time.time()
    with frozen(cached.model, ()):
        train_locally(cached.model, site.train, config, plan, cached.tokenizer.pad_token_id, seed=0)
    t_train = time.time()
    print(json.dumps({
        "start_and_imports_s": (t_main - start_epoch) + (t_imports - t_main), "model_load_s": t_model - t_imports,
        "adapter_load_s": t_adapter - t_model, "data_s": t_data - t_adapter, "training_s": t_train - t_data,
    }))


def bench_deployment(repeats: int = 3, notes: int = 1200, progress=print) -> dict[str, Any]:
    from fedlora.simulations.sample_sites import write_site_files

    with tempfile.TemporaryDirectory(prefix="fedlora-bench-deploy-") as tmp:
        (data_path,) = write_site_files(Path(tmp) / "data", 1, notes)
        runs = []
        for k in range(repeats):
            progress(f"[fedlora] bench deployment: fresh ClientApp process {k + 1}/{repeats} ...")
            start = time.time()
            out = subprocess.run([sys.executable, "-m", "fedlora.simulations.bench_deployment", str(start), str(data_path), tmp],
                                 env=flower_env(), capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise RuntimeError(f"bench deployment child failed:\n{out.stderr[-2000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    medians = {phase: round(statistics.median(r[phase] for r in runs), 3) for phase in PHASES}
    overhead = medians["start_and_imports_s"] + medians["model_load_s"] + medians["adapter_load_s"]
    return {**medians, "overhead_s": round(overhead, 3), "overhead_vs_training": round(overhead / medians["training_s"], 3),
            "repeats": repeats, "notes": notes, "model": "default (all-MiniLM-L6-v2)", "runs": runs}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{phase:<22}{result[phase]:>8.3f}" for phase in PHASES]
    lines.append(f"{'overhead (first three)':<22}{result['overhead_s']:>8.3f}  = {result['overhead_vs_training']:.2f} x training")
    return f"median of {result['repeats']} fresh processes, seconds:\n" + "\n".join(lines)


if __name__ == "__main__":
    child(float(sys.argv[1]), sys.argv[2], sys.argv[3])

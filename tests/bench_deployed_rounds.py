"""The time of a deployed round per privacy mode: a real federation on 127.0.0.1 (TLS, node
authentication, 3 `fedlora client` sites with peer keys, a tiny BERT so that process starts
and exchanges, not training, dominate), 3 rounds each of local DP, local DP + secure
aggregation, distributed DP, and distributed DP evaluating every 3rd round. Prints the
seconds of rounds 1-3 from each run's metrics.jsonl (docs/performance.md).

    python tests/bench_deployed_rounds.py OUT_DIR [--modes local,local+secagg]

Uses tests/helpers/deployment.py's harness, so it runs from the checkout (not a test: pytest
does not collect it).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedlora.simulations.tiny_models import build_tiny_model  # noqa: E402
from tests.helpers.deployment import FEDLORA, Deployment, metrics_rows, start  # noqa: E402

parser = argparse.ArgumentParser(description="Seconds of a deployed round per privacy mode.")
parser.add_argument("out", type=Path, help="a new folder for the deployment")
parser.add_argument("--modes", help="comma-separated modes to run (default: all): local, local+secagg, distributed, "
                                    "'distributed, evaluate_every 3'")
args = parser.parse_args()
root = args.out
model = build_tiny_model("bert", root / "bert")
d = Deployment(root / "dep", model)
try:
    keys = [d.site_key(f"site-{i}") for i in range(3)]
    consortium = d.root / "consortium.pub"
    consortium.write_text("".join(Path(f"{k}.pub").read_text() for k in keys))
    for i in range(3):
        d.site(f"site-{i}", key=keys[i], extra_args=("--peer-keys", str(consortium), "--allow-distributed-dp", "--max-epsilon", "100"))
    modes = {
        "local": {"federation.secure_aggregation": False, "train.local_steps": 1},
        "local+secagg": {"federation.secure_aggregation": True, "train.local_steps": 1},
        "distributed": {"federation.secure_aggregation": True, "privacy.mode": "distributed", "privacy.distributed_sample_rate": 0.2},
        "distributed, evaluate_every 3": {"federation.secure_aggregation": True, "privacy.mode": "distributed",
                                          "privacy.distributed_sample_rate": 0.2, "federation.evaluate_every": 3},
    }
    chosen = args.modes.split(",") if args.modes else list(modes)
    if unknown := [m for m in chosen if m not in modes]:
        sys.exit(f"--modes: unknown mode(s) {', '.join(unknown)}; known: {', '.join(modes)}")
    for i, (name, overrides) in enumerate((m, modes[m]) for m in chosen):
        config = d.config(f"m{i}", **{"federation.rounds": 3, "privacy.target_epsilon": 8.0, **overrides})
        t = time.monotonic()
        proc = start([*FEDLORA, "run", "--config", str(config), "--coordinator-dir", str(d.state)], d.root / f"run{i}.log")
        assert proc.wait(timeout=900) == 0, (d.root / f"run{i}.log").read_text()[-2000:]
        rows = metrics_rows(d.root / "runs" / f"m{i}")
        print(f"{name}: rounds 1-3 {[round(r['seconds'], 1) for r in rows[1:]]} s, mean {sum(r['seconds'] for r in rows[1:]) / 3:.1f} s; "
              f"clients_ok {[r['clients_ok'] for r in rows[1:]]}; run {time.monotonic() - t:.0f} s", flush=True)
finally:
    d.close()

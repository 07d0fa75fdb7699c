"""`fedlora compare`: the default task under each strategy, with and without DP,
IID and non-IID, over several seeds, as one table (final accuracy as mean ± spread,
bytes up per site per round, seconds per round, wall time per run). Each run is a
real `fedlora simulate` in its own process; its run directory is kept under the
output folder. The seed (`run.seed`) changes the data, the split across sites and
the initial adapter; DP noise is drawn from a generator seeded by os.urandom in every run anyway.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

from fedlora.config import CHOICES

PARTITIONS = {"non-IID": ("dirichlet", 0.5), "IID": ("iid", 0.5)}
DP_CHOICES = {"both": (True, False), "yes": (True,), "no": (False,)}


def run_cell(out: Path, strategy: str, dp: bool, partition: str, seed: int, extra: list[str]) -> dict:
    scheme, alpha = PARTITIONS[partition]
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--output", str(out),
           "--set", f"strategy.name={strategy}", "--set", f"privacy.enabled={'true' if dp else 'false'}",
           "--set", f"simulation.partition={scheme}", "--set", f"simulation.alpha={alpha}", "--set", f"run.seed={seed}"]
    for item in extra:
        cmd += ["--set", item]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    # simulate never overwrites: it prints where the run really went (out, or out-N).
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run directory: "))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = rows[1:]
    clients = max(1, trained[-1]["clients_ok"])
    return {
        "accuracy_round0": rows[0]["eval_accuracy"],
        "accuracy": rows[-1]["eval_accuracy"],
        "accuracies": [r["eval_accuracy"] for r in rows],
        "bytes_up_per_site_round": sum(r["bytes_up"] for r in trained) / len(trained) / clients,
        "seconds_per_round": sum(r["seconds"] for r in trained) / len(trained),
        "wall_seconds": wall,
        "epsilon": rows[-1]["epsilon_max"],
        **held_out(run_dir),
    }


def held_out(run_dir: Path) -> dict:
    """The exact held-out test accuracy, when the run drew test notes (simulation.test_notes)."""
    from fedlora.simulations.held_out_test import RESULT_FILE  # here: it imports torch, which a refusal need not wait for

    path = run_dir / RESULT_FILE
    return {"test_accuracy": json.loads(path.read_text())["accuracy"]} if path.is_file() else {}


def summary(values: list[float]) -> str:
    """mean ± sample standard deviation (just the value for one run)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict]) -> str:
    lines = ["| strategy | DP | data | runs | accuracy round 0 | final accuracy | KB up / site / round | s / round | wall s / run | epsilon "
             "| held-out test accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault((r["strategy"], r["dp"], r["partition"]), []).append(r)
    for (strategy, dp, partition), runs in cells.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {strategy} | {dp} | {partition} | 0 | failed: {runs[0]['error']} | | | | | | |")
            continue
        failed = f" ({len(runs) - len(ok)} failed)" if len(ok) < len(runs) else ""
        mean = lambda key: statistics.mean(r[key] for r in ok)  # noqa: E731
        tested = [r["test_accuracy"] for r in ok if "test_accuracy" in r]
        lines.append(
            f"| {strategy} | {dp} | {partition} | {len(ok)}{failed} | {summary([r['accuracy_round0'] for r in ok])} "
            f"| {summary([r['accuracy'] for r in ok])} | {mean('bytes_up_per_site_round') / 1e3:.1f} "
            f"| {mean('seconds_per_round'):.1f} | {mean('wall_seconds'):.0f} | {max(r['epsilon'] for r in ok):.2f} "
            f"| {summary(tested) if tested else ''} |"
        )
    return "\n".join(lines)


def compare(output: Path, strategies: list[str], extra: list[str], seeds: int = 1, dp: str = "both",
            partitions: list[str] | None = None) -> str:
    output.mkdir(parents=True, exist_ok=True)
    results = []
    cells = list(product(strategies, DP_CHOICES[dp], partitions or list(PARTITIONS), range(seeds)))
    for i, (strategy, private, partition, seed) in enumerate(cells, 1):
        name = f"{strategy}-{'dp' if private else 'nodp'}-{partition.lower()}-seed{seed}"
        print(f"[compare] {i}/{len(cells)} {name}", file=sys.stderr, flush=True)
        cell = run_cell(output / name, strategy, private, partition, seed, extra)
        results.append({"strategy": strategy, "dp": "yes" if private else "no", "partition": partition, "seed": seed, **cell})
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # progress survives a crash
        if "error" not in cell:
            print(f"[compare] {name}: accuracy {cell['accuracy']:.3f} in {cell['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    text = table(results)
    (output / "table.md").write_text(text + "\n")
    return text


def chosen(names: str, known: list[str], option: str) -> list[str]:
    """The comma-separated `names` (all of `known` if empty); unknown ones are a ValueError."""
    picked = [n.strip() for n in names.split(",") if n.strip()] if names else known
    unknown = [n for n in picked if n not in known]
    if unknown:
        raise ValueError(f"{option}: unknown {unknown} (known: {', '.join(known)})")
    return picked


def known_strategies(names: str) -> list[str]:
    return chosen(names, sorted(CHOICES["strategy.name"]), "--strategies")


def known_partitions(names: str) -> list[str]:
    return chosen(names, list(PARTITIONS), "--partitions")

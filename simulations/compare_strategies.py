"""`fedlora compare`: the default task under each strategy, with and without DP,
IID and non-IID, as one table (final accuracy, bytes up per site per round,
seconds per round). Each cell is a real `fedlora simulate` run in its own process;
its run directory is kept under the output folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import product
from pathlib import Path

from strategies import STRATEGIES

PARTITIONS = {"non-IID": ("dirichlet", 0.5), "IID": ("iid", 0.5)}


def run_cell(out: Path, strategy: str, dp: bool, partition: str, extra: list[str]) -> dict:
    scheme, alpha = PARTITIONS[partition]
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--output", str(out),
           "--set", f"strategy.name={strategy}", "--set", f"privacy.enabled={'true' if dp else 'false'}",
           "--set", f"simulation.partition={scheme}", "--set", f"simulation.alpha={alpha}"]
    for item in extra:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True)
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
        "bytes_up_per_site_round": sum(r["bytes_up"] for r in trained) / len(trained) / clients,
        "seconds_per_round": sum(r["seconds"] for r in trained) / len(trained),
        "epsilon": rows[-1]["epsilon_max"],
    }


def table(results: list[dict]) -> str:
    lines = ["| strategy | DP | data | accuracy (round 0 -> last) | KB up / site / round | s / round | epsilon |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['dp']} | {r['partition']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['strategy']} | {r['dp']} | {r['partition']} | {r['accuracy_round0']:.3f} -> {r['accuracy']:.3f} "
            f"| {r['bytes_up_per_site_round'] / 1e3:.1f} | {r['seconds_per_round']:.1f} | {r['epsilon']:.2f} |"
        )
    return "\n".join(lines)


def compare(output: Path, strategies: list[str], extra: list[str]) -> str:
    output.mkdir(parents=True, exist_ok=True)
    results = []
    cells = list(product(strategies, (True, False), PARTITIONS))
    for i, (strategy, dp, partition) in enumerate(cells, 1):
        name = f"{strategy}-{'dp' if dp else 'nodp'}-{partition.lower()}"
        print(f"[compare] {i}/{len(cells)} {name}", file=sys.stderr, flush=True)
        cell = run_cell(output / name, strategy, dp, partition, extra)
        results.append({"strategy": strategy, "dp": "yes" if dp else "no", "partition": partition, **cell})
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # progress survives a crash
    text = table(results)
    (output / "table.md").write_text(text + "\n")
    return text


def known_strategies(names: str) -> list[str]:
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else sorted(STRATEGIES)
    unknown = [n for n in chosen if n not in STRATEGIES]
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown} (known: {', '.join(sorted(STRATEGIES))})")
    return chosen

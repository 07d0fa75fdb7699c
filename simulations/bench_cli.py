"""`python -m fedlora.simulations.bench_cli`: the wall time of the commands that need no model
(`fedlora --help`, `privacy`, `certs`, `site-key`, `sites`, `register-site`,
`sample-data`), each run as a fresh `fedlora` process, the median of --repeats runs.
Target: under 1.5 s each on the project's 2-core machine."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

COMMANDS = [
    ["--help"],
    ["privacy", "no-such-state-dir"],
    ["certs", "--out", "certs"],
    ["site-key", "--out", "keys", "--name", "site-a"],
    ["sites", "--coordinator-dir", "no-coordinator-here"],
    ["register-site", "keys/site-a.pub", "--coordinator-dir", "no-coordinator-here"],
    ["sample-data", "--out", "data", "--sites", "3", "--notes", "1200"],
    ["privacy", "ledger"],  # a site's ledger of 5 rounds (training and evaluation), as the site recorded it
    ["privacy", "ledger", "--recompute"],  # the same, every epsilon recomputed (what `privacy` did before)
]


def recorded_ledger(state_dir: Path, rounds: int = 5) -> None:
    """A ledger as a site records it: per round a DP-SGD entry and an evaluation entry."""
    from fedlora.privacy.site_ledger import Mechanism, open_ledger

    with open_ledger(state_dir) as ledger:
        for r in range(1, rounds + 1):
            ledger.record("runs/bench", "prv", 1e-5, Mechanism(r, 1.1, 0.05, 4), 10.0)
            ledger.record("runs/bench", "prv", 1e-5, Mechanism(r, 3.0, 1.0, 3, kind="evaluation"), 10.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.simulations.bench_cli", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fedlora = shutil.which("fedlora") or "fedlora"
    print(f"{'command':<76} {'median s':>9} {'exit':>5}")
    with tempfile.TemporaryDirectory() as work:
        recorded_ledger(Path(work) / "ledger")
        for command in COMMANDS:
            times, code = [], None
            for _ in range(args.repeats):
                for folder in ("certs", "data") if command[0] != "register-site" else ():  # they refuse to overwrite
                    shutil.rmtree(Path(work) / folder, ignore_errors=True)
                if command[0] == "site-key":
                    shutil.rmtree(Path(work) / "keys", ignore_errors=True)
                start = time.perf_counter()
                code = subprocess.run([fedlora, *command], cwd=work, capture_output=True).returncode
                times.append(time.perf_counter() - start)
            print(f"{'fedlora ' + ' '.join(command):<76} {statistics.median(times):9.2f} {code:>5}")


if __name__ == "__main__":
    main()

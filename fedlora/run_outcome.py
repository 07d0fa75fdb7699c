"""How a finished run ended, for the commands' exit codes: 0 = every planned round
trained; 3 = the run ended early because too few sites could train (their budgets or
policies declined, or they refused the app or base model). (2 = bad input and 1 = a run
stopped by an error are the CLI's own.) Read from the run directory's metrics.jsonl,
which is on the coordinator's machine in both simulation and deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EXIT_ENDED_EARLY = 3


def ended_early(rows: list[dict[str, Any]], planned_rounds: int, run_dir: str | Path | None = None) -> str | None:
    """The message for a run that ended without training its planned rounds, else None
    (`run_dir`: where a simulation's virtual sites keep their ledgers, to point at them)."""
    if not rows or not rows[-1].get("ended_early"):
        return None
    last = rows[-1]
    discarded = last.get("clients_discarded", 0)
    lost = f"; {discarded} site(s) trained in round {last['round']} and their updates were discarded" if discarded else ""
    message = (f"run ended early: {last['round'] - 1} of {planned_rounds} rounds trained; too few sites could train "
               f"round {last['round']} ({', '.join(sorted(last.get('failures', {}))) or 'declined'}){lost}")
    if any(NOISE_DECLINE in reason for reason in last.get("failures", {})):
        message += "\n" + budgets_nearly_spent(run_dir)
    return message


# The decline of a site whose limit would leave more noise than its policy allows (client/site_policy.py).
NOISE_DECLINE = "site policy: max-noise-increase"


def budgets_nearly_spent(run_dir: str | Path | None) -> str:
    """Why sites declined max-noise-increase, and where each site reads its budget."""
    sites = Path(run_dir) / "sites" if run_dir is not None else None
    where = (f"`fedlora privacy {sites}/N` for site N" if sites is not None and sites.is_dir()
             else "`fedlora privacy STATE_DIR` at each site (in a simulation: `fedlora privacy RUN_DIR/sites/N`)")
    return ("the sites' privacy budgets are nearly spent: within their limits they could train only with more than "
            f"max-noise-increase times the planned noise, which leaves little to learn; read the budgets with {where}")


def metrics_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows ([] if the run wrote none)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

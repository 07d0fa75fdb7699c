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


def ended_early(rows: list[dict[str, Any]], planned_rounds: int) -> str | None:
    """The message for a run that ended without training its planned rounds, else None."""
    if not rows or not rows[-1].get("ended_early"):
        return None
    last = rows[-1]
    discarded = last.get("clients_discarded", 0)
    lost = f"; {discarded} site(s) trained in round {last['round']} and their updates were discarded" if discarded else ""
    return (f"run ended early: {last['round'] - 1} of {planned_rounds} rounds trained; too few sites could train "
            f"round {last['round']} ({', '.join(sorted(last.get('failures', {}))) or 'declined'}){lost}")


def metrics_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows ([] if the run wrote none)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

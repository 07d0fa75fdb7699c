"""What the operator sees: a live line per round, a summary table at the end, and what
the coordinator's log lines call each site (`Progress.site`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from fedlora.server.site_names import SiteNamer


def raised_noise_line(site: dict[str, Any]) -> str:
    """"site 1 calibrated to its limit: noise 8.0, 14x the plan (0.57)": the round's line, and
    the report's (server/run_report.py, which stays free of torch: `fedlora run` writes it)."""
    increase = site["increase"]
    times = f"{increase:.0f}x" if increase >= 10 else f"{increase:.1f}x"
    return (f"{site['site']} calibrated to its limit: noise {site['noise_multiplier']:.3g}, {times} the plan "
            f"({site['planned_noise_multiplier']:.3g})")


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


class Progress:
    def __init__(self, total_rounds: int, stream: TextIO | None = None, site: Callable[[int], str] | None = None):
        self.total_rounds = total_rounds
        # Every log line that names a site calls it this (server/site_names.py; node ids without a run).
        self.site: Callable[[int], str] = site or SiteNamer()
        # Looked up now, not at import: sys.stderr may have been replaced (or unset) since.
        self.stream = stream or sys.stderr or sys.__stderr__
        self.live = self.stream.isatty()

    def _line(self, text: str, final: bool) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        self._line(f"[fedlora] round {server_round}/{self.total_rounds} {phase}: {done}/{total} clients done", final=False)

    def round_done(self, row: dict[str, Any]) -> None:
        acc = row.get("eval_accuracy")
        quality = f"acc {_fmt(acc, '.3f')}" if "eval_accuracy" in row else f"ppl {_fmt(row.get('eval_perplexity'), '.2f')}"
        self._line(
            f"[fedlora] round {row['round']}/{self.total_rounds}: clients {row['clients_ok']} ok / {row['clients_failed']} failed"
            + (f" ({row['clients_declined']} declined)" if row.get("clients_declined") else "")
            + (f" | central epsilon {row['central_epsilon']:.2f}" if "central_epsilon" in row else "")
            + f" | train loss {_fmt(row.get('train_loss'))} | eval loss {_fmt(row.get('eval_loss'))} | {quality}"
            f" | epsilon {_fmt(row.get('epsilon_max'), '.2f')} | {row['seconds']:.1f}s",
            final=True,
        )

    def note(self, text: str) -> None:
        self._line(f"[fedlora] {text}", final=True)


def summary_table(rows: list[dict[str, Any]]) -> str:
    quality_key = "eval_accuracy" if rows and "eval_accuracy" in rows[0] else "eval_perplexity"
    header = ["round", "clients", "train_loss", "eval_loss", quality_key, "epsilon_max", "MB_up", "seconds"]
    lines = [header]
    for r in rows:
        lines.append([
            str(r["round"]), f"{r['clients_ok']}/{r['clients_ok'] + r['clients_failed']}",
            _fmt(r.get("train_loss")), _fmt(r.get("eval_loss")), _fmt(r.get(quality_key)),
            _fmt(r.get("epsilon_max"), ".3f"), f"{r['bytes_up'] / 1e6:.2f}", f"{r['seconds']:.1f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)

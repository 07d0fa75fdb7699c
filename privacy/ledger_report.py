"""`fedlora privacy STATE_DIR`: a site's ledger and audit log as a table or as one JSON object."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedlora.privacy.epsilon_cache import EpsilonCache
from fedlora.privacy.site_audit import AUDIT_FILE, AuditError, read_audit
from fedlora.privacy.site_ledger import LEDGER_FILE, LedgerError, SiteLedger


def audit_summary(state_dir: Path) -> list[dict[str, Any]]:
    """Per run, from the audit log: the app hashes it shipped (and whether the site
    approved them), the distinct settings it asked for, and every decline with its reason."""
    try:
        entries = read_audit(state_dir)
    except AuditError as exc:
        raise LedgerError(str(exc)) from None
    runs: dict[str, dict[str, Any]] = {}
    for e in entries:
        run = runs.setdefault(e["run"], {"run": e["run"], "apps": [], "asked": [], "messages": 0, "declined": []})
        if e["event"] == "app":
            app = {"app_hash": e.get("app_hash"), "approved": e.get("approved")}
            if app not in run["apps"]:
                run["apps"].append(app)
        elif e["event"] == "request":
            run["messages"] += 1
            if e.get("asks") not in run["asked"]:
                run["asked"].append(e.get("asks"))
        elif e["event"] == "declined":
            run["declined"].append({k: e.get(k) for k in ("time", "round", "message", "reason")})
    return list(runs.values())


def ledger_summary(state_dir: str | Path, recompute: bool = False) -> dict[str, Any]:
    """Per run: accountant, delta, epsilon, history [[noise_multiplier, sample_rate, steps], ...],
    the rounds trained and declined; and the site's total over all runs against its limit.
    Epsilons come from the ledger's cache of exactly these computations
    (privacy/epsilon_cache.py) unless `recompute`."""
    state_dir = Path(state_dir)
    if not (state_dir / LEDGER_FILE).is_file() and not (state_dir / AUDIT_FILE).is_file():
        raise LedgerError(f"{state_dir}: no privacy ledger here ({LEDGER_FILE} not found)")
    ledger = SiteLedger.load(state_dir)
    epsilons = EpsilonCache(state_dir, use_file=not recompute)
    runs, before = [], []  # `before`: the mechanisms of the runs already listed
    latest = ledger.runs[-1] if ledger.runs else None
    for r in ledger.runs:
        rounds = []
        for i, m in enumerate(r.mechanisms):
            rounds.append({
                "round": m.round, "kind": m.kind, "time": m.time, "unit": m.unit, "noise_multiplier": m.noise_multiplier,
                "sample_rate": m.sample_rate, "steps": m.steps, "trust": m.trust,
                "run_epsilon_after": epsilons.epsilon(r.history[: i + 1], r.delta, r.accountant),
                # What the budget guard counts: every run so far, at the ledger's smallest delta.
                "epsilon_after": epsilons.epsilon(before + r.history[: i + 1], ledger.guard_delta(latest.delta), latest.accountant),
            })
        before = before + r.history
        runs.append({
            "run": r.run, "accountant": r.accountant, "delta": r.delta,
            "epsilon": epsilons.epsilon(r.history, r.delta, r.accountant),
            "history": [list(h) for h in r.history], "rounds": rounds,
            "declined": [vars(d) for d in r.declined],
        })
    # The total composes every run, with the latest run's accountant at the ledger's smallest delta.
    total = epsilons.epsilon(ledger.history(), ledger.guard_delta(latest.delta), latest.accountant) if latest else 0.0
    epsilons.save()
    limit = None if math.isinf(ledger.max_epsilon) else ledger.max_epsilon
    return {
        "state_dir": str(state_dir.resolve()),
        "runs": runs,
        "epsilon_total": total,
        "delta_total": ledger.guard_delta(latest.delta) if latest else None,
        "max_epsilon": limit,
        "budget_left": None if limit is None else max(0.0, limit - total),
        "audit": audit_summary(state_dir),
    }


def ledger_table(summary: dict[str, Any]) -> str:
    limit = summary["max_epsilon"]
    lines = [
        f"privacy ledger of {summary['state_dir']}",
        f"epsilon spent over all runs: {summary['epsilon_total']:.3f}"
        + (f" (delta {summary['delta_total']:g})" if summary["delta_total"] is not None else "")
        + (f" | limit {limit:.3f} | budget left {summary['budget_left']:.3f}" if limit is not None else " | no limit set"),
    ]
    for run in summary["runs"]:
        lines += ["", f"run {run['run']}", f"  accountant {run['accountant']}, delta {run['delta']:g}, epsilon {run['epsilon']:.3f}",
                  "  round  kind        noise_mult  sample_rate  steps  unit     run_epsilon  site_epsilon  time"]
        for r in run["rounds"]:
            lines.append(f"  {r['round']:>5}  {r['kind']:<10}  {r['noise_multiplier']:>10.4f}  {r['sample_rate']:>11.5f}  {r['steps']:>5}  "
                         f"{r['unit']:<7}  {r['run_epsilon_after']:>11.3f}  {r['epsilon_after']:>12.3f}  {r['time']}")
            if r.get("trust"):
                lines.append(f"         assumes: {r['trust']}")
        for d in run["declined"]:
            why = (f"epsilon would reach {d['epsilon_would_be']:.3f} > limit {d['limit']:.3f}"
                   if d.get("reason", "privacy budget") == "privacy budget" else d["reason"])
            lines.append(f"  {d['round']:>5}  declined {d.get('message', 'train')}: {why}  {d['time']}")
    if summary["audit"]:
        lines += ["", "audit log (every run that reached this site)"]
    for run in summary["audit"]:
        lines.append(f"run {run['run']}: {run['messages']} messages")
        for app in run["apps"]:
            lines.append(f"  app {app['app_hash']}: {'approved' if app['approved'] else 'REFUSED (not approved)'}")
        for asked in run["asked"]:
            if asked:
                lines.append("  asked: " + ", ".join(f"{k}={v}" for k, v in asked.items()))
        for d in run["declined"]:
            lines.append(f"  declined round {d['round']} {d['message']}: {d['reason']}  {d['time']}")
    return "\n".join(lines)

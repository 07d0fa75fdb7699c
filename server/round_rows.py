"""The metrics rows of metrics.jsonl: one per round, built from what the round's phases
collected, and the lines that name the sites that did not deliver."""

from __future__ import annotations

from collections import Counter
from typing import Any

from flwr.app import Message

from fedlora.config import Config
from fedlora.server import site_replies
from fedlora.server.message_exchange import REFUSED_APP, REFUSED_BASE_MODEL, RoundReplies, declined_reason
from fedlora.server.progress import Progress, raised_noise_line
from fedlora.server.round_policy import RoundTraining
from fedlora.server.site_names import called
from fedlora.server.site_replies import metrics_or_empty, number


def weighted(replies: list[Message], key: str,
             max_weight_factor: float) -> float | None:
    """The mean of `key` weighted by num-examples, capped as aggregation weights are."""
    pairs = [(v, n) for m in replies
             if (v := number(metrics_or_empty(m), key)) is not None and (n := number(metrics_or_empty(m), "num-examples")) is not None
             and n > 0]
    cap = site_replies.weight_cap([n for _, n in pairs], max_weight_factor)
    pairs = [(v, n if cap is None else min(n, cap)) for v, n in pairs]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def site_statuses(train: dict[int, str], evaluate: dict[int, str]) -> list[dict[str, Any]]:
    """metrics.jsonl's per-site rows: each node asked this round, with "ok" or why not for
    each phase (None: not asked in that phase)."""
    return [{"node": n, "train": train.get(n), "evaluate": evaluate.get(n)} for n in sorted(set(train) | set(evaluate))]


def note_site_problems(progress: Progress, row: dict[str, Any], labels: dict[int, str] | None = None) -> None:
    """One line naming every site that did not deliver this round, and why (`labels`:
    server/site_names.py run_labels)."""
    labels = labels or {}
    problems = [f"{called(s['node'], labels)} {phase}: {s[phase]}" for s in row["sites"]
                for phase in ("train", "evaluate") if s[phase] not in (None, "ok")]
    if problems:
        progress.note(f"round {row['round']}: " + "; ".join(problems))


def site_epsilons(replies: list[Message]) -> list[float]:
    """The epsilons sites reported (finite, >= 0; anything else is skipped)."""
    return [e for m in replies if (e := number(metrics_or_empty(m), "epsilon")) is not None and e >= 0]


def site_privacy(replies: list[Message]) -> list[dict[str, Any]]:
    """Each site's privacy figures this round, as it reported them (None where a figure
    is missing or not a finite number)."""
    out = []
    for m in replies:
        metrics = metrics_or_empty(m)
        out.append({
            "node": m.metadata.src_node_id,
            "declined": declined_reason(m) is not None,
            "declined_reason": declined_reason(m),
            "epsilon": number(metrics, "epsilon"),
            "run_epsilon": number(metrics, "run-epsilon"),
            "planned_epsilon": number(metrics, "planned-epsilon"),
            "noise_multiplier": number(metrics, "noise-multiplier"),
            "planned_noise_multiplier": number(metrics, "planned-noise-multiplier"),
            "epsilon_limit": number(metrics, "epsilon-limit"),
        })
    return sorted(out, key=lambda site: site["node"])


# A site whose noise multiplier is this much above its plan is named: it calibrated to its limit.
RAISED_NOISE = 1.01


def raised_noise(replies: list[Message], labels: dict[int, str]) -> list[dict[str, Any]]:
    """The sites that trained with more noise than the run's plan (calibrated to their own
    limit): metrics.jsonl's `noise_raised`. Both figures are the site's own, and the plan's
    noise is what the site would have used within the run's target."""
    out = []
    for m in replies:
        metrics = metrics_or_empty(m)
        noise, planned = number(metrics, "noise-multiplier"), number(metrics, "planned-noise-multiplier")
        if noise is not None and planned and noise > planned * RAISED_NOISE:
            node = m.metadata.src_node_id
            out.append({"node": node, "site": called(node, labels), "noise_multiplier": noise,
                        "planned_noise_multiplier": planned, "increase": noise / planned})
    return sorted(out, key=lambda site: site["node"])


def note_raised_noise(progress: Progress, row: dict[str, Any]) -> None:
    """One line naming every site that trained this round with more noise than planned."""
    if row.get("noise_raised"):
        progress.note(f"round {row['round']}: " + "; ".join(raised_noise_line(s) for s in row["noise_raised"]))


def initial_row(eval_row: dict[str, Any], eval_replies: RoundReplies, query_failures: Counter, query_status: dict[int, str],
                seconds: float) -> dict[str, Any]:
    """Round 0: the initial adapter, evaluated before any training (an accounted release too)."""
    failures = query_failures + eval_replies.failures
    return {
        "round": 0, "clients_ok": 0, "clients_failed": sum(failures.values()), "clients_declined": 0,
        "failures": dict(failures), "updates_rejected": 0, "train_loss": None, **eval_row,
        "epsilon_max": max([0.0] + site_epsilons(eval_replies.ok)), "noise_multiplier": None, "site_privacy": [],
        "bytes_up": eval_replies.bytes_up, "bytes_down": eval_replies.bytes_down, "seconds": seconds,
        "sites": site_statuses(query_status, eval_replies.status),
    }


def training_row(server_round: int, state: RoundTraining, ended_early: bool, eval_row: dict[str, Any],
                 eval_replies: RoundReplies, epsilon_max: float, extra: dict[str, Any], config: Config,
                 seconds: float) -> dict[str, Any]:
    """A training round's row; `ended_early`: too few sites could train, nothing was aggregated."""
    failures = state.failures + Counter({f"rejected: {k}": v for k, v in state.rejected.items()})
    factor = config.strategy.max_weight_factor
    return {
        "round": server_round,
        "clients_ok": 0 if ended_early else len(state.updates),
        # Failures over all attempts, declines and rejected updates included (see "failures").
        "clients_failed": sum(failures.values()),
        "clients_declined": len(state.declined),
        # Sites that trained (and spent privacy budget) in a round too few others could join: their updates were dropped.
        "clients_discarded": len(state.updates) if ended_early else 0,
        "ended_early": ended_early,
        # The round's sum was formed under secure aggregation: the coordinator saw no single site's update.
        "secure_aggregation": config.federation.secure_aggregation and not ended_early,
        # Evaluation failures are listed too, but a site is counted once (as failed in training).
        "failures": {**dict(failures), **{f"evaluate: {k}": v for k, v in eval_replies.failures.items()}},
        "updates_rejected": sum(state.rejected.values()),
        "max_weight_share": None if ended_early else site_replies.max_weight_share(state.updates.values(), config),
        "attempts": state.attempts,
        "train_loss": weighted(state.trained, "train-loss", factor),
        **eval_row,
        "epsilon_max": epsilon_max,
        "noise_multiplier": weighted(state.trained, "noise-multiplier", factor) if config.privacy.enabled else None,
        "site_privacy": site_privacy(state.replies) if config.privacy.enabled else [],
        "bytes_up": state.bytes_up + eval_replies.bytes_up,
        "bytes_down": state.bytes_down + eval_replies.bytes_down,
        "seconds": seconds,
        "sites": site_statuses({**state.status, **(dict.fromkeys(state.updates, "discarded") if ended_early else {})},
                               eval_replies.status),
        **extra,
    }


def note_early_end(progress: Progress, row: dict[str, Any], state: RoundTraining, rounds: int, min_clients: int,
                   labels: dict[int, str] | None = None) -> None:
    """Why the run ends before its planned rounds, and which sites spent budget for nothing."""
    reasons = sorted({declined_reason(m) for m in state.declined.values()} | {
        k for k in state.failures if k in (REFUSED_APP, REFUSED_BASE_MODEL)})
    server_round = row["round"]
    progress.note(f"run ended after round {server_round - 1} of {rounds}, early: "
                  f"{len(state.declined) + len(state.refused)} sites declined or refused round {server_round} "
                  f"({', '.join(reasons)}) and fewer than federation.min_clients = {min_clients} could train")
    if state.updates:
        labels = labels or {}
        sites = ", ".join(called(n, labels) for n in sorted(state.updates))
        progress.note(f"round {server_round}: {sites} trained and spent "
                      "privacy budget, but their updates were discarded (too few sites to aggregate)")

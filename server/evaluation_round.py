"""A round's federated evaluation: the global adapter (at each site's rank) out, each
site's sums back (noisy under DP, accounted in its ledger), pooled into the round's
loss and accuracy or perplexity."""

from __future__ import annotations

import logging
import math
from typing import Any

from flwr.app import MessageType
from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter
from fedlora.server import site_replies
from fedlora.server.message_exchange import Envelope, RoundReplies, declined_reason, exchange
from fedlora.server.progress import Progress
from fedlora.server.site_replies import MalformedReply

log = logging.getLogger("fedlora.server")


def ratio_of_sums(evaluations: list[site_replies.Evaluation], attribute: str, max_weight_factor: float) -> float | None:
    """Sum of `attribute` over sum of num_examples (sites release noisy sums under DP); a site
    whose count exceeds max_weight_factor x the lower median count has both its sums
    scaled down to that bound (server/site_replies.py). Sites without the attribute are skipped."""
    pairs = [(v, e.num_examples) for e in evaluations if (v := getattr(e, attribute)) is not None]
    scales = site_replies.capped_scales([n for _, n in pairs], max_weight_factor)
    total = sum(s * n for s, (_, n) in zip(scales, pairs))
    return sum(s * v for s, (v, _) in zip(scales, pairs)) / total if pairs and total > 0 else None


def evaluate_round(grid: Grid, envelope: Envelope, adapters: dict[int, Adapter], server_round: int,
                   progress: Progress) -> tuple[dict[str, Any], RoundReplies]:
    config = envelope.config
    replies = exchange(grid, envelope.with_adapters(adapters, server_round), MessageType.EVALUATE, server_round,
                       config.federation.round_timeout, progress, "evaluate")
    evaluated, evaluations = [], []
    classification = config.model.task == "classification"
    for reply in replies.ok:
        if (reason := declined_reason(reply)) is not None:
            replies.failures[reason] += 1
            replies.status[reply.metadata.src_node_id] = reason
            log.warning("round %d evaluate: %s %s", server_round, progress.site(reply.metadata.src_node_id), reason)
            continue
        try:
            evaluation = site_replies.evaluation(reply, classification)
        except MalformedReply as exc:
            replies.failures[exc.category] += 1
            replies.status[reply.metadata.src_node_id] = exc.category
            log.warning("round %d evaluate: %s sent a malformed reply: %s", server_round, progress.site(reply.metadata.src_node_id),
                        exc)
        else:
            evaluated.append(reply)
            evaluations.append(evaluation)
    replies.ok = evaluated
    # Sums over sums (noised at each site under DP), each site's share bounded: clamped to what a mean can be.
    factor = config.strategy.max_weight_factor
    loss = ratio_of_sums(evaluations, "loss_sum", factor)
    row: dict[str, Any] = {"eval_loss": None if loss is None else max(0.0, loss)}
    # What the report needs to show the figures' noise: each site's sums carry N(0, sigma^2)
    # per unit of sensitivity, the count among them (server/run_report.py: noise_scale).
    sigmas = [s for r in evaluated if (s := site_replies.number(site_replies.metrics_or_empty(r), "noise-multiplier")) is not None]
    row["eval_sites"] = len(evaluations)
    row["eval_units"] = sum(e.num_examples for e in evaluations)
    row["eval_noise_multiplier"] = max(sigmas) if sigmas else None
    if classification:
        accuracy = ratio_of_sums(evaluations, "correct", factor)
        row["eval_accuracy"] = None if accuracy is None else min(1.0, max(0.0, accuracy))
    else:
        row["eval_perplexity"] = None if loss is None else math.exp(min(max(0.0, loss), 50.0))
    return row, replies

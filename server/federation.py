"""The coordinator's round loop, driven directly over Flower's Grid.

We drive `push_messages` / `pull_messages` ourselves (not Strategy.start) so that
each round can show live progress, count failures by reason, checkpoint, and
(later) resume. One round: send the global adapter -> validate replies ->
aggregate -> federated evaluation -> metrics row -> checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter, adapter_of, from_record, record_nbytes, to_record, write_peft_dir
from fedlora.base_model import build_peft_model, resolve_model_dir
from fedlora.config import Config, ConfigError
from fedlora.messages import config_record
from server.progress import Progress
from server.run_directory import RunDirectory
from strategies import ClientUpdate, get_strategy, trained_part
from strategies.lora_rank import to_rank
from privacy.accounting import epsilon_of
from privacy.central_dp import add_noise, clip_update
from strategies.update_validation import reason_category, screen_updates

log = logging.getLogger("fedlora.server")


class FederationError(RuntimeError):
    """The run cannot go on (for example fewer than min_clients replied)."""


@dataclass
class RoundReplies:
    ok: list[Message] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)  # reason -> count
    bytes_down: int = 0
    bytes_up: int = 0


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of federation.min_clients = {minimum} sites connected within {timeout:.0f}s")
        time.sleep(1.0)


def exchange(
    grid: Grid, contents: dict[int, RecordDict], message_type: str, server_round: int,
    timeout: float, progress: Progress, phase: str,
) -> RoundReplies:
    """Send each node its content and collect replies until all answered or `timeout`."""
    out = RoundReplies()
    messages = [Message(content=c, dst_node_id=n, message_type=message_type, group_id=str(server_round)) for n, c in contents.items()]
    pending = set(grid.push_messages(messages))
    out.bytes_down = sum(record_nbytes(c["arrays"]) for c in contents.values() if "arrays" in c.array_records)
    deadline = time.monotonic() + timeout
    progress.phase(server_round, phase, 0, len(messages))
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                out.failures[f"error: {reply.error.reason[:80]}"] += 1
                log.warning("round %d %s: node %d failed: %s", server_round, phase, reply.metadata.src_node_id, reply.error.reason)
                continue
            out.ok.append(reply)
            if "arrays" in reply.content.array_records:
                out.bytes_up += record_nbytes(reply.content["arrays"])
            progress.phase(server_round, phase, len(out.ok) + sum(out.failures.values()), len(messages))
        if pending:
            time.sleep(0.2)
    if pending:
        out.failures["timeout"] += len(pending)
        log.warning("round %d %s: %d nodes did not reply within %.0fs", server_round, phase, len(pending), timeout)
    return out


def weighted(replies: list[Message], key: str) -> float | None:
    pairs = [(m.content["metrics"][key], m.content["metrics"]["num-examples"]) for m in replies if key in m.content["metrics"]]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def site_privacy(replies: list[Message]) -> list[dict[str, Any]]:
    """Each site's privacy figures this round, as it reported them."""
    out = []
    for m in replies:
        metrics = m.content["metrics"]
        out.append({
            "node": m.metadata.src_node_id,
            "declined": "declined" in metrics,
            "epsilon": float(metrics["epsilon"]),
            "planned_epsilon": float(metrics["planned-epsilon"]) if "planned-epsilon" in metrics else None,
            "noise_multiplier": float(metrics["noise-multiplier"]) if "noise-multiplier" in metrics else None,
            "epsilon_limit": float(metrics["epsilon-limit"]) if "epsilon-limit" in metrics else None,
        })
    return sorted(out, key=lambda site: site["node"])


class SiteRanks:
    """Each site's LoRA rank (declared by the site in a query, once) and the global
    adapter re-factorized to it, so every site receives an adapter of its own rank."""

    def __init__(self, config: Config):
        self.config = config
        self.ranks: dict[int, int] = {}

    def learn(self, grid: Grid, nodes: list[int], server_round: int, progress: Progress) -> list[int]:
        """Ask sites not yet known for their rank; returns the nodes whose rank is known."""
        unknown = [n for n in nodes if n not in self.ranks]
        if unknown:
            content = RecordDict({"config": config_record(self.config, server_round)})
            replies = exchange(grid, {n: content for n in unknown}, MessageType.QUERY, server_round,
                               self.config.federation.round_timeout, progress, "rank query")
            for reply in replies.ok:
                self.ranks[reply.metadata.src_node_id] = int(reply.content["metrics"]["lora-rank"])
            declared = sorted(set(self.ranks.values()))
            if declared != [self.config.lora.rank] and self.config.strategy.name != "exact":
                raise FederationError(f"sites declare LoRA ranks {declared}; heterogeneous ranks need strategy.name = 'exact'")
        return [n for n in nodes if n in self.ranks]

    def adapters(self, global_adapter: Adapter, nodes: list[int]) -> dict[int, Adapter]:
        by_rank = {r: to_rank(global_adapter, r, self.config.run.seed) for r in {self.ranks[n] for n in nodes}}
        return {n: by_rank[self.ranks[n]] for n in nodes}


def contents_for(adapters: dict[int, Adapter], config: Config, server_round: int) -> dict[int, RecordDict]:
    records: dict[int, ArrayRecord] = {}  # one record per distinct adapter object
    return {
        n: RecordDict({"arrays": records.setdefault(id(a), to_record(a)), "config": config_record(config, server_round)})
        for n, a in adapters.items()
    }


def evaluate_round(grid: Grid, adapters: dict[int, Adapter], config: Config, server_round: int, progress: Progress) -> tuple[dict[str, Any], RoundReplies]:
    replies = exchange(grid, contents_for(adapters, config, server_round), MessageType.EVALUATE, server_round,
                       config.federation.round_timeout, progress, "evaluate")
    row: dict[str, Any] = {"eval_loss": weighted(replies.ok, "eval-loss")}
    if config.model.task == "classification":
        row["eval_accuracy"] = weighted(replies.ok, "eval-accuracy")
    else:
        row["eval_perplexity"] = weighted(replies.ok, "eval-perplexity")
    return row, replies


def run_federation(grid: Grid, config: Config) -> tuple[RunDirectory, list[dict[str, Any]]]:
    """Run all rounds; returns the run directory and the metrics rows."""
    if config.model.task == "classification" and not config.data.labels:
        raise ConfigError("data.labels is empty: list the label names in class-id order")
    try:
        strategy = get_strategy(config.strategy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    run_dir, config = RunDirectory.create(config)
    progress = Progress(config.federation.rounds)
    progress.note(f"run directory: {run_dir.path}")

    # The coordinator's copy of the model: the initial adapter (from the seed,
    # identical for every client) and the PEFT folder written at the end.
    model = build_peft_model(config.model, config.lora, num_labels=max(1, len(config.data.labels)), seed=config.run.seed)
    global_adapter = adapter_of(model)

    nodes = wait_for_nodes(grid, config.federation.min_clients, config.federation.round_timeout)
    progress.note(f"{len(nodes)} sites connected")
    site_ranks = SiteRanks(config)

    # Round 0: the initial adapter, evaluated before any training.
    start = time.monotonic()
    nodes = site_ranks.learn(grid, nodes, 0, progress)
    eval_row, eval_replies = evaluate_round(grid, site_ranks.adapters(global_adapter, nodes), config, 0, progress)
    rows = [{
        "round": 0, "clients_ok": 0, "clients_failed": 0, "clients_declined": 0, "failures": {}, "updates_rejected": 0,
        "train_loss": None, **eval_row, "epsilon_max": 0.0, "noise_multiplier": None, "site_privacy": [],
        "bytes_up": eval_replies.bytes_up, "bytes_down": eval_replies.bytes_down,
        "seconds": time.monotonic() - start,
    }]
    run_dir.append_metrics(rows[0])
    progress.round_done(rows[0])
    epsilon_max = 0.0
    central_history: list[tuple[float, float, int]] = []  # central DP: one Gaussian mechanism per round

    for server_round in range(1, config.federation.rounds + 1):
        start = time.monotonic()
        nodes = site_ranks.learn(grid, sorted(grid.get_node_ids()), server_round, progress)
        sent = site_ranks.adapters(global_adapter, nodes)
        replies = exchange(grid, contents_for(sent, config, server_round), MessageType.TRAIN, server_round,
                           config.federation.round_timeout, progress, "train")

        # A site whose privacy budget cannot afford the round declines it (no tensors).
        declined = [m for m in replies.ok if "declined" in m.content["metrics"]]
        trained_replies = [m for m in replies.ok if "declined" not in m.content["metrics"]]
        failures = Counter(replies.failures)
        if declined:
            failures["declined: privacy budget"] += len(declined)
            for m in declined:
                log.info("round %d: node %d declined: its epsilon would reach %.3f > its limit %.3f", server_round,
                         m.metadata.src_node_id, m.content["metrics"]["epsilon-would-be"], m.content["metrics"]["epsilon-limit"])

        # Sites send back the tensors they train (all, or all but the frozen factors).
        expected = {n: trained_part(a, strategy.frozen_factors) for n, a in sent.items()}
        received = [
            ClientUpdate(reply.metadata.src_node_id, from_record(reply.content["arrays"]), int(reply.content["metrics"]["num-examples"]))
            for reply in trained_replies
        ]
        updates, refused = screen_updates(received, expected, config.strategy)
        rejected = Counter(reason_category(reason) for _, reason in refused)
        for node_id, reason in refused:
            log.warning("round %d: update from node %d rejected: %s", server_round, node_id, reason)
        epsilon_max = max([epsilon_max] + [float(m.content["metrics"]["epsilon"]) for m in replies.ok])
        # Sites whose own privacy limits are reached end the run; that is not a failure.
        budgets_exhausted = bool(declined) and len(updates) < config.federation.min_clients <= len(updates) + len(declined)
        if len(updates) < config.federation.min_clients and not budgets_exhausted:
            raise FederationError(
                f"round {server_round}: {len(updates)} usable updates, fewer than federation.min_clients = {config.federation.min_clients}"
                f" (failures: {dict(failures) or 'none'}, rejected: {dict(rejected) or 'none'})"
            )
        central_row: dict[str, Any] = {}
        if budgets_exhausted:
            quality = "eval_accuracy" if config.model.task == "classification" else "eval_perplexity"
            eval_row, eval_replies = {"eval_loss": None, quality: None}, RoundReplies()
        else:
            if config.privacy.central:
                # Every site weighs the same and moves the mean by at most clip_norm / n.
                clip = config.privacy.central_clip_norm
                updates = [ClientUpdate(u.node_id, clip_update(u.adapter, expected[u.node_id], clip), 1) for u in updates]
            global_adapter = strategy.aggregate(global_adapter, updates)
            if config.privacy.central:
                std = config.privacy.central_noise_multiplier * config.privacy.central_clip_norm / len(updates)
                global_adapter = add_noise(global_adapter, sorted(updates[0].adapter), std)
                asked = len(nodes) / max(len(nodes), len(grid.get_node_ids()))  # sampling rate of sites
                central_history.append((config.privacy.central_noise_multiplier, asked, 1))
                central_row = {"central_noise_std": std,
                               "central_epsilon": epsilon_of(central_history, config.privacy.delta, config.privacy.accountant)}
            eval_row, eval_replies = evaluate_round(grid, site_ranks.adapters(global_adapter, nodes), config, server_round, progress)
        row = {
            "round": server_round,
            "clients_ok": 0 if budgets_exhausted else len(updates),
            "clients_failed": sum(failures.values()) + sum(rejected.values()),
            "clients_declined": len(declined),
            "failures": {**dict(failures), **{f"rejected: {k}": v for k, v in rejected.items()}},
            "updates_rejected": sum(rejected.values()),
            "train_loss": weighted(trained_replies, "train-loss"),
            **eval_row,
            "epsilon_max": epsilon_max,
            "noise_multiplier": weighted(trained_replies, "noise-multiplier") if config.privacy.enabled else None,
            "site_privacy": site_privacy(replies.ok) if config.privacy.enabled else [],
            **central_row,
            "bytes_up": replies.bytes_up + eval_replies.bytes_up,
            "bytes_down": replies.bytes_down + eval_replies.bytes_down,
            "seconds": time.monotonic() - start,
            **strategy.round_metrics(),
        }
        run_dir.append_metrics(row)
        run_dir.checkpoint(server_round, global_adapter, strategy.state(),
                           {"strategy": strategy.name, "metrics": row, "central_history": central_history})
        progress.round_done(row)
        rows.append(row)
        if budgets_exhausted:
            progress.note(f"run ended after round {server_round - 1}: {len(declined)} sites declined round {server_round} "
                          f"(privacy budget) and fewer than federation.min_clients = {config.federation.min_clients} could train")
            break

    write_peft_dir(model, global_adapter, run_dir.path / "adapter", resolve_model_dir(config.model.path))
    progress.note(f"final adapter: {run_dir.path / 'adapter'}")
    return run_dir, rows

"""The coordinator's round loop, driven directly over Flower's Grid.

We drive `push_messages` / `pull_messages` ourselves (not Strategy.start) so that
each round can show live progress, count failures by reason, retry, checkpoint and
resume. One round: train (server/round_policy.py: sampling, attempts, retries, over
the message exchange of server/message_exchange.py) -> aggregate (the strategy,
wrapped by central DP when it is on) -> federated evaluation
(server/evaluation_round.py) -> metrics row (server/round_rows.py) -> checkpoint.
Nothing waits forever: every exchange has `federation.round_timeout`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter, adapter_of, write_peft_dir
from fedlora.base_fingerprint import model_fingerprint
from fedlora.base_model import build_peft_model, resolve_model_dir
from fedlora.config import Config, ConfigError, evaluated_rounds
from fedlora.server.evaluation_round import evaluate_round
from fedlora.server.message_exchange import Envelope, RoundReplies, wait_for_nodes
from fedlora.server.progress import Progress
from fedlora.server.round_policy import RoundTraining, sample_sites, train_round
from fedlora.server import site_names
from fedlora.server.round_rows import (initial_row, note_early_end, note_raised_noise, note_site_problems, raised_noise,
                                       site_epsilons, training_row)
from fedlora.server.dossier import write_dossier
from fedlora.server.run_directory import RunDirectory
from fedlora.server.site_ranks import SiteRanks
from fedlora.server.registered_keys import KeyRegistry
from fedlora.server.statement_book import StatementBook
from fedlora.strategies import Strategy, get_strategy
from fedlora.strategies.central_dp import CentralDP
from fedlora.strategies.lora_rank import lora_rank, to_rank


def aggregate(strategy: Strategy, global_adapter: Adapter, state: RoundTraining, seed: int,
              central: CentralDP | None = None) -> Adapter:
    """The next global adapter from the round's accepted updates. Each update carries what
    its site was sent, so that strategies aggregate changes (sites of another LoRA rank
    start from a truncated or padded copy). The global adapter grows to the largest LoRA
    rank sent this round (the largest declared rank when every site is asked) and never
    shrinks: no site's rank is lost to it."""
    ranks = [r for r in [lora_rank(global_adapter), *(lora_rank(a) for a in state.sent.values())] if r is not None]
    if ranks:
        global_adapter = to_rank(global_adapter, max(ranks), seed)
    if state.secure.weight:  # secure aggregation: the sites' weighted mean, as one update
        return strategy.aggregate(global_adapter, [state.secure.update(global_adapter, strategy.frozen_factors)])
    updates = [replace(u, sent=state.sent.get(u.node_id)) for u in state.updates.values()]
    if central is None:
        return strategy.aggregate(global_adapter, updates)
    return central.aggregate(global_adapter, updates, sampling_rate=len(state.asked) / max(1, state.connected))


def run_federation(grid: Grid, config: Config) -> tuple[RunDirectory, list[dict[str, Any]]]:
    """Run all rounds (or the rest of them, with run.resume); returns the run directory
    and the metrics rows."""
    # The run: resumed from its last checkpoint (whose saved config decides the model,
    # the LoRA shape and the strategy), or new (checked before its directory is made).
    if config.run.resume:
        run_dir, config, resumed = RunDirectory.resume(config)
        strategy = strategy_of(config)
    else:
        strategy = strategy_of(config)
        (run_dir, config), resumed = RunDirectory.create(config), None
    model = build_peft_model(config.model, config.lora, num_labels=max(1, len(config.data.labels)), seed=config.run.seed)
    global_adapter, rows, last_round, central_history = adapter_of(model), [], 0, []
    if resumed is not None:
        rows = resumed.rows
        if resumed.round > 0:
            global_adapter, last_round = resumed.adapter, resumed.round
            strategy.load_state(resumed.strategy_state)
            central_history = [tuple(h) for h in resumed.state.get("central_history", [])]
    central = CentralDP(strategy, config.privacy, central_history) if config.privacy.central else None
    epsilon_max = max([0.0] + [r.get("epsilon_max") or 0.0 for r in rows])
    progress = Progress(config.federation.rounds)
    progress.site = site_names.SiteNamer(run_dir.path, coordinator_dir())  # the log lines name sites as the report does
    progress.note(f"run directory: {run_dir.path}" + (f" (resumed after round {last_round})" if resumed else ""))

    # The sites: connected, told the run and the base model's fingerprint, asked their rank.
    envelope = Envelope(config, model_fingerprint(resolve_model_dir(config.model.path)))
    nodes = wait_for_nodes(grid, config.federation.min_clients, config.federation.round_timeout)
    progress.note(f"{len(nodes)} sites connected")
    site_ranks = SiteRanks(envelope)
    statements = StatementBook(run_dir.path, KeyRegistry(config, run_dir.path))  # RUN_DIR/statements.jsonl

    if not rows:  # round 0: the initial adapter, evaluated before any training
        start = time.monotonic()
        nodes, query_failures, query_status = site_ranks.learn(grid, sample_sites(nodes, config, 0), 0, progress)
        eval_row, eval_replies = evaluate_round(grid, envelope, site_ranks.adapters(global_adapter, nodes), 0, progress)
        statements.take(eval_replies.ok, 0, "evaluate")
        rows = [initial_row(eval_row, eval_replies, query_failures, query_status, time.monotonic() - start)]
        epsilon_max = rows[0]["epsilon_max"]
        record_row(run_dir, progress, rows[0], site_labels(run_dir, nodes))

    for server_round in range(last_round + 1, config.federation.rounds + 1):
        start = time.monotonic()
        state, ended_early = train_round(grid, envelope, site_ranks, strategy, global_adapter, server_round, progress)
        statements.take(state.replies, server_round, "train")  # also when the round ended early: they spent
        if ended_early:  # too few sites could train: nothing to aggregate or evaluate
            eval_row, eval_replies = unevaluated(config), RoundReplies()
        else:
            global_adapter = aggregate(strategy, global_adapter, state, config.run.seed, central)
            if server_round in evaluated_rounds(config):
                evaluated = site_ranks.adapters(global_adapter, sorted(state.updates))
                eval_row, eval_replies = evaluate_round(grid, envelope, evaluated, server_round, progress)
            else:  # federation.evaluate_every
                eval_row, eval_replies = unevaluated(config), RoundReplies()
        statements.take(eval_replies.ok, server_round, "evaluate")
        epsilon_max = max([epsilon_max] + site_epsilons(state.replies) + site_epsilons(eval_replies.ok))
        labels = site_labels(run_dir, [*nodes, *state.status])
        extra = {**(central.round_metrics() if central else {}), **strategy.round_metrics(),
                 **({"noise_raised": raised_noise(state.trained, labels)} if config.privacy.enabled else {})}
        row = training_row(server_round, state, ended_early, eval_row, eval_replies, epsilon_max, extra, config,
                           time.monotonic() - start)
        record_row(run_dir, progress, row, labels)
        rows.append(row)
        if ended_early:
            # No checkpoint: nothing was trained, and a resume (after sites raise their limits) redoes this round.
            note_early_end(progress, row, state, config.federation.rounds, config.federation.min_clients, labels)
            break
        # The row first, then the checkpoint: a crash between them is resumed from the
        # previous checkpoint, and the resume drops this row before redoing the round.
        run_dir.checkpoint(server_round, global_adapter, strategy.state(), {
            "strategy": strategy.name, "metrics": row, "central_history": central.history if central else []})

    write_final_adapter(config, global_adapter, run_dir, rows, progress)
    progress.note(f"dossier: {write_dossier(run_dir.path)}")
    return run_dir, rows


def strategy_of(config: Config) -> Strategy:
    if config.model.task == "classification" and not config.data.labels:
        raise ConfigError("data.labels is empty: list the label names in class-id order")
    try:
        return get_strategy(config.strategy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def unevaluated(config: Config) -> dict[str, Any]:
    return {"eval_loss": None, "eval_accuracy" if config.model.task == "classification" else "eval_perplexity": None}


def coordinator_dir() -> Path | None:
    """Where the operator's site names are: a deployed ServerApp runs in the directory its
    SuperLink was started in, which `fedlora coordinator` makes its state dir."""
    return Path.cwd() if (Path.cwd() / site_names.NAMES_FILE).is_file() else None


def site_labels(run_dir: RunDirectory, nodes: list[int]) -> dict[int, str]:
    """What console lines and the report call each site (server/site_names.py), kept in the
    run directory."""
    return site_names.record_run_labels(run_dir.path, coordinator_dir(), nodes)


def record_row(run_dir: RunDirectory, progress: Progress, row: dict[str, Any], labels: dict[int, str]) -> None:
    run_dir.append_metrics(row)
    progress.round_done(row)
    note_site_problems(progress, row, labels)
    note_raised_noise(progress, row)


def write_final_adapter(config: Config, global_adapter: Adapter, run_dir: RunDirectory, rows: list[dict[str, Any]],
                        progress: Progress) -> None:
    """The global adapter as a PEFT folder, at its LoRA rank (the largest declared one;
    alpha scaled with it)."""
    rank = lora_rank(global_adapter) or config.lora.rank
    lora = config.lora if rank == config.lora.rank else replace(config.lora, rank=rank, alpha=config.lora.alpha * rank / config.lora.rank)
    model = build_peft_model(config.model, lora, num_labels=max(1, len(config.data.labels)), seed=config.run.seed)
    write_peft_dir(model, global_adapter, run_dir.path / "adapter", config.model.path)
    trained = rows[-1]["round"] - (1 if rows[-1].get("ended_early") else 0)
    planned = "" if trained == config.federation.rounds else f" (after round {trained} of the planned {config.federation.rounds})"
    progress.note(f"final adapter{planned}: {run_dir.path / 'adapter'}")

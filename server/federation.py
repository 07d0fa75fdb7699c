"""The coordinator's round loop, driven directly over Flower's Grid.

We drive `push_messages` / `pull_messages` ourselves (not Strategy.start) so that
each round can show live progress, count failures by reason, retry, checkpoint and
resume. One round: send the global adapter -> validate replies -> aggregate ->
federated evaluation -> metrics row -> checkpoint. Nothing waits forever: every
exchange has `federation.round_timeout`, and a round that cannot gather
`federation.min_clients` updates is tried `federation.round_retries` more times.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter, adapter_of, record_nbytes, to_record, write_peft_dir
from fedlora.base_fingerprint import model_fingerprint
from fedlora.base_model import build_peft_model, resolve_model_dir
from fedlora.config import Config, ConfigError
from fedlora.messages import SITE_ERROR_CATEGORIES, config_record, declined_key
from fedlora.privacy.accounting import epsilon_of
from fedlora.privacy.central_dp import add_noise, clip_update
from fedlora.server import site_replies
from fedlora.server.progress import Progress
from fedlora.server.run_directory import RunDirectory
from fedlora.server.site_replies import MalformedReply, metrics_or_empty, number
from fedlora.strategies import ClientUpdate, Strategy, get_strategy, trained_part
from fedlora.strategies.lora_rank import lora_rank, to_rank
from fedlora.strategies.update_validation import reason_category, screen_updates

log = logging.getLogger("fedlora.server")

REFUSED_BASE_MODEL = "refused: different base model"
REFUSED_APP = "refused: app not approved"


class FederationError(RuntimeError):
    """The run cannot go on (for example fewer than min_clients replied)."""


@dataclass
class RoundReplies:
    ok: list[Message] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)  # reason -> count
    refused: set[int] = field(default_factory=set)  # sites that refuse this run (app, base model): for good
    status: dict[int, str] = field(default_factory=dict)  # node -> "ok" or why not (metrics.jsonl's "sites")
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
    # Who a reply is from, by the message it answers: an error reply made by the SuperLink for
    # a site that went away carries the SuperLink's node id as its source, not the site's.
    pushed = list(zip(grid.push_messages(messages), contents))
    node_of = {message_id: node for message_id, node in pushed if message_id is not None}
    for node in [node for message_id, node in pushed if message_id is None]:  # Flower could not push it
        out.failures["not sent"] += 1
        out.status[node] = "not sent"
    pending = set(node_of)
    out.bytes_down = sum(record_nbytes(c["arrays"]) for c in contents.values() if "arrays" in c.array_records)
    deadline = time.monotonic() + timeout
    progress.phase(server_round, phase, 0, len(messages))
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                reason = reply.error.reason if isinstance(reply.error.reason, str) else ""
                category = error_category(reason)
                out.failures[category] += 1
                out.status[node] = category
                if category == REFUSED_APP:
                    out.refused.add(node)
                log.warning("round %d %s: node %d failed: %s", server_round, phase, node, reason[:500])
            elif "refused-base-model" in metrics_or_empty(reply):
                out.failures[REFUSED_BASE_MODEL] += 1
                out.status[node] = REFUSED_BASE_MODEL
                out.refused.add(node)
                log.error("round %d %s: node %d refused: it holds a different base model than model.path", server_round, phase, node)
            else:
                out.ok.append(reply)
                out.status[node] = "ok"
                if "arrays" in reply.content.array_records:
                    out.bytes_up += record_nbytes(reply.content["arrays"])
            progress.phase(server_round, phase, len(out.ok) + sum(out.failures.values()), len(messages))
        if pending:
            time.sleep(0.2)
    if pending:
        out.failures["timeout"] += len(pending)
        late = sorted(node_of[m] for m in pending)
        out.status.update(dict.fromkeys(late, "timeout"))
        log.warning("round %d %s: node(s) %s did not reply within %.0fs", server_round, phase, ", ".join(map(str, late)), timeout)
    return out


def error_category(reason: str) -> str:
    """A key from a fixed set for a failure reason in metrics.jsonl (the log has it whole).
    fedlora sites send only fixed categories (client/reply_guard.py); any other text (a
    site running other code, Flower's own errors) is "error: other": it is the replier's
    free text, and a metrics key should neither carry it nor grow without bound."""
    if "Node Unavailable" in reason:
        return "node unavailable"  # the site stopped sending heartbeats (killed, network down)
    if reason == REFUSED_APP:
        return REFUSED_APP
    if reason in SITE_ERROR_CATEGORIES:
        return f"error: {reason}"
    return "error: other" if reason else "error"


def declined_reason(reply: Message) -> str | None:
    """"declined: privacy budget" or "declined: site policy: <key>" for a declining reply."""
    metrics = metrics_or_empty(reply)
    return f"declined: {declined_key(dict(metrics))}" if "declined" in metrics else None


def ratio_of_sums(evaluations: list[site_replies.Evaluation], attribute: str, max_weight_factor: float) -> float | None:
    """Sum of `attribute` over sum of num_examples (sites release noisy sums under DP); a site
    whose count exceeds max_weight_factor x the lower median count has both its sums
    scaled down to that bound (server/site_replies.py). Sites without the attribute are skipped."""
    pairs = [(v, e.num_examples) for e in evaluations if (v := getattr(e, attribute)) is not None]
    scales = site_replies.capped_scales([n for _, n in pairs], max_weight_factor)
    total = sum(s * n for s, (_, n) in zip(scales, pairs))
    return sum(s * v for s, (v, _) in zip(scales, pairs)) / total if pairs and total > 0 else None


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


def note_site_problems(progress: Progress, row: dict[str, Any]) -> None:
    """One line naming every site that did not deliver this round, and why."""
    problems = [f"node {s['node']} {phase}: {s[phase]}" for s in row["sites"] for phase in ("train", "evaluate")
                if s[phase] not in (None, "ok")]
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
            "planned_epsilon": number(metrics, "planned-epsilon"),
            "noise_multiplier": number(metrics, "noise-multiplier"),
            "epsilon_limit": number(metrics, "epsilon-limit"),
        })
    return sorted(out, key=lambda site: site["node"])


class Envelope:
    """What goes down with every message: the run config, the round, and the
    fingerprint of the coordinator's base model (sites holding another one refuse)."""

    def __init__(self, config: Config, base_fingerprint: str):
        self.config = config
        self.base_fingerprint = base_fingerprint
        self._records: tuple[int, ConfigRecord] | None = None  # the round's config record, built once

    def config_record(self, server_round: int) -> ConfigRecord:
        if self._records is None or self._records[0] != server_round:
            self._records = (server_round, config_record(self.config, server_round, self.base_fingerprint))
        return self._records[1]

    def content(self, server_round: int, arrays: ArrayRecord | None = None) -> RecordDict:
        records: dict[str, Any] = {"config": self.config_record(server_round)}
        if arrays is not None:
            records["arrays"] = arrays
        return RecordDict(records)

    def with_adapters(self, adapters: dict[int, Adapter], server_round: int) -> dict[int, RecordDict]:
        records: dict[int, ArrayRecord] = {}  # one record per distinct adapter object
        return {n: self.content(server_round, records.setdefault(id(a), to_record(a))) for n, a in adapters.items()}


class SiteRanks:
    """Each site's LoRA rank (declared by the site in a query, once) and the global
    adapter re-factorized to it, so every site receives an adapter of its own rank."""

    def __init__(self, envelope: Envelope):
        self.envelope = envelope
        self.config = envelope.config
        self.ranks: dict[int, int] = {}
        self.refused: set[int] = set()  # sites that refused this run (they are asked again, and refuse again)

    def learn(self, grid: Grid, nodes: list[int], server_round: int, progress: Progress) -> tuple[list[int], Counter, dict[int, str]]:
        """Ask sites not yet known for their rank; returns the nodes whose rank is known,
        the failures of this query (refusals, errors, timeouts) and each failed node's reason."""
        unknown = [n for n in nodes if n not in self.ranks]
        failures: Counter = Counter()
        status: dict[int, str] = {}
        if unknown:
            replies = exchange(grid, {n: self.envelope.content(server_round) for n in unknown}, MessageType.QUERY,
                               server_round, self.config.federation.round_timeout, progress, "rank query")
            failures = replies.failures
            status = {n: s for n, s in replies.status.items() if s != "ok"}
            self.refused |= replies.refused
            for reply in replies.ok:
                if (reason := declined_reason(reply)) is not None:
                    failures[reason] += 1
                    status[reply.metadata.src_node_id] = reason
                    log.warning("round %d: node %d %s", server_round, reply.metadata.src_node_id, reason)
                else:
                    try:
                        self.ranks[reply.metadata.src_node_id] = site_replies.lora_rank(reply)
                    except MalformedReply as exc:
                        failures[exc.category] += 1
                        status[reply.metadata.src_node_id] = exc.category
                        log.warning("round %d rank query: node %d sent a malformed reply: %s", server_round,
                                    reply.metadata.src_node_id, exc)
            declared = sorted(set(self.ranks.values()))
            if declared and declared != [self.config.lora.rank] and self.config.strategy.name != "exact":
                raise FederationError(f"sites declare LoRA ranks {declared}; heterogeneous ranks need strategy.name = 'exact'")
        return [n for n in nodes if n in self.ranks], failures, status

    def adapters(self, global_adapter: Adapter, nodes: list[int]) -> dict[int, Adapter]:
        by_rank = {r: to_rank(global_adapter, r, self.config.run.seed) for r in {self.ranks[n] for n in nodes}}
        return {n: by_rank[self.ranks[n]] for n in nodes}


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
            log.warning("round %d evaluate: node %d %s", server_round, reply.metadata.src_node_id, reason)
            continue
        try:
            evaluation = site_replies.evaluation(reply, classification)
        except MalformedReply as exc:
            replies.failures[exc.category] += 1
            replies.status[reply.metadata.src_node_id] = exc.category
            log.warning("round %d evaluate: node %d sent a malformed reply: %s", server_round, reply.metadata.src_node_id, exc)
        else:
            evaluated.append(reply)
            evaluations.append(evaluation)
    replies.ok = evaluated
    # Sums over sums (noised at each site under DP), each site's share bounded: clamped to what a mean can be.
    factor = config.strategy.max_weight_factor
    loss = ratio_of_sums(evaluations, "loss_sum", factor)
    row: dict[str, Any] = {"eval_loss": None if loss is None else max(0.0, loss)}
    if classification:
        accuracy = ratio_of_sums(evaluations, "correct", factor)
        row["eval_accuracy"] = None if accuracy is None else min(1.0, max(0.0, accuracy))
    else:
        row["eval_perplexity"] = None if loss is None else math.exp(min(max(0.0, loss), 50.0))
    return row, replies


def sample_sites(nodes: list[int], config: Config, server_round: int, count: int | None = None) -> list[int]:
    """`count` (default `federation.clients_per_round`; 0 = all) of the connected sites.
    Drawn from the run seed (reproducible), except under central DP, whose accounting
    assumes that nobody can predict the sample (privacy amplification by sampling)."""
    k = config.federation.clients_per_round if count is None else count
    if k == 0 or k >= len(nodes):
        return nodes
    rng = random.SystemRandom() if config.privacy.central else random.Random(f"{config.run.seed}/{server_round}/{len(nodes)}/{k}")
    return sorted(rng.sample(nodes, k))


@dataclass
class RoundTraining:
    """A round's training phase over all its attempts: a site that delivered a usable
    update or declined is not asked again; only failed ones (or replacements) are."""

    asked: list[int] = field(default_factory=list)
    connected: int = 0  # sites connected when the round sampled (for central DP's rate)
    sent: dict[int, Adapter] = field(default_factory=dict)
    updates: dict[int, ClientUpdate] = field(default_factory=dict)
    declined: dict[int, Message] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)  # sites that refuse the run (app not approved, other base model)
    replies: list[Message] = field(default_factory=list)  # every non-error reply (trained or declined)
    failures: Counter = field(default_factory=Counter)  # over all attempts, declines included
    rejected: Counter = field(default_factory=Counter)  # screened-out updates, by category
    status: dict[int, str] = field(default_factory=dict)  # node -> "ok" or why not, as of its last attempt
    bytes_up: int = 0
    bytes_down: int = 0
    attempts: int = 0

    @property
    def trained(self) -> list[Message]:
        return [m for m in self.replies if declined_reason(m) is None]

    def pending(self) -> list[int]:
        return [n for n in self.asked if n not in self.updates and n not in self.declined and n not in self.refused]


def train_attempt(grid: Grid, envelope: Envelope, site_ranks: SiteRanks, strategy: Strategy, global_adapter: Adapter,
                  server_round: int, nodes: list[int], state: RoundTraining, progress: Progress) -> None:
    """Send the round's adapter to `nodes`, screen what comes back, add it to `state`."""
    config = envelope.config
    state.attempts += 1
    known, failures, query_status = site_ranks.learn(grid, nodes, server_round, progress)
    sent = site_ranks.adapters(global_adapter, known)
    replies = exchange(grid, envelope.with_adapters(sent, server_round), MessageType.TRAIN, server_round,
                       config.federation.round_timeout, progress, "train")
    state.status.update({**query_status, **replies.status})
    state.sent.update(sent)
    state.refused |= (site_ranks.refused | replies.refused) & set(nodes)
    state.failures += failures + replies.failures
    state.bytes_up += replies.bytes_up
    state.bytes_down += replies.bytes_down
    state.replies += replies.ok

    # A site declines a round its privacy budget cannot afford, or one outside its policy (no tensors).
    for m in replies.ok:
        if (reason := declined_reason(m)) is not None:
            state.declined[m.metadata.src_node_id] = m
            state.failures[reason] += 1
            state.status[m.metadata.src_node_id] = reason
            log.info("round %d: node %d %s", server_round, m.metadata.src_node_id, reason)

    # Sites send back the tensors they train (all, or all but the frozen factors).
    expected = {n: trained_part(a, strategy.frozen_factors) for n, a in sent.items()}
    received: list[ClientUpdate] = []
    for m in replies.ok:
        if declined_reason(m) is not None:
            continue
        try:
            received.append(site_replies.train_update(m))
        except MalformedReply as exc:
            state.failures[exc.category] += 1
            state.status[m.metadata.src_node_id] = exc.category
            log.warning("round %d: node %d sent a malformed reply: %s", server_round, m.metadata.src_node_id, exc)
    # Under central DP a site's update must not decide whether another's is kept (that would
    # break the sensitivity bound): only the per-update checks apply, not the outlier rule.
    section = replace(config.strategy, outlier_factor=0.0) if config.privacy.central else config.strategy
    updates, refused = screen_updates(received, expected, section)
    for node_id, reason in refused:
        state.status[node_id] = f"rejected: {reason_category(reason)}"
        log.warning("round %d: update from node %d rejected: %s", server_round, node_id, reason)
    state.rejected += Counter(reason_category(reason) for _, reason in refused)
    state.updates.update({u.node_id: u for u in updates})
    # Bounded weights, over the round's accepted updates from every attempt (from what each site claimed).
    state.updates.update({u.node_id: u for u in site_replies.capped_updates(state.updates.values(), config.strategy.max_weight_factor)})


def aggregate(strategy: Strategy, global_adapter: Adapter, state: RoundTraining, config: Config,
              central_history: list[tuple[float, float, int]]) -> tuple[Adapter, dict[str, Any]]:
    """The strategy's aggregate; under central DP, of clipped unweighted updates plus noise.
    Each update carries what its site was sent, so that strategies aggregate changes
    (sites of another LoRA rank start from a truncated or padded copy). The global
    adapter grows to the largest LoRA rank sent this round (the largest declared rank
    when every site is asked) and never shrinks: no site's rank is lost to it."""
    ranks = [r for r in [lora_rank(global_adapter), *(lora_rank(a) for a in state.sent.values())] if r is not None]
    if ranks:
        global_adapter = to_rank(global_adapter, max(ranks), config.run.seed)
    updates = [replace(u, sent=state.sent.get(u.node_id)) for u in state.updates.values()]
    if not config.privacy.central:
        return strategy.aggregate(global_adapter, updates), {}
    privacy = config.privacy
    expected = {n: trained_part(a, strategy.frozen_factors) for n, a in state.sent.items()}
    # Every site weighs the same and moves the mean by at most clip_norm / n.
    clipped = [ClientUpdate(u.node_id, clip_update(u.adapter, expected[u.node_id], privacy.central_clip_norm), 1, u.sent)
               for u in updates]
    std = privacy.central_noise_multiplier * privacy.central_clip_norm / len(clipped)
    new_adapter = add_noise(strategy.aggregate(global_adapter, clipped), sorted(clipped[0].adapter), std)
    rate = min(1.0, len(state.asked) / max(1, state.connected))  # sites asked / sites there were to ask
    central_history.append((privacy.central_noise_multiplier, rate, 1))
    return new_adapter, {"central_noise_std": std, "central_epsilon": epsilon_of(central_history, privacy.delta, privacy.accountant)}


def train_round(grid: Grid, envelope: Envelope, site_ranks: SiteRanks, strategy: Strategy, global_adapter: Adapter,
                server_round: int, progress: Progress) -> tuple[RoundTraining, bool]:
    """Attempts until `min_clients` usable updates, or the sites' budgets leave too few
    to reach it (returns budgets_exhausted = True); FederationError after the retries."""
    config = envelope.config
    minimum = config.federation.min_clients
    connected = sorted(grid.get_node_ids())
    state = RoundTraining(asked=sample_sites(connected, config, server_round), connected=len(connected))
    nodes = list(state.asked)
    while True:
        train_attempt(grid, envelope, site_ranks, strategy, global_adapter, server_round, nodes, state, progress)
        if len(state.updates) >= minimum:
            return state, False
        connected = sorted(grid.get_node_ids())
        if len(connected) - len((set(state.declined) | state.refused) & set(connected)) < minimum:
            # Not a crash: the sites' own limits, policies or app approvals end the run, and asking
            # them again would get the same answer.
            return state, True
        if state.attempts > config.federation.round_retries:
            raise FederationError(
                f"round {server_round}: fewer than federation.min_clients = {minimum} usable updates in "
                f"{state.attempts} attempts (failures: {dict(state.failures) or 'none'}, rejected: {dict(state.rejected) or 'none'})"
            )
        # Ask again only the sites that neither delivered nor declined, plus replacements
        # for them from the sites not asked yet (when the round samples).
        nodes = state.pending()
        fresh = [n for n in connected if n not in state.asked]
        if config.federation.clients_per_round:
            fresh = sample_sites(fresh, config, server_round * 1000 + state.attempts, count=min(len(nodes), len(fresh)))
        nodes += fresh
        state.asked += fresh
        state.connected = max(state.connected, len(set(connected) | set(state.asked)))
        log.warning("round %d attempt %d: %d usable updates, fewer than federation.min_clients = %d; asking %d sites again",
                    server_round, state.attempts, len(state.updates), minimum, len(nodes))


def run_federation(grid: Grid, config: Config) -> tuple[RunDirectory, list[dict[str, Any]]]:
    """Run all rounds (or the rest of them, with run.resume); returns the run directory
    and the metrics rows."""
    resumed = None
    if config.run.resume:
        # The run's own saved config decides the model, the LoRA shape and the strategy.
        run_dir, config, resumed = RunDirectory.resume(config)
    if config.model.task == "classification" and not config.data.labels:
        raise ConfigError("data.labels is empty: list the label names in class-id order")
    try:
        strategy = get_strategy(config.strategy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    # The coordinator's copy of the model: the initial adapter (from the seed,
    # identical for every client) and the PEFT folder written at the end.
    model = build_peft_model(config.model, config.lora, num_labels=max(1, len(config.data.labels)), seed=config.run.seed)
    global_adapter = adapter_of(model)
    epsilon_max, central_history, last_round = 0.0, [], 0

    if resumed is not None:
        rows = resumed.rows
        if resumed.round > 0:
            global_adapter, last_round = resumed.adapter, resumed.round
            strategy.load_state(resumed.strategy_state)
            central_history = [tuple(h) for h in resumed.state.get("central_history", [])]
            epsilon_max = max([0.0] + [r.get("epsilon_max") or 0.0 for r in rows])
    else:
        run_dir, config = RunDirectory.create(config)
        rows = []
    progress = Progress(config.federation.rounds)
    progress.note(f"run directory: {run_dir.path}" + (f" (resumed after round {last_round})" if resumed else ""))

    envelope = Envelope(config, model_fingerprint(resolve_model_dir(config.model.path)))
    nodes = wait_for_nodes(grid, config.federation.min_clients, config.federation.round_timeout)
    progress.note(f"{len(nodes)} sites connected")
    site_ranks = SiteRanks(envelope)

    if not rows:
        # Round 0: the initial adapter, evaluated before any training.
        start = time.monotonic()
        nodes, query_failures, query_status = site_ranks.learn(grid, sample_sites(nodes, config, 0), 0, progress)
        eval_row, eval_replies = evaluate_round(grid, envelope, site_ranks.adapters(global_adapter, nodes), 0, progress)
        failures = query_failures + eval_replies.failures
        epsilon_max = max([0.0] + site_epsilons(eval_replies.ok))  # evaluations are accounted too
        rows = [{
            "round": 0, "clients_ok": 0, "clients_failed": sum(failures.values()), "clients_declined": 0,
            "failures": dict(failures), "updates_rejected": 0, "train_loss": None, **eval_row, "epsilon_max": epsilon_max,
            "noise_multiplier": None, "site_privacy": [], "bytes_up": eval_replies.bytes_up,
            "bytes_down": eval_replies.bytes_down, "seconds": time.monotonic() - start,
            "sites": site_statuses(query_status, eval_replies.status),
        }]
        run_dir.append_metrics(rows[0])
        progress.round_done(rows[0])
        note_site_problems(progress, rows[0])

    for server_round in range(last_round + 1, config.federation.rounds + 1):
        start = time.monotonic()
        state, budgets_exhausted = train_round(grid, envelope, site_ranks, strategy, global_adapter, server_round, progress)
        epsilon_max = max([epsilon_max] + site_epsilons(state.replies))
        failures = state.failures + Counter({f"rejected: {k}": v for k, v in state.rejected.items()})

        central_row: dict[str, Any] = {}
        if budgets_exhausted:
            quality = "eval_accuracy" if config.model.task == "classification" else "eval_perplexity"
            eval_row, eval_replies = {"eval_loss": None, quality: None}, RoundReplies()
        else:
            global_adapter, central_row = aggregate(strategy, global_adapter, state, config, central_history)
            evaluated = sorted(state.updates)
            eval_row, eval_replies = evaluate_round(grid, envelope, site_ranks.adapters(global_adapter, evaluated), server_round, progress)
            epsilon_max = max([epsilon_max] + site_epsilons(eval_replies.ok))

        row = {
            "round": server_round,
            "clients_ok": 0 if budgets_exhausted else len(state.updates),
            # Failures over all attempts, declines and rejected updates included (see "failures").
            "clients_failed": sum(failures.values()),
            "clients_declined": len(state.declined),
            # Sites that trained (and spent privacy budget) in a round too few others could join: their updates were dropped.
            "clients_discarded": len(state.updates) if budgets_exhausted else 0,
            "ended_early": budgets_exhausted,
            # Evaluation failures are listed too, but a site is counted once (as failed in training).
            "failures": {**dict(failures), **{f"evaluate: {k}": v for k, v in eval_replies.failures.items()}},
            "updates_rejected": sum(state.rejected.values()),
            "max_weight_share": None if budgets_exhausted else site_replies.max_weight_share(state.updates.values(), config),
            "attempts": state.attempts,
            "train_loss": weighted(state.trained, "train-loss", config.strategy.max_weight_factor),
            **eval_row,
            "epsilon_max": epsilon_max,
            "noise_multiplier": weighted(state.trained, "noise-multiplier", config.strategy.max_weight_factor) if config.privacy.enabled else None,
            "site_privacy": site_privacy(state.replies) if config.privacy.enabled else [],
            **central_row,
            "bytes_up": state.bytes_up + eval_replies.bytes_up,
            "bytes_down": state.bytes_down + eval_replies.bytes_down,
            "seconds": time.monotonic() - start,
            "sites": site_statuses({**state.status, **(dict.fromkeys(state.updates, "discarded") if budgets_exhausted else {})},
                                   eval_replies.status),
            **strategy.round_metrics(),
        }
        run_dir.append_metrics(row)
        progress.round_done(row)
        note_site_problems(progress, row)
        rows.append(row)
        if budgets_exhausted:
            # No checkpoint: nothing was trained, and a resume (after sites raise their limits) redoes this round.
            reasons = sorted({declined_reason(m) for m in state.declined.values()} | {
                k for k in state.failures if k in (REFUSED_APP, REFUSED_BASE_MODEL)})
            progress.note(f"run ended after round {server_round - 1} of {config.federation.rounds}, early: "
                          f"{len(state.declined) + len(state.refused)} sites declined or refused round {server_round} "
                          f"({', '.join(reasons)}) and fewer than federation.min_clients = {config.federation.min_clients} could train")
            if state.updates:
                progress.note(f"round {server_round}: node(s) {', '.join(str(n) for n in sorted(state.updates))} trained and spent "
                              "privacy budget, but their updates were discarded (too few sites to aggregate)")
            break
        # The row first, then the checkpoint: a crash between them is resumed from the
        # previous checkpoint, and the resume drops this row before redoing the round.
        run_dir.checkpoint(server_round, global_adapter, strategy.state(),
                           {"strategy": strategy.name, "metrics": row, "central_history": central_history})

    # The global adapter has the largest declared LoRA rank: export it at that rank (alpha scaled with it).
    rank = lora_rank(global_adapter) or config.lora.rank
    if rank != config.lora.rank:
        lora = replace(config.lora, rank=rank, alpha=config.lora.alpha * rank / config.lora.rank)
        model = build_peft_model(config.model, lora, num_labels=max(1, len(config.data.labels)), seed=config.run.seed)
    write_peft_dir(model, global_adapter, run_dir.path / "adapter", resolve_model_dir(config.model.path))
    trained = rows[-1]["round"] - (1 if rows[-1].get("ended_early") else 0)
    planned = "" if trained == config.federation.rounds else f" (after round {trained} of the planned {config.federation.rounds})"
    progress.note(f"final adapter{planned}: {run_dir.path / 'adapter'}")
    return run_dir, rows

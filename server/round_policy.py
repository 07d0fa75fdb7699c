"""The round policy: which sites a round asks, and what it does when too few deliver.

A round samples `federation.clients_per_round` of the connected sites (all by default)
and sends them the global adapter. Updates are screened (server/site_replies.py,
strategies/update_validation.py); a site that delivered a usable update or declined
is not asked again. With fewer than `federation.min_clients` usable updates the round
asks the sites that did neither again, plus replacements when it samples, up to
`federation.round_retries` more times. When the sites' own budgets, policies or app
approvals leave too few to reach the minimum, the run ends early (not an error).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field, replace

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter
from fedlora.config import Config
from fedlora.server import site_replies
from fedlora.server.message_exchange import Envelope, FederationError, declined_reason, exchange
from fedlora.server.progress import Progress
from fedlora.server.secure_round import SecureSum, secure_train
from fedlora.server.site_ranks import SiteRanks
from fedlora.server.site_replies import MalformedReply
from fedlora.strategies import ClientUpdate, Strategy, trained_part
from fedlora.strategies.update_validation import reason_category, screen_updates

log = logging.getLogger("fedlora.server")


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
    secure: SecureSum = field(default_factory=SecureSum)  # under secure aggregation: the sum of the updates

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
    if config.federation.secure_aggregation:
        secure = secure_train(grid, envelope, sent, strategy.frozen_factors, server_round, progress)
        replies = secure.replies
    else:
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
            log.info("round %d: %s %s", server_round, progress.site(m.metadata.src_node_id), reason)

    if config.federation.secure_aggregation:
        # Only the survivors' sum is known: no per-update screening or weight capping (each
        # change is clipped per coordinate and each weight capped before masking).
        if secure.mean is not None:
            state.secure.add(secure.mean, secure.weight)
            state.updates.update({n: ClientUpdate(n, {}, w) for n, w in secure.survivors.items()})
        return

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
            log.warning("round %d: %s sent a malformed reply: %s", server_round, progress.site(m.metadata.src_node_id), exc)
    # Under central DP a site's update must not decide whether another's is kept (that would
    # break the sensitivity bound): only the per-update checks apply, not the outlier rule.
    section = replace(config.strategy, outlier_factor=0.0) if config.privacy.central else config.strategy
    updates, refused = screen_updates(received, expected, section)
    for node_id, reason in refused:
        state.status[node_id] = f"rejected: {reason_category(reason)}"
        log.warning("round %d: update from %s rejected: %s", server_round, progress.site(node_id), reason)
    state.rejected += Counter(reason_category(reason) for _, reason in refused)
    state.updates.update({u.node_id: u for u in updates})
    # Bounded weights, over the round's accepted updates from every attempt (from what each site claimed).
    state.updates.update({u.node_id: u for u in site_replies.capped_updates(state.updates.values(), config.strategy.max_weight_factor)})


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

"""Each site's LoRA rank, declared by the site once (a `query` message), and the global
adapter re-factorized to it, so that every site receives an adapter of its own rank."""

from __future__ import annotations

import logging
from collections import Counter

from flwr.app import MessageType
from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter
from fedlora.server import site_replies
from fedlora.server.message_exchange import Envelope, FederationError, declined_reason, exchange
from fedlora.server.progress import Progress
from fedlora.server.site_replies import MalformedReply
from fedlora.strategies.lora_rank import to_rank

log = logging.getLogger("fedlora.server")


class SiteRanks:
    """The ranks sites declared, and adapters at those ranks."""

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
                    log.warning("round %d: %s %s", server_round, progress.site(reply.metadata.src_node_id), reason)
                else:
                    try:
                        self.ranks[reply.metadata.src_node_id] = site_replies.lora_rank(reply)
                    except MalformedReply as exc:
                        failures[exc.category] += 1
                        status[reply.metadata.src_node_id] = exc.category
                        log.warning("round %d rank query: %s sent a malformed reply: %s", server_round,
                                    progress.site(reply.metadata.src_node_id), exc)
            declared = sorted(set(self.ranks.values()))
            if declared and declared != [self.config.lora.rank] and self.config.strategy.name != "exact":
                raise FederationError(f"sites declare LoRA ranks {declared}; heterogeneous ranks need strategy.name = 'exact'")
        return [n for n in nodes if n in self.ranks], failures, status

    def adapters(self, global_adapter: Adapter, nodes: list[int]) -> dict[int, Adapter]:
        by_rank = {r: to_rank(global_adapter, r, self.config.run.seed) for r in {self.ranks[n] for n in nodes}}
        return {n: by_rank[self.ranks[n]] for n in nodes}

"""The message exchange: one phase's messages out to the sites, their replies in.

Each phase of a round (rank query, train, evaluate) sends every asked site its
content and collects replies until all have answered or `federation.round_timeout`
passes. Replies are sorted as they arrive: usable ones, and failures under a fixed
set of categories (a site's free text never becomes a metrics key). Who a reply is
from is read from the message it answers. The typed parsing of a usable reply's
contents is server/site_replies.py.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter, record_nbytes, to_record
from fedlora.config import Config
from fedlora.messages import SITE_ERROR_CATEGORIES, config_record, declined_key
from fedlora.server.progress import Progress
from fedlora.server.site_replies import metrics_or_empty

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


REPLY_POLL_SECONDS = 0.05


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
    out.bytes_down = sum(record_nbytes(r) for c in contents.values() for r in c.array_records.values())
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
                log.warning("round %d %s: %s failed: %s", server_round, phase, progress.site(node), reason[:500])
            elif "refused-base-model" in metrics_or_empty(reply):
                out.failures[REFUSED_BASE_MODEL] += 1
                out.status[node] = REFUSED_BASE_MODEL
                out.refused.add(node)
                log.error("round %d %s: %s refused: it holds a different base model than model.path", server_round, phase,
                          progress.site(node))
            else:
                out.ok.append(reply)
                out.status[node] = "ok"
                out.bytes_up += sum(record_nbytes(r) for r in reply.content.array_records.values())
            progress.phase(server_round, phase, len(out.ok) + sum(out.failures.values()), len(messages))
        if pending:
            # The last reply waits half this interval on average: at 0.2 s, about 10 s over
            # the default's 96 one-step rounds and their evaluations (arithmetic, not timed).
            time.sleep(REPLY_POLL_SECONDS)
    if pending:
        out.failures["timeout"] += len(pending)
        late = sorted(node_of[m] for m in pending)
        out.status.update(dict.fromkeys(late, "timeout"))
        log.warning("round %d %s: %s did not reply within %.0fs", server_round, phase, ", ".join(map(progress.site, late)),
                    timeout)
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

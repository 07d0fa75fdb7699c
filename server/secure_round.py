"""A training attempt under secure aggregation (`federation.secure_aggregation`): the
coordinator learns the weighted sum of the sites' changes, never one site's update.

Five exchanges over the sites of the attempt (privacy/secure_aggregation.py has the
protocol, client/secure_masking.py the site's side):

1. `query.secagg_keys`: a fresh nonce and the digest of the adapter the site will be
   sent; each site replies with its keys, signed over a context that binds the run
   config, that adapter and the quantization. The roster is every site whose signature
   verifies. A site without trusted peer keys
   declines (site policy: peer-keys).
2. `query.secagg_shares`: the roster; each site checks it and replies with encrypted
   shares of its secrets for each peer.
3. `train`: the global adapter, the shares addressed to the site and the quantization;
   each site trains as usual (its own DP, ledger and budget guard) and replies with
   its weighted, quantized, masked change plus its usual metrics.
4. `query.secagg_survivors`: the sites whose masked input arrived; each signs the set.
5. `query.secagg_reveal`: the signatures; each signer reveals one share per peer.

Under `privacy.mode = "distributed"` step 3's masked vector is each site's noisy integer
sum of clipped per-record gradients plus its record count, and the coordinator turns the
unmasked sum into the SGD step (privacy/distributed_dp.py).

The threshold is the larger of `federation.secure_aggregation_threshold` and more
than half the roster (at least 2). Fewer sites than that at any step fails the
attempt's aggregation under a failure category; the round's retry policy applies.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.adapter_state import Adapter, to_record
from fedlora.round_schedule import round_lr
from fedlora.messages import run_config_digest
from fedlora.privacy import secure_aggregation as sa
from fedlora.privacy import secure_aggregation_records as records
from fedlora.privacy.distributed_dp import coordinator_step
from fedlora.server.message_exchange import Envelope, RoundReplies, declined_reason, exchange
from fedlora.server.progress import Progress
from fedlora.strategies import ClientUpdate, trained_part

log = logging.getLogger("fedlora.server")

TOO_FEW_SITES = "secure aggregation: too few sites"
TOO_FEW_SURVIVORS = "secure aggregation: too few survivors"
UNMASK_FAILED = "secure aggregation: unmasking failed"
BAD_SIGNATURE = "secure aggregation: key signature"
MALFORMED = "malformed reply: secure aggregation"


@dataclass
class SecureSum:
    """The round's secure sums so far, one per attempt that unmasked (over disjoint sets of
    sites): the weighted sum of the changes, in the sites' layout (sorted trained keys,
    flattened), and the sum of the weights."""

    total: np.ndarray | None = None
    weight: int = 0

    def add(self, mean: np.ndarray, weight: int) -> None:
        self.total = mean * weight if self.total is None else self.total + mean * weight
        self.weight += weight

    def update(self, global_adapter: Adapter, frozen_factors: tuple[str, ...]) -> ClientUpdate:
        """The weighted mean of the sites' adapters, as one update: the global adapter plus
        the mean change (a linear strategy aggregates it to what it would make of the sites')."""
        assert self.total is not None and self.weight > 0
        mean, adapter, offset = self.total / self.weight, {}, 0
        for key in sorted(trained_part(global_adapter, frozen_factors)):
            start = global_adapter[key]
            size = start.numel()
            change = torch.from_numpy(mean[offset:offset + size].reshape(tuple(start.shape)))
            adapter[key] = (start.to(torch.float64) + change).to(start.dtype)
            offset += size
        if offset != mean.shape[0]:
            raise sa.SecureAggregationError(f"the secure sum holds {mean.shape[0]} values, the adapter {offset}")
        return ClientUpdate(node_id=0, adapter=adapter, num_examples=self.weight)


@dataclass
class SecureAttempt:
    replies: RoundReplies = field(default_factory=RoundReplies)  # every step's failures; ok: declines and train replies
    mean: np.ndarray | None = None  # the survivors' weighted mean change, when unmasking succeeded
    weight: int = 0
    survivors: dict[int, int] = field(default_factory=dict)  # node -> the weight it claimed


def secure_train(grid: Grid, envelope: Envelope, sent: dict[int, Adapter], frozen_factors: tuple[str, ...],
                 server_round: int, progress: Progress) -> SecureAttempt:
    config = envelope.config
    out = SecureAttempt()
    nonce = new_nonce()
    distributed = config.privacy.mode == "distributed"
    # The context binds the config, the adapter and the quantization (records.bound_terms).
    # A linear strategy sends every site the same adapter; a site sent another one signs
    # for another context, and its keys are excluded at the roster.
    by_object: dict[int, tuple[ArrayRecord, str]] = {}  # one record (and digest) per distinct adapter object
    for a in sent.values():
        if id(a) not in by_object:
            record = to_record(a)
            by_object[id(a)] = (record, records.adapter_digest({k: x.numpy() for k, x in record.items()}))
    arrays = {v: by_object[id(a)][0] for v, a in sent.items()}
    digests = {v: by_object[id(a)][1] for v, a in sent.items()}
    adapter = Counter(digests.values()).most_common(1)[0][0] if digests else records.adapter_digest({})
    config_digest = run_config_digest(envelope.config_record(server_round))
    context = records.aggregation_context(config.run.output_dir, server_round, nonce,
                                          records.bound_terms(config, config_digest, adapter))

    def step(nodes: list[int] | set[int], action: str, values: dict[int, dict], phase: str) -> RoundReplies:
        contents = {n: _with_secagg(envelope.content(server_round), values[n]) for n in sorted(nodes)}
        replies = exchange(grid, contents, f"{MessageType.QUERY}.{action}", server_round,
                           config.federation.round_timeout, progress, phase)
        _merge(out.replies, replies)
        return replies

    def fail(nodes: set[int] | list[int], category: str, detail: str) -> SecureAttempt:
        for n in nodes:
            out.replies.failures[category] += 1
            out.replies.status[n] = category
        log.warning("round %d: secure aggregation failed: %s", server_round, detail)
        return out

    # 1. Keys: the roster is every site whose keys are signed by the node key they name.
    keys_values = {v: {"nonce": nonce, "adapter": digests[v]} for v in sent}
    replies = step(list(sent), "secagg_keys", keys_values, "secure keys")
    advertised = []
    for m in replies.ok:
        node = m.metadata.src_node_id
        if declined_reason(m) is not None:
            out.replies.ok.append(m)  # a decline: counted by the round like any other
            continue
        try:
            advertised.append(records.keys_from_reply(node, m.content[records.RECORD]))
        except (sa.SecureAggregationError, KeyError, TypeError) as exc:
            _malformed(out.replies, node, server_round, exc, progress)
    roster, excluded = sa.collect_keys(advertised, {k.node_public for k in advertised}, context)
    for node in excluded:
        out.replies.failures[BAD_SIGNATURE] += 1
        out.replies.status[node] = BAD_SIGNATURE
        log.warning("round %d: the secure aggregation keys of %s are not validly signed: excluded", server_round,
                    progress.site(node))
    threshold = max(2, config.federation.secure_aggregation_threshold, len(roster) // 2 + 1)
    if len(roster) < threshold:
        return fail([k.site for k in roster], TOO_FEW_SITES, f"{len(roster)} sites sent valid keys, fewer than {threshold}")

    # 2. Shares: each site's secrets, split among the roster and encrypted to each peer.
    roster_values = records.roster_record(roster, threshold)
    replies = step([k.site for k in roster], "secagg_shares", {k.site: roster_values for k in roster}, "secure shares")
    inbox: dict[int, dict[int, bytes]] = defaultdict(dict)  # receiver -> sender -> encrypted shares
    for m in replies.ok:
        sender = m.metadata.src_node_id
        try:
            record = m.content[records.RECORD]
            to, blobs = records.unpack_ids(record["to"]), list(record["shares"])
            if len(to) != len(blobs) or not set(to) <= {k.site for k in roster}:
                raise sa.SecureAggregationError("shares addressed outside the roster")
        except (sa.SecureAggregationError, KeyError, TypeError) as exc:
            _malformed(out.replies, sender, server_round, exc, progress)
            continue
        for receiver, blob in zip(to, blobs):
            inbox[receiver][sender] = blob
    sharers = {m.metadata.src_node_id for m in replies.ok if out.replies.status.get(m.metadata.src_node_id) == "ok"}
    if len(sharers) < threshold:
        return fail(sharers, TOO_FEW_SITES, f"{len(sharers)} sites shared keys, fewer than {threshold}")

    # 3. Train: each site's weighted change, quantized and masked.
    spec = records.quantization(distributed, records.run_clip(config), len(sharers))
    shared = {"nonce": nonce, "sharers": records.pack_ids(sharers), **records.spec_record(spec)}
    contents = {}
    for v in sorted(sharers):
        senders = sorted(s for s in inbox[v] if s in sharers)
        values = {**shared, "shares-from": records.pack_ids(senders), "shares": [inbox[v][s] for s in senders]}
        contents[v] = _with_secagg(envelope.content(server_round, arrays[v]), values)
    replies = exchange(grid, contents, MessageType.TRAIN, server_round, config.federation.round_timeout, progress, "train")
    _merge(out.replies, replies)
    length = sum(t.numel() for t in trained_part(sent[min(sharers)], frozen_factors).values()) + 1
    masked: dict[int, np.ndarray] = {}
    for m in replies.ok:
        out.replies.ok.append(m)
        node = m.metadata.src_node_id
        if declined_reason(m) is not None:
            continue  # it masked nothing: a dropout, recovered like one
        try:
            vector = m.content[records.MASKED]["masked"].numpy()
            if vector.dtype != np.uint64 or vector.shape != (length,):
                raise sa.SecureAggregationError(f"a masked input of {vector.dtype} {vector.shape}, expected uint64 ({length},)")
            claimed = int(m.content["metrics"]["num-examples"])
        except (sa.SecureAggregationError, KeyError, TypeError, ValueError) as exc:
            _malformed(out.replies, node, server_round, exc, progress)
            continue
        masked[node] = vector
        out.survivors[node] = max(1, min(claimed, records.MAX_WEIGHT))
    if len(masked) < threshold:
        out.survivors = {}
        return fail(masked, TOO_FEW_SURVIVORS, f"{len(masked)} masked inputs arrived, fewer than {threshold}")

    # 4. Consistency, then the reveal: survivors sign the survivor set; signers reveal.
    survivors = records.pack_ids(set(masked))
    replies = step(set(masked), "secagg_survivors", dict.fromkeys(masked, {"survivors": survivors}), "secure survivors")
    signatures = {m.metadata.src_node_id: m.content[records.RECORD]["signature"] for m in replies.ok
                  if records.RECORD in m.content.config_records and isinstance(m.content[records.RECORD].get("signature"), bytes)}
    signed = {"survivors": survivors, "signers": records.pack_ids(list(signatures)), "signatures": list(signatures.values())}
    replies = step(set(signatures), "secagg_reveal", dict.fromkeys(signatures, signed), "secure reveal")
    revealed = {}
    for m in replies.ok:
        try:
            revealed[m.metadata.src_node_id] = records.reveal_from(m.content[records.RECORD])
        except (sa.SecureAggregationError, KeyError, TypeError, ValueError) as exc:
            _malformed(out.replies, m.metadata.src_node_id, server_round, exc, progress)
    try:
        total = sa.unmask(roster, masked, revealed, sharers, threshold, spec.modulus_bits, context)
    except (sa.SecureAggregationError, ValueError) as exc:  # ValueError: a key a site chose badly (X25519)
        out.survivors = {}
        return fail(masked, UNMASK_FAILED, str(exc))
    out.weight = int(total[-1])
    if not 0 < out.weight <= records.MAX_WEIGHT * len(masked):
        out.survivors = {}
        return fail(masked, UNMASK_FAILED, f"the secure sum's weight {out.weight} is impossible")
    if distributed:
        # The noisy sum of the union's clipped gradients and its record count: the coordinator's SGD step.
        out.mean, _ = coordinator_step(total, spec, config.privacy.distributed_sample_rate,
                                       round_lr(config.train, server_round, config.federation.rounds))
    else:
        if out.weight != sum(out.survivors.values()):
            # The weights are summed under the masks too; a site that masked another weight than it claimed is not named.
            log.warning("round %d: the secure sum's weight %d differs from the survivors' claimed %d", server_round,
                        out.weight, sum(out.survivors.values()))
        out.mean = sa.dequantize(total[:-1], out.weight, spec)
    for n in masked:  # a survivor that failed a later step is in the sum all the same
        out.replies.status[n] = "ok"
    log.info("round %d: secure sum of %d sites (threshold %d of %d)", server_round, len(masked), threshold, len(roster))
    return out


def new_nonce() -> bytes:
    """A fresh aggregation nonce (sites refuse one they have seen)."""
    return os.urandom(32)


def _with_secagg(content: RecordDict, values: dict) -> RecordDict:
    content[records.RECORD] = ConfigRecord(values)
    return content


def _merge(into: RoundReplies, replies: RoundReplies) -> None:
    into.failures += replies.failures
    into.status.update(replies.status)
    into.refused |= replies.refused
    into.bytes_up += replies.bytes_up
    into.bytes_down += replies.bytes_down


def _malformed(replies: RoundReplies, node: int, server_round: int, exc: BaseException, progress: Progress) -> None:
    replies.failures[MALFORMED] += 1
    replies.status[node] = MALFORMED
    log.warning("round %d: %s sent a malformed secure aggregation reply: %s", server_round, progress.site(node), exc)

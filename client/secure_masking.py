"""A site's side of secure aggregation (privacy/secure_aggregation.py), as ClientApp
handlers: `query.secagg_keys` -> `query.secagg_shares` -> `train` (masked) ->
`query.secagg_survivors` -> `query.secagg_reveal`.

Every ClientApp message may run in a fresh process, so the site's secrets for the one
aggregation in progress live in `context.state` (kept by the site's own SuperNode, never
sent). They are replaced by the next `secagg_keys` and dropped after the reveal.

What could a coordinator that chose a value learn? It sends the aggregation's nonce, the
run config, the adapter, the roster, the threshold, the sharers, the quantization and
the survivor set. The site checks each: the nonce is new to this site (kept in its state
dir); the context every key signature covers binds the run config, the adapter (its
digest at the keys step, the adapter itself at the train step) and the quantization, so
sites told different things cannot verify each other's keys; every key in the roster is
signed by a peer the site trusts; the threshold is at least 2 and exceeds half the
roster; it masks only with at least `threshold` sharers, once per aggregation (each step
runs once, in order: a second masked input from the same secrets would reveal the
difference); the quantization is fedlora's own (levels, weight cap, one site count per
sharer) at federation.secure_aggregation_clip; the train request names this
aggregation's nonce; and it reveals only with `threshold` signatures on the same
survivor set and view.
Everything about the request is checked before the site reads its data or trains. A
failed step drops the aggregation's secrets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlora.client.peer_keys import SigningKeys
from fedlora.client.site_policy import site_state_dir
from fedlora.messages import run_config_digest
from fedlora.privacy import secure_aggregation as sa
from fedlora.privacy import secure_aggregation_records as records

if TYPE_CHECKING:  # the key steps run in a process without torch (only the train step has it)
    from fedlora.adapter_state import Adapter
    from fedlora.config import Config

STATE = "secagg"  # the context.state ConfigRecord
CONTEXTS_FILE = "secure-aggregation-contexts"  # every aggregation context this site took part in
# Every context this site sent a masked input in. "Each step once" also lives in
# context.state, which the SuperNode keeps only after the reply: were that lost, a re-sent
# train request would find the step not taken and mask twice with the same masks.
MASKED_FILE = "secure-aggregation-masked"


def advertise_keys(msg: Message, context: Context, signing: SigningKeys, config: Config, server_round: int, state_dir: Path,
                   min_sites: int = 0) -> Message:
    """Step 1: fresh keys for a context this site never used, signed by its node key. The
    context binds what shapes every masked input (the run config, the adapter the
    coordinator says it will send, the quantization, distributed DP's noise terms): sites
    told different things cannot verify each other's keys, and refuse at the roster."""
    adapter = records.check_digest(msg.content[records.RECORD].get("adapter"), "adapter")
    agreed = _context(msg, config, server_round, adapter)
    used = state_dir / CONTEXTS_FILE
    if used.exists() and agreed.hex() in used.read_text().split():
        raise sa.SecureAggregationError("the coordinator reused an aggregation context")
    with used.open("a") as f:
        f.write(agreed.hex() + "\n")
    state, keys = sa.advertise(context.node_id, agreed, signing.node_key)
    state.min_sites = min_sites  # the site's policy, checked at the roster, the sharers and the survivors
    save(context, state, {})
    return reply(msg, records.keys_reply(keys))


def share_keys(msg: Message, context: Context, signing: SigningKeys) -> Message:
    """Step 2: check the roster the coordinator relays; shares of this site's secrets, encrypted to each peer."""
    with aggregation_step(context) as (state, received):
        roster, threshold = records.roster_from(msg.content[records.RECORD])
        sa.accept_roster(state, roster, set(signing.trusted), threshold)
        shares = sa.share_keys(state)
        save(context, state, received)
    to = sorted(shares)
    return reply(msg, {"to": records.pack_ids(to), "shares": [shares[v] for v in to]})


@dataclass
class MaskingRequest:
    """A train request's secure-aggregation part, checked before the site trains."""

    sharers: set[int]
    received: dict[int, bytes]  # sender -> the encrypted shares it sent this site
    spec: sa.QuantizationSpec
    state_dir: Path  # where the site marks the context it masked in (MASKED_FILE)


def check_masking_request(msg: Message, context: Context, config: Config, server_round: int) -> MaskingRequest:
    """Step 3, before any data is read: the request belongs to this site's aggregation in
    progress (its nonce, config, adapter and noise terms), names enough sharers from the
    roster, relays shares only from them, and asks for fedlora's own quantization at
    federation.secure_aggregation_clip (under distributed DP: at privacy.max_grad_norm,
    which the sensitivities are counted in)."""
    with aggregation_step(context) as (state, _):
        record = msg.content[records.RECORD]
        # The adapter that arrived, the config and the clip: what the keys were signed for.
        sent = records.adapter_digest({k: a.numpy() for k, a in msg.content["arrays"].items()})
        if _context(msg, config, server_round, sent) != state.context:
            raise sa.SecureAggregationError("the train request (its config, adapter or quantization) is not for this "
                                            "site's aggregation in progress")
        state_dir = site_state_dir(config, context.node_config)
        if _masked_before(state_dir, state.context):
            raise sa.SecureAggregationError("this site already sent a masked input for this aggregation")
        sharers = set(records.unpack_ids(record["sharers"]))
        sa.check_can_mask(state, sharers)
        senders, blobs = records.unpack_ids(record["shares-from"]), list(record["shares"])
        if len(senders) != len(blobs) or not set(senders) <= sharers - {state.site}:
            raise sa.SecureAggregationError("the relayed shares do not come from the sharers")
        spec = records.spec_from(record)
        own = records.quantization(config.privacy.mode == "distributed", records.run_clip(config), len(sharers))
        if spec != own:
            raise sa.SecureAggregationError("the quantization is not fedlora's at federation.secure_aggregation_clip "
                                            "for this number of sites")
        return MaskingRequest(sharers, dict(zip(senders, blobs)), spec, state_dir)


def masked_update(request: MaskingRequest, context: Context, trained: Adapter, sent: Adapter, weight: int) -> RecordDict:
    """Step 3, after training: this site's weighted change, quantized and masked; the
    shares other sites sent it are kept for the reveal."""
    with aggregation_step(context) as (state, _):
        change = flat_change(trained, sent)
        rng = np.random.default_rng()  # stochastic rounding: fresh randomness, nothing to reproduce
        quantized = np.concatenate([sa.quantize(change, weight, request.spec, rng), np.array([weight], dtype=np.uint64)])
        _mark_masked(request.state_dir, state.context)
        masked = sa.masked_input(state, quantized, request.sharers, request.spec.modulus_bits)
        save(context, state, request.received)
    return RecordDict({records.MASKED: ArrayRecord({"masked": Array(masked)})})


def masked_noisy_sum(request: MaskingRequest, context: Context, noisy: np.ndarray, min_survivors: int) -> RecordDict:
    """Step 3 under distributed DP: this site's noisy integer sum and record count
    (privacy/distributed_dp.noisy_input), masked; it will reveal only to `min_survivors`."""
    with aggregation_step(context) as (state, _):
        _mark_masked(request.state_dir, state.context)
        masked = sa.masked_input(state, noisy, request.sharers, request.spec.modulus_bits)
        state.min_survivors = min_survivors
        save(context, state, request.received)
    return RecordDict({records.MASKED: ArrayRecord({"masked": Array(masked)})})


def flat_change(trained: Adapter, sent: Adapter) -> np.ndarray:
    """The change of every trained tensor, in key order, as one float64 vector (the
    coordinator lays out the sum the same way)."""
    import torch

    return np.concatenate([(trained[k].to(torch.float64) - sent[k].to(torch.float64)).flatten().numpy()
                           for k in sorted(trained)])


def sign_survivors(msg: Message, context: Context, signing: SigningKeys) -> Message:
    """Step 4a (consistency): sign the survivor set and the view it rests on, once per aggregation."""
    with aggregation_step(context) as (state, received):
        survivors = set(records.unpack_ids(msg.content[records.RECORD]["survivors"]))
        signature = sa.sign_survivors(state, survivors, signing.node_key)
        save(context, state, received)
    return reply(msg, {"signature": signature})


def reveal_shares(msg: Message, context: Context) -> Message:
    """Step 4b: one share per peer (its self-mask seed if it survived, its mask key if not),
    only with `threshold` survivors' signatures on the statement this site signed; then
    the aggregation's secrets are dropped."""
    with aggregation_step(context) as (state, received):
        record = msg.content[records.RECORD]
        survivors = set(records.unpack_ids(record["survivors"]))
        signers, signatures = records.unpack_ids(record["signers"]), list(record["signatures"])
        if len(signers) != len(signatures):
            raise sa.SecureAggregationError("the signers and signatures differ in length")
        revealed = sa.reveal(state, received, survivors, dict(zip(signers, signatures)))
    del context.state[STATE]
    return reply(msg, records.reveal_reply(revealed))


def _masked_before(state_dir: Path, agreed: bytes) -> bool:
    path = state_dir / MASKED_FILE
    return path.exists() and agreed.hex() in path.read_text().split()


def _mark_masked(state_dir: Path, agreed: bytes) -> None:
    """On disk before the masked input exists (fsync'd: it must outlive a crash)."""
    with (state_dir / MASKED_FILE).open("a") as f:
        f.write(agreed.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())


def _context(msg: Message, config: Config, server_round: int, adapter: str) -> bytes:
    """The aggregation context from the message as received (its config record, not the
    site's own additions to it) and the adapter digest."""
    terms = records.bound_terms(config, run_config_digest(msg.content["config"]), adapter)
    return records.aggregation_context(config.run.output_dir, server_round, _nonce(msg), terms)


def _nonce(msg: Message) -> bytes:
    nonce = msg.content[records.RECORD].get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) < 16:
        raise sa.SecureAggregationError("the aggregation nonce must be at least 16 bytes")
    return nonce


def reply(msg: Message, values: dict) -> Message:
    return Message(content=RecordDict({records.RECORD: ConfigRecord(values)}), reply_to=msg)


# --- The site's secrets between messages (context.state) ------------------------------------


@contextmanager
def aggregation_step(context: Context) -> Iterator[tuple[sa.MaskingSite, dict[int, bytes]]]:
    """The aggregation in progress; any failure in the step drops its secrets (the
    coordinator cannot retry a step with other values)."""
    state, received = load(context)
    try:
        yield state, received
    except Exception:
        context.state.config_records.pop(STATE, None)
        raise


def save(context: Context, state: sa.MaskingSite, received: dict[int, bytes]) -> None:
    values = {
        "site": records.pack_ids([state.site]), "context": state.context, "step": state.step, "threshold": state.threshold,
        "cipher-private": state.cipher_private.private_bytes_raw(), "mask-private": state.mask_private.private_bytes_raw(),
        "self-seed": state.self_seed, "own-seed-share": state.own_seed_share, "sharers": records.pack_ids(state.sharers),
        "received-from": records.pack_ids(list(received)), "received": list(received.values()),
        "min-survivors": state.min_survivors, "min-sites": state.min_sites,
    }
    if state.signed_survivors is not None:
        values["signed-survivors"] = records.pack_ids(state.signed_survivors)
    if state.roster:
        values.update({f"roster-{k}": v for k, v in records.roster_record(list(state.roster.values()), 0).items()})
    context.state[STATE] = ConfigRecord(values)


def load(context: Context) -> tuple[sa.MaskingSite, dict[int, bytes]]:
    if STATE not in context.state.config_records:
        raise sa.SecureAggregationError("no secure aggregation in progress at this site (no keys step)")
    v = context.state.config_records[STATE]
    state = sa.MaskingSite(records.unpack_ids(v["site"])[0], v["context"], X25519PrivateKey.from_private_bytes(v["cipher-private"]),
                           X25519PrivateKey.from_private_bytes(v["mask-private"]), self_seed=v["self-seed"],
                           threshold=int(v["threshold"]), step=str(v["step"]))
    state.own_seed_share = v["own-seed-share"]
    state.min_survivors = int(v.get("min-survivors", 0))
    state.min_sites = int(v["min-sites"])
    state.sharers = frozenset(records.unpack_ids(v["sharers"]))
    if "signed-survivors" in v:
        state.signed_survivors = frozenset(records.unpack_ids(v["signed-survivors"]))
    if "roster-sites" in v:
        roster, _ = records.roster_from({k[len("roster-"):]: x for k, x in v.items() if k.startswith("roster-")})
        state.roster = {k.site: k for k in roster}
    return state, dict(zip(records.unpack_ids(v["received-from"]), list(v["received"])))

"""Secure aggregation through the real site ClientApp and the real coordinator code: the
coordinator's five exchanges (server/secure_round.py) delivered in process to deployed-
style sites (their own node keys and peer-keys files, tiny BERT, DP on). The Flower
engine's path is the Ray-address run in tests/test_private_network.py (`fedlora simulate`
with secure aggregation) and the deployment's, tests/test_deployment.py; the protocol's
core is tests/test_secure_aggregation.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedlora.client.client_app import app as site_app
from fedlora.client.reply_guard import OutgoingContentError, check_outgoing
from fedlora.config import ConfigError, load_config
from fedlora.privacy import secure_aggregation_records as records
from fedlora.server.message_exchange import Envelope
from fedlora.server.progress import Progress
from fedlora.server.secure_round import TOO_FEW_SURVIVORS
from fedlora.strategies import trained_part
from tests.helpers.in_process import NODES, InProcessGrid, attempt, coordinator_identity, federation  # noqa: F401 - fixtures


def expected_mean(grid: InProcessGrid, global_adapter, weights: dict[int, int], clip: float) -> np.ndarray:
    """The survivors' weighted mean change, computed in the clear from their trained adapters,
    each value clipped to [-clip, clip] as a site quantizes it (privacy/secure_aggregation.py:
    a site's change past the clip in one coordinate, which training now and then makes, counts
    as the clip)."""
    total = sum(weights.values())
    keys = sorted(trained_part(global_adapter, ()))
    return sum((w / total) * np.clip(np.concatenate([(grid.trained[n][k].double() - global_adapter[k].double()).flatten().numpy()
                                                     for k in keys]), -clip, clip) for n, w in weights.items())


def test_the_secure_mean_is_the_survivors_weighted_mean_with_dropouts_before_and_after_masking(federation):
    config, nodes, global_adapter = federation
    before, after = NODES[1], NODES[2]  # one leaves after sharing keys, one after sending its masked input
    grid, result = attempt(config, nodes, global_adapter, drop={
        before: {MessageType.TRAIN}, after: {"query.secagg_survivors", "query.secagg_reveal"}})
    survivors = set(NODES) - {before}
    assert set(result.survivors) == survivors and result.mean is not None
    assert result.weight == sum(result.survivors.values()) and len(set(result.survivors.values())) > 1  # really weighted
    expected = expected_mean(grid, global_adapter, result.survivors, config.federation.secure_aggregation_clip)
    quantum = config.federation.secure_aggregation_clip / records.LEVELS
    assert np.abs(expected).max() > 1000 * quantum  # the sites did train
    assert np.allclose(result.mean, expected, rtol=0, atol=2 * quantum)
    assert result.replies.status[before] == "node unavailable" and result.replies.status[after] == "ok"
    # What the coordinator received from each site is masked: no trained value in the clear.
    assert all(not m.content.array_records.get("arrays") for m in result.replies.ok)


def test_too_few_survivors_unmask_nothing(federation):
    config, nodes, global_adapter = federation
    grid, result = attempt(config, nodes, global_adapter, drop=dict.fromkeys(NODES[:3], {MessageType.TRAIN}))
    assert result.mean is None and result.survivors == {}
    assert result.replies.failures[TOO_FEW_SURVIVORS] == 2  # the two sites that did mask: their round failed
    # No site was asked to reveal anything.
    assert all(records.RECORD not in c.state.config_records or "signed-survivors" not in c.state[records.RECORD]
               for c in grid.contexts.values())


def test_a_key_altered_on_the_way_is_refused_by_every_site(federation):
    config, nodes, global_adapter = federation

    def swap_a_cipher_key(msg: Message) -> None:  # the coordinator puts its own key in for site 0
        if msg.metadata.message_type == "query.secagg_shares":
            record = dict(msg.content[records.RECORD])
            record["cipher-public"] = [bytes(32)] + list(record["cipher-public"])[1:]
            msg.content[records.RECORD] = ConfigRecord(record)

    _, result = attempt(config, nodes, global_adapter, tamper=swap_a_cipher_key)
    assert result.mean is None
    assert result.replies.failures["error: secure aggregation"] == len(NODES)


def test_a_site_refuses_an_aggregation_context_it_has_seen(federation, monkeypatch):
    config, nodes, global_adapter = federation
    monkeypatch.setattr("fedlora.server.secure_round.new_nonce", lambda: b"\x01" * 32)  # a coordinator replaying its nonce
    _, first = attempt(config, nodes, global_adapter)
    assert first.mean is not None
    _, second = attempt(config, nodes, global_adapter)
    assert second.mean is None and second.replies.failures["error: secure aggregation"] == len(NODES)


def test_a_site_without_peer_keys_declines_naming_its_setting(federation):
    config, nodes, global_adapter = federation
    del nodes[NODES[0]]["peer-keys"]
    _, result = attempt(config, nodes, global_adapter)
    declined = [m for m in result.replies.ok if "declined" in m.content["metrics"]]
    assert [m.metadata.src_node_id for m in declined] == [NODES[0]]
    assert "policy.peer-keys" in declined[0].content["metrics"]
    assert set(result.survivors) == set(NODES[1:])


def test_the_reply_guard_lets_out_only_each_steps_keys(coordinator_identity):
    msg = Message(RecordDict(), dst_node_id=1, message_type="query.secagg_survivors")
    msg.metadata.__dict__["_message_id"] = "m"
    ok = Message(RecordDict({records.RECORD: ConfigRecord({"signature": b"s"})}), reply_to=msg)
    check_outgoing(ok, "query.secagg_survivors")
    for bad, message_type in [
        (ConfigRecord({"signature": b"s", "row": "Jane Doe"}), "query.secagg_survivors"),
        (ConfigRecord({"signature": b"s"}), "query"),  # not a secure aggregation step
    ]:
        with pytest.raises(OutgoingContentError):
            check_outgoing(Message(RecordDict({records.RECORD: bad}), reply_to=msg), message_type)


@pytest.mark.parametrize("overrides, key", [
    ({"strategy.name": "median"}, "linear strategy"),
    ({"privacy.central": True}, "privacy.central"),
    ({"federation.secure_aggregation_threshold": 1}, ">= 2"),
])
def test_configs_secure_aggregation_cannot_serve_are_refused(overrides, key):
    with pytest.raises(ConfigError, match="federation.secure_aggregation") as info:
        load_config(None, {"federation.secure_aggregation": True, **overrides})
    assert key in str(info.value)


# `fedlora simulate` with secure aggregation on the engine's path runs in the Ray-address engine run
# (tests/test_private_network.py): one Ray cluster checks both.


def test_a_bad_masking_request_is_refused_before_the_site_reads_data_or_spends_budget(federation):
    """The coordinator tells site 0 that it alone shared keys (its input would then be
    masked by its self-mask only), and asks site 1 to mask a second time: both refuse,
    and site 0 spends no epsilon."""
    from fedlora.privacy.site_ledger import SiteLedger

    config, nodes, global_adapter = federation
    target = NODES[0]
    train_messages: dict[int, Message] = {}

    def lone_sharer(msg: Message) -> None:
        if msg.metadata.message_type == MessageType.TRAIN:
            train_messages[msg.metadata.dst_node_id] = msg
            if msg.metadata.dst_node_id == target:
                record = dict(msg.content[records.RECORD])
                record.update({"sharers": records.pack_ids([target]), "shares-from": b"", "shares": [], "sites": 1})
                msg.content[records.RECORD] = ConfigRecord(record)

    grid, result = attempt(config, nodes, global_adapter, tamper=lone_sharer)
    assert result.replies.status[target] == "error: secure aggregation"
    assert not any(r.mechanisms for r in SiteLedger.load(nodes[target]["state-dir"]).runs)
    assert set(result.survivors) == set(NODES[1:]) and result.mean is not None  # the others' round goes on

    # A second masked input from the same secrets would hand over the difference of two inputs.
    site = NODES[1]
    again = Message(RecordDict({k: v for k, v in train_messages[site].content.items()}), dst_node_id=site,
                    message_type=MessageType.TRAIN, group_id="1")
    again.metadata.__dict__["_message_id"] = "again"
    reply = site_app(again, grid.contexts[site])
    assert reply.has_error() and reply.error.reason == "secure aggregation"


def test_a_site_that_requires_secure_aggregation_declines_runs_without_it(federation):
    config, nodes, global_adapter = federation
    plain = load_config(None, {**{k: v for k, v in config.to_flat().items()}, "federation.secure_aggregation": False})
    for node_config in nodes.values():
        node_config["require-secure-aggregation"] = True
    grid = InProcessGrid(nodes)
    from fedlora.server.message_exchange import exchange

    replies = exchange(grid, {n: Envelope(plain, "").content(1) for n in NODES}, MessageType.QUERY, 1, 5.0,
                       Progress(1, io.StringIO()), "rank query")
    assert len(replies.ok) == len(NODES)
    assert all("policy.require-secure-aggregation" in m.content["metrics"] for m in replies.ok)
    # The same sites take part when the run asks for it.
    _, result = attempt(config, nodes, global_adapter)
    assert set(result.survivors) == set(NODES)

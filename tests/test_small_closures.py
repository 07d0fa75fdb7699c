"""Issue 25's smaller items, each closed with a test: a lost state push cannot make a site
mask twice, the survivor statement binds the roster's keys, and the reply guard refuses a
train reply with the adapter in the clear beside a masked input. (Distributed DP's record
count before the ledger: tests/test_charged_first.py; app hash names: tests/test_app_pinning.py.)
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.client.client_app import app as site_app
from fedlora.client.reply_guard import OutgoingContentError, check_outgoing
from fedlora.privacy import secure_aggregation as sa
from fedlora.privacy import secure_aggregation_records as records
from fedlora.server.message_exchange import Envelope
from fedlora.server.progress import Progress
from fedlora.server.secure_round import secure_train
from tests.helpers.in_process import NODES, InProcessGrid, coordinator_identity, federation  # noqa: F401 - fixtures


def test_a_site_whose_state_push_was_lost_does_not_mask_twice(federation):
    """The SuperNode keeps context.state only after the reply: were that push lost, the
    site would see its step not taken. The site's own state dir remembers the masking."""
    config, nodes, global_adapter = federation
    target, saved = NODES[0], {}

    def keep_state_before_training(msg: Message) -> None:
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id == target:
            saved["state"] = copy.deepcopy(grid.contexts[target].state)
            saved["msg"] = msg

    grid = InProcessGrid(nodes, tamper=keep_state_before_training)
    result = secure_train(grid, Envelope(config, ""), dict.fromkeys(nodes, global_adapter), (), 1, Progress(2, io.StringIO()))
    assert result.mean is not None and target in result.survivors
    grid.contexts[target].state = saved["state"]  # the push after the masked reply was lost
    again = Message(RecordDict(dict(saved["msg"].content.items())), dst_node_id=target, message_type=MessageType.TRAIN,
                    group_id="1")
    again.metadata.__dict__["_message_id"] = "again"
    reply = site_app(again, grid.contexts[target])
    assert reply.has_error() and reply.error.reason == "secure aggregation"


def test_the_survivor_statement_binds_the_rosters_keys():
    def keys(site: int, cipher: bytes) -> sa.AdvertisedKeys:
        return sa.AdvertisedKeys(site, b"node-%d" % site, cipher, bytes(32), b"sig")

    def state(cipher_of_2: bytes) -> sa.MaskingSite:
        s = sa.MaskingSite.__new__(sa.MaskingSite)
        s.context, s.threshold, s.sharers = b"c" * 32, 2, frozenset({1, 2, 3})
        s.roster = {1: keys(1, bytes(32)), 2: keys(2, cipher_of_2), 3: keys(3, bytes(32))}
        return s

    assert sa.survivors_statement(state(bytes(32)), {1, 2}) != sa.survivors_statement(state(b"\x01" * 32), {1, 2})


def test_the_reply_guard_refuses_the_adapter_beside_a_masked_input(coordinator_identity):  # noqa: F811
    msg = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m"
    masked = ArrayRecord({"masked": Array(np.zeros(3, dtype=np.uint64))})
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    metrics = MetricRecord({"num-examples": 4})
    check_outgoing(Message(RecordDict({records.MASKED: masked, "metrics": metrics}), reply_to=msg), MessageType.TRAIN)
    with pytest.raises(OutgoingContentError, match="both"):
        check_outgoing(Message(RecordDict({records.MASKED: masked, "arrays": arrays, "metrics": metrics}), reply_to=msg),
                       MessageType.TRAIN)

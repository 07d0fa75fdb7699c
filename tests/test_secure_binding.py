"""What shapes each masked input is bound into the aggregation context every key signature
covers (issue 25, item 2): the run config, the adapter sent and the quantization, whose
clip must be federation.secure_aggregation_clip.

The attack: the coordinator gives the target clip 1.0 and every other site clip 1e12 (or
another lr, or another adapter). The others' inputs round to 0 and the unmasked sum is the
target's own update. Here the coordinator is also lenient with itself (it accepts every key
into the roster): sites told different things must still refuse before training, and no
site's ledger gets an entry.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Message, MessageType

from fedlora.adapter_state import to_record
from fedlora.privacy import secure_aggregation_records as records
from fedlora.privacy.site_ledger import SiteLedger
from tests.helpers.in_process import NODES, attempt, coordinator_identity, federation  # noqa: F401 - fixtures

TARGET = NODES[0]


def lenient(monkeypatch) -> None:
    """A coordinator that puts every advertised key in the roster, verified or not."""
    monkeypatch.setattr("fedlora.server.secure_round.sa.collect_keys", lambda advertised, _trusted, _context: (
        sorted(advertised, key=lambda k: k.site), []))


def told(config_values: dict, to: set[int] | None = None):
    """Tamper: every message to the sites in `to` (all but the target by default) carries
    these run config values, and its quantization the clip they name."""
    to = set(NODES) - {TARGET} if to is None else to

    def tamper(msg: Message) -> None:
        if msg.metadata.dst_node_id not in to:
            return
        msg.content["config"] = ConfigRecord({**dict(msg.content["config"]), **config_values})
        clip = config_values.get("federation.secure_aggregation_clip")
        if clip is not None and msg.metadata.message_type == MessageType.TRAIN:
            msg.content[records.RECORD] = ConfigRecord({**dict(msg.content[records.RECORD]), "clip": float(clip)})
    return tamper


def assert_refused_unspent(result, nodes, refusing: set[int]) -> None:
    assert result.mean is None
    for node in refusing:
        assert result.replies.status[node] == "error: secure aggregation", (node, result.replies.status)
    for node_config in nodes.values():  # nothing trained anywhere: no ledger entry at all
        assert not any(r.mechanisms for r in SiteLedger.load(node_config["state-dir"]).runs)


def test_sites_told_different_clips_refuse_at_the_roster(federation, monkeypatch):
    config, nodes, global_adapter = federation
    lenient(monkeypatch)
    _, result = attempt(config, nodes, global_adapter, tamper=told({"federation.secure_aggregation_clip": 1e5}))
    assert_refused_unspent(result, nodes, set(NODES))


def test_sites_told_different_learning_rates_refuse_at_the_roster(federation, monkeypatch):
    config, nodes, global_adapter = federation
    lenient(monkeypatch)
    _, result = attempt(config, nodes, global_adapter, tamper=told({"train.lr": 10.0}, to={TARGET}))
    assert_refused_unspent(result, nodes, set(NODES))


def test_sites_sent_different_adapters_refuse_at_the_roster(federation, monkeypatch):
    import io

    from fedlora.server.message_exchange import Envelope
    from fedlora.server.progress import Progress
    from fedlora.server.secure_round import secure_train
    from tests.helpers.in_process import InProcessGrid

    config, nodes, global_adapter = federation
    lenient(monkeypatch)
    other = {k: v + 0.5 if "lora_A" in k else v for k, v in global_adapter.items()}
    sent = {n: (other if n == TARGET else global_adapter) for n in nodes}
    result = secure_train(InProcessGrid(nodes), Envelope(config, ""), sent, (), 1, Progress(2, io.StringIO()))
    assert_refused_unspent(result, nodes, set(NODES))


def test_an_adapter_other_than_the_one_keys_were_signed_for_is_refused_at_train(federation):
    config, nodes, global_adapter = federation
    swapped = to_record({k: v + 0.5 for k, v in global_adapter.items()})

    def swap(msg: Message) -> None:
        if msg.metadata.message_type == MessageType.TRAIN and msg.metadata.dst_node_id == TARGET:
            msg.content["arrays"] = swapped

    _, result = attempt(config, nodes, global_adapter, tamper=swap)
    assert result.replies.status[TARGET] == "error: secure aggregation"
    assert not any(r.mechanisms for r in SiteLedger.load(nodes[TARGET]["state-dir"]).runs)
    assert set(result.survivors) == set(NODES[1:]) and result.mean is not None  # the others' round goes on


def test_a_clip_other_than_the_runs_is_refused_before_training(federation):
    """Every site told the same config, but a quantization at another clip than
    federation.secure_aggregation_clip: refused at the train request, unspent."""
    config, nodes, global_adapter = federation

    def huge_clip(msg: Message) -> None:
        if msg.metadata.message_type == MessageType.TRAIN:
            msg.content[records.RECORD] = ConfigRecord({**dict(msg.content[records.RECORD]), "clip": 1e12})

    _, result = attempt(config, nodes, global_adapter, tamper=huge_clip)
    assert_refused_unspent(result, nodes, set(NODES))


def test_the_adapter_digest_covers_names_shapes_and_values():
    a = {"x": torch.zeros(2, 3).numpy(), "y": torch.ones(4).numpy()}
    base = records.adapter_digest(a)
    assert base == records.adapter_digest(dict(reversed(list(a.items()))))  # order-free
    for changed in ({**a, "x": torch.zeros(3, 2).numpy()}, {**a, "y": (torch.ones(4) * 1.0000001).numpy()},
                    {"z": a["x"], "y": a["y"]}):
        assert records.adapter_digest(changed) != base
    assert len(base) == 64

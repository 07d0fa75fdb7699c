"""What a site sends back cannot crash or steer the coordinator: a malformed reply (a
missing record or key, a wrong type, a wrong dtype, bytes that do not deserialize) is
one failure of a fixed category, and a site's aggregation weight (and its share of the
evaluation sums) is capped at strategy.max_weight_factor x the round's lower median."""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedlora.adapter_state import to_record
from fedlora.config import Config, StrategySection, load_config
from fedlora.server import site_replies
from fedlora.server.site_replies import MalformedReply, capped_updates, evaluation, lora_rank, max_weight_share, train_update
from fedlora.strategies.base import ClientUpdate
from tests.helpers.client_apps import client_app_with_train, run_in_process

ADAPTER = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.full((3, 2), 0.5)}


def reply(content: dict, node: int = 7, message_type: str = MessageType.TRAIN) -> Message:
    """A site's reply as the coordinator pulls it."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                        group_id="1", created_at=0.0, ttl=3600.0, message_type=message_type)
    return Message(content=RecordDict(content), metadata=metadata)


def good_train(**metrics) -> dict:
    return {"arrays": to_record(ADAPTER), "metrics": MetricRecord({"num-examples": 64, "epsilon": 1.5, **metrics})}


def malformed(message: Message, parse=train_update) -> str:
    with pytest.raises(MalformedReply) as info:
        parse(message)
    return info.value.category


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# --- train replies --------------------------------------------------------------------


def test_a_well_formed_train_reply_is_read_exactly():
    update = train_update(reply(good_train(), node=3))
    assert update.node_id == 3 and update.num_examples == 64 and update.claimed == 64
    assert set(update.adapter) == set(ADAPTER)
    assert all(torch.equal(update.adapter[k], ADAPTER[k]) and update.adapter[k].dtype == torch.float32 for k in ADAPTER)


@pytest.mark.parametrize("content, category", [
    ({"arrays": to_record(ADAPTER)}, "metrics"),  # no metrics at all
    ({"arrays": to_record(ADAPTER), "metrics": ConfigRecord({"num-examples": "lots", "epsilon": 1.0})}, "metrics"),  # not a MetricRecord
    ({"metrics": MetricRecord({"num-examples": 64, "epsilon": 1.0})}, "arrays"),  # no arrays
    ({"arrays": MetricRecord({"x": 1.0}), "metrics": MetricRecord({"num-examples": 64, "epsilon": 1.0})}, "arrays"),
    ({"arrays": to_record(ADAPTER), "metrics": MetricRecord({"epsilon": 1.0})}, "num-examples"),
    ({"arrays": to_record(ADAPTER), "metrics": MetricRecord({"num-examples": 64})}, "epsilon"),
])
def test_a_missing_record_or_key_is_a_malformed_reply(content, category):
    assert malformed(reply(content)) == f"error: malformed reply: {category}"


@pytest.mark.parametrize("metrics, category", [
    ({"num-examples": float("nan")}, "num-examples"),
    ({"num-examples": float("inf")}, "num-examples"),
    ({"num-examples": [64, 64]}, "num-examples"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"epsilon": -0.5}, "epsilon"),
    ({"epsilon": [1.0]}, "epsilon"),
])
def test_a_wrong_type_or_value_is_a_malformed_reply(metrics, category):
    assert malformed(reply(good_train(**metrics))) == f"error: malformed reply: {category}"


def test_zero_or_negative_num_examples_is_left_to_the_screen_as_before():
    from fedlora.strategies.update_validation import screen_updates

    update = train_update(reply(good_train(**{"num-examples": -5})))
    accepted, rejected = screen_updates([update], {update.node_id: ADAPTER}, StrategySection())
    assert accepted == [] and rejected[0][1].startswith("num-examples:")  # "rejected: num-examples", as before


def forged_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def with_array(array: Array) -> dict:
    arrays = to_record(ADAPTER)
    arrays["x.lora_A.weight"] = array
    return {"arrays": arrays, "metrics": MetricRecord({"num-examples": 64, "epsilon": 1.0})}


@pytest.mark.parametrize("array", [
    Array(np.ones((2, 3), dtype=np.int64)),
    Array(np.ones((2, 3), dtype=np.float16)),
    Array(np.ones((2, 3), dtype=np.float64)),
    Array(np.ones((2, 3), dtype=">f4")),  # big-endian fp32
    # bf16 (numpy has none; ArrayRecord refuses bf16 tensors): what another client could forge.
    Array(dtype="bfloat16", shape=(2, 3), stype="numpy.ndarray", data=torch.ones(2, 3, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()),
    Array(dtype="float32", shape=(2, 3), stype="torch.Tensor", data=npy(np.ones((2, 3), dtype=np.float32))),  # unknown stype
], ids=["int64", "fp16", "fp64", "big-endian", "bf16", "stype"])
def test_arrays_of_another_dtype_are_refused_not_cast(array):
    assert malformed(reply(with_array(array))) == "error: malformed reply: arrays"


@pytest.mark.parametrize("data, shape", [
    (b"not an npy file at all", (2, 3)),
    (npy(np.ones((2, 3), dtype=np.float32))[:-4], (2, 3)),  # truncated
    (npy(np.ones((2, 3), dtype=np.float32)) + b"\0" * 4, (2, 3)),  # trailing bytes
    (npy(np.ones((2, 3), dtype=np.int32)), (2, 3)),  # declared fp32, the header says int32 (same byte count)
    (npy(np.ones((3, 2), dtype=np.float32)), (2, 3)),  # the header's shape is not the declared one
    # A forged header claiming 10^12 values: refused before anything is allocated.
    (forged_header((1000000, 1000000)) + npy(np.ones((2, 3), dtype=np.float32))[128:], (1000000, 1000000)),
    # An object array (a pickle): never loaded.
    (b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + b"{'descr': '|O', 'fortran_order': False, 'shape': (2,), }".ljust(117) + b"\n"
     + b"\x80\x04N.", (2,)),
], ids=["garbage", "truncated", "trailing", "header-dtype", "header-shape", "forged-size", "pickle"])
def test_arrays_that_do_not_deserialize_are_refused(data, shape):
    array = Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=data)
    assert malformed(reply(with_array(array))) == "error: malformed reply: arrays"


def test_a_fortran_ordered_fp32_array_is_read_right():
    values = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    update = train_update(reply(with_array(Array(values))))
    assert torch.equal(update.adapter["x.lora_A.weight"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


# --- evaluate and rank-query replies ---------------------------------------------------


def eval_reply(**metrics) -> Message:
    values = {"num-examples": 100.0, "eval-correct": 80.0, "eval-loss-sum": 30.0, "epsilon": 0.5, **metrics}
    return reply({"metrics": MetricRecord({k: v for k, v in values.items() if v is not None})}, message_type=MessageType.EVALUATE)


def test_evaluate_replies_are_checked_in_full():
    assert evaluation(eval_reply(), True).correct == 80.0
    assert evaluation(eval_reply(**{"num-examples": -3.5}), True).num_examples == -3.5  # noise under DP
    assert evaluation(eval_reply(**{"eval-correct": None}), False).correct is None  # causal-lm sends none
    parse = lambda m: evaluation(m, True)  # noqa: E731
    assert malformed(reply({}, message_type=MessageType.EVALUATE), parse) == "error: malformed reply: metrics"
    assert malformed(eval_reply(**{"eval-correct": None}), parse) == "error: malformed reply: eval-correct"
    assert malformed(eval_reply(**{"num-examples": float("nan")}), parse) == "error: malformed reply: num-examples"
    assert malformed(eval_reply(**{"eval-loss-sum": float("-inf")}), parse) == "error: malformed reply: eval-loss-sum"
    assert malformed(eval_reply(**{"epsilon": [0.5, 0.5]}), parse) == "error: malformed reply: epsilon"
    assert malformed(eval_reply(**{"epsilon": None}), parse) == "error: malformed reply: epsilon"


def test_rank_query_replies_declare_a_bounded_integer_rank():
    def query(value=None) -> Message:
        return reply({"metrics": MetricRecord({} if value is None else {"lora-rank": value})}, message_type=MessageType.QUERY)

    assert lora_rank(query(8)) == 8 and lora_rank(query(4.0)) == 4
    for bad in (None, 0, -2, 2.5, 10**9, float("nan"), [8]):
        assert malformed(query(bad), lora_rank) == "error: malformed reply: lora-rank", bad
    assert malformed(reply({}, message_type=MessageType.QUERY), lora_rank) == "error: malformed reply: metrics"


def test_categories_name_only_fixed_fields():
    assert all(f"error: malformed reply: {f}" == MalformedReply(f, "x").category for f in site_replies.FIELDS)
    with pytest.raises(AssertionError):
        MalformedReply("a site's own words", "x")


# --- bounded weights ------------------------------------------------------------------


def updates_claiming(*claims: int) -> list[ClientUpdate]:
    return [ClientUpdate(i + 1, {"w": torch.full((2,), float(i + 1))}, n) for i, n in enumerate(claims)]


def test_an_inflating_site_gets_at_most_its_cap():
    capped = capped_updates(updates_claiming(100, 200, 10**9), 3.0)
    # The lower median of (100, 200, 1e9) is 200: the cap is 600.
    assert [u.num_examples for u in capped] == [100, 200, 600] and [u.claimed for u in capped] == [100, 200, 10**9]
    assert [u.num_examples for u in capped_updates(capped, 3.0)] == [100, 200, 600]  # capping again changes nothing
    # With two sites the lower median is the smaller claim: the liar gets 3/4 at most, not everything.
    assert [u.num_examples for u in capped_updates(updates_claiming(100, 10**9), 3.0)] == [100, 300]
    assert [u.num_examples for u in capped_updates(updates_claiming(100, 10**9), 0.0)] == [100, 10**9]  # 0 = off
    assert [u.num_examples for u in capped_updates(updates_claiming(512, 512, 1024, 2048, 512), 3.0)] == [512, 512, 1024, 1536, 512]
    assert [u.num_examples for u in capped_updates(updates_claiming(7, 9), 1.5)] == [7, 9]  # floor(1.5 x 7) = 10


def test_max_weight_share():
    config = Config()
    capped = capped_updates(updates_claiming(100, 200, 10**9), 3.0)
    assert max_weight_share(capped, config) == pytest.approx(600 / 900)
    assert max_weight_share([], config) is None
    config.strategy.name = "median"  # ignores the weights: every update counts the same
    assert max_weight_share(capped, config) == pytest.approx(1 / 3)


def test_evaluation_sums_are_bounded_the_same_way():
    from fedlora.server.evaluation_round import ratio_of_sums

    def parsed(*counts: tuple[float, float]) -> list:
        return [evaluation(eval_reply(**{"num-examples": n, "eval-correct": c}), True) for n, c in counts]

    replies = parsed((100.0, 50.0), (200.0, 100.0), (1e9, 1e9))
    # The liar's sums are scaled by 600 / 1e9: (50 + 100 + 600) / (100 + 200 + 600).
    assert ratio_of_sums(replies, "correct", 3.0) == pytest.approx(750 / 900)
    assert ratio_of_sums(replies, "correct", 0.0) == pytest.approx((150 + 1e9) / (300 + 1e9))
    # Noisy counts of tiny sites (a median <= 0) are not capped.
    noisy = parsed((-1.0, 1.0), (4.0, 2.0))
    assert ratio_of_sums(noisy, "correct", 3.0) == pytest.approx(3.0 / 3.0)
    # A causal-lm site sends no correct count: it is left out of the accuracy, not of the loss.
    mixed = noisy + [evaluation(eval_reply(**{"eval-correct": None}), False)]
    assert ratio_of_sums(mixed, "correct", 0.0) == pytest.approx(3.0 / 3.0)
    assert ratio_of_sums(mixed, "loss_sum", 0.0) == pytest.approx(90.0 / 103.0)


def test_reports_skip_what_is_not_a_number():
    from fedlora.server.round_rows import site_epsilons, site_privacy, weighted

    replies = [reply(good_train(**{"train-loss": 1.0}), node=1), reply(good_train(**{"train-loss": float("nan"), "epsilon": float("nan")}), node=2),
               reply({"arrays": to_record(ADAPTER)}, node=3), reply(good_train(**{"train-loss": 3.0, "num-examples": 10**9}), node=4)]
    assert site_epsilons(replies) == [1.5, 1.5]
    assert [s["epsilon"] for s in site_privacy(replies)] == [1.5, None, None, 1.5]
    # train-loss is weighted by the capped weights: (64 x 1 + 192 x 3) / (64 + 192).
    assert weighted(replies, "train-loss", 3.0) == pytest.approx((64 * 1.0 + 192 * 3.0) / 256)


# --- the coordinator's round, over a grid of scripted sites ------------------------------


class ScriptedGrid:
    """A Grid whose sites answer at once, each with what `answer(node, message)` returns."""

    def __init__(self, nodes: list[int], answer):
        self.nodes, self.answer, self.waiting, self.count = nodes, answer, {}, 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.count += 1
            message.metadata.__dict__["_message_id"] = f"m{self.count}"  # what the SuperLink sets
            self.waiting[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out = []
        for i in list(ids):
            message = self.waiting.pop(i, None)
            if message is not None:
                out.append(Message(content=RecordDict(self.answer(message.metadata.dst_node_id, message)), reply_to=message))
        return out


@pytest.fixture
def coordinator(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_a_round_with_an_inflating_site_and_malformed_replies(coordinator):
    from fedlora.server.evaluation_round import evaluate_round
    from fedlora.server.message_exchange import Envelope
    from fedlora.server.round_policy import RoundTraining, train_attempt
    from fedlora.server.site_ranks import SiteRanks
    from fedlora.server.progress import Progress
    from fedlora.strategies import get_strategy

    config = load_config(None, {"federation.min_clients": 3})
    global_adapter = {"head.weight": torch.zeros(2, 3)}
    claims = {1: 100, 2: 200, 3: 10**9}

    def answer(node: int, message: Message) -> dict:
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:  # site 5 declares no rank
            return {"metrics": MetricRecord({} if node == 5 else {"lora-rank": config.lora.rank})}
        if kind == MessageType.TRAIN:
            if node == 4:  # int tensors
                return {"arrays": ArrayRecord({"head.weight": Array(np.ones((2, 3), dtype=np.int64))}),
                        "metrics": MetricRecord({"num-examples": 100, "epsilon": 1.0})}
            return {"arrays": to_record({"head.weight": torch.full((2, 3), float(node))}),
                    "metrics": MetricRecord({"num-examples": claims[node], "epsilon": 1.0, "train-loss": float(node)})}
        sums = {1: (100.0, 50.0), 2: (200.0, 100.0), 3: (1e9, 1e9)}.get(node, (float("nan"), 0.0))
        return {"metrics": MetricRecord({"num-examples": sums[0], "eval-correct": sums[1], "eval-loss-sum": sums[0] / 2, "epsilon": 1.0})}

    grid = ScriptedGrid([1, 2, 3, 4, 5], answer)
    envelope, progress, strategy = Envelope(config, "fingerprint"), Progress(1, stream=io.StringIO()), get_strategy(config.strategy)
    state = RoundTraining(asked=[1, 2, 3, 4, 5], connected=5)
    train_attempt(grid, envelope, SiteRanks(envelope), strategy, global_adapter, 1, [1, 2, 3, 4, 5], state, progress)

    assert {n: u.num_examples for n, u in state.updates.items()} == {1: 100, 2: 200, 3: 600}
    assert dict(state.failures) == {"error: malformed reply: arrays": 1, "error: malformed reply: lora-rank": 1}
    assert max_weight_share(state.updates.values(), config) == pytest.approx(600 / 900)
    new = strategy.aggregate(global_adapter, list(state.updates.values()))
    # (100 x 1 + 200 x 2 + 600 x 3) / 900, not ~3 (what 1e9 examples would make it).
    torch.testing.assert_close(new["head.weight"], torch.full((2, 3), 2300 / 900), rtol=0, atol=1e-6)

    row, replies = evaluate_round(grid, envelope, {n: new for n in (1, 2, 3, 4)}, 1, progress)
    assert dict(replies.failures) == {"error: malformed reply: num-examples": 1} and len(replies.ok) == 3
    assert row["eval_accuracy"] == pytest.approx(750 / 900) and row["eval_loss"] == pytest.approx(0.5)


def test_a_reply_error_without_a_reason_is_counted(coordinator):
    from flwr.app import Error

    from fedlora.server.message_exchange import exchange
    from fedlora.server.progress import Progress

    class ErrorGrid(ScriptedGrid):
        def pull_messages(self, ids):
            return [Message(Error(code=0, reason=None), reply_to=self.waiting.pop(i)) for i in list(ids)]

    out = exchange(ErrorGrid([1], None), {1: RecordDict({})}, MessageType.TRAIN, 1, 5.0, Progress(1, stream=io.StringIO()), "train")
    assert dict(out.failures) == {"error": 1}


# --- the real coordinator and virtual sites, in process ----------------------------------------------------------------


def misbehaving_train(msg: Message, context: Context) -> Message:
    from fedlora.client.client_app import train as honest_train

    reply = honest_train(msg, context)
    partition = int(context.node_config["partition-id"])
    metrics = dict(reply.content["metrics"])
    arrays = reply.content["arrays"]
    if partition == 0:
        del metrics["num-examples"]
    elif partition == 1:
        arrays = ArrayRecord({k: Array(np.ones(a.shape, dtype=np.int64)) for k, a in arrays.items()})
    elif partition == 2:
        metrics["num-examples"] = 10**9
    else:
        return reply
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def misbehaving_evaluate(msg: Message, context: Context) -> Message:
    from fedlora.client.client_app import evaluate as honest_evaluate

    reply = honest_evaluate(msg, context)
    if int(context.node_config["partition-id"]) != 3:
        return reply
    metrics = dict(reply.content["metrics"])
    metrics["epsilon"] = [1.0, 2.0]
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


misbehaving = client_app_with_train(misbehaving_train, evaluate=misbehaving_evaluate)


@pytest.mark.slow
def test_malformed_replies_the_round_completes_with_the_others(tmp_path, monkeypatch):
    # IID, 1,000 notes: each site holds 40 validation notes, so that the two sites' noisy
    # evaluation counts sum to a positive number (with 300 Dirichlet notes a tiny site's
    # noisy count could make the pooled accuracy undefined, and this test flaky).
    rows = run_in_process(misbehaving, tmp_path / "run", monkeypatch, 5, {
        "federation.rounds": 1, "federation.min_clients": 3, "simulation.partition": "iid", "simulation.dataset_size": 1000})
    row = rows[1]
    assert row["clients_ok"] == 3 and row["clients_failed"] == 2 and row["updates_rejected"] == 0 and row["attempts"] == 1
    assert row["failures"] == {"error: malformed reply: num-examples": 1, "error: malformed reply: arrays": 1,
                               "evaluate: error: malformed reply: epsilon": 1}
    assert sorted(s["train"] for s in row["sites"]) == ["error: malformed reply: arrays", "error: malformed reply: num-examples",
                                                        "ok", "ok", "ok"]
    assert sorted(s["evaluate"] for s in row["sites"] if s["evaluate"]) == ["error: malformed reply: epsilon", "ok", "ok"]
    # The site claiming 1e9 examples weighs 3 x the lower median of the three claims, which is the larger
    # honest one (m): 3m / (3m + m + the smaller one), between 3/5 and 3/4 (and not ~1).
    assert 0.6 - 1e-9 <= row["max_weight_share"] <= 0.75
    assert row["eval_accuracy"] is not None and math.isfinite(row["epsilon_max"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_max_weight_factor_is_0_or_at_least_1():
    from fedlora.config import ConfigError

    assert load_config(None, {}).strategy.max_weight_factor == 3.0
    assert load_config(None, {"strategy.max_weight_factor": 0}).strategy.max_weight_factor == 0.0
    for bad in (0.5, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="max_weight_factor"):
            load_config(None, {"strategy.max_weight_factor": bad})


def test_error_replies_count_under_a_fixed_set_of_keys():
    from fedlora.server.message_exchange import REFUSED_APP, error_category

    assert error_category("data error") == "error: data error" and error_category(REFUSED_APP) == REFUSED_APP
    assert error_category("Error: Node Unavailable - the SuperNode stopped sending heartbeats") == "node unavailable"
    # Free text (another implementation's site, Flower's own tracebacks) never becomes a metrics key.
    for text in ("Jane Doe, 1970-01-01, MRN 12345 not found", "Traceback (most recent call last):\n  File ..."):
        assert error_category(text) == "error: other"
    assert error_category("") == "error"  # no reason at all

"""Non-finite values cannot pass a DP bound (issue 25, item 1; privacy/finite.py).

A coordinator chooses the adapter a site runs, classifier head included. Here it picks a
head whose logit overflows to +inf only for one record (the one with the largest pooled
feature j), so that record's loss is NaN or inf and its per-example gradient NaN. The
site must still release finite values that differ from the record-absent case by no more
than the accounted sensitivity: one loss clip and one correct prediction in evaluation,
nothing at all (a zeroed row) in a DP-SGD step, on both per-example gradient paths and in
distributed DP's rounded sum.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.adapter_state import AdapterMismatch, adapter_of, put_adapter, to_record
from fedlora.client.local_evaluation import evaluate_locally
from fedlora.client.local_training import forward_logits, sequence_losses
from fedlora.client.model_cache import cached_model
from fedlora.client.site_data import load_site_data
from fedlora.config import load_config
from fedlora.messages import config_record
from fedlora.privacy.distributed_dp import rounded_clipped_sum
from fedlora.privacy.dp_sgd import private_optimizer
from fedlora.privacy.finite import NonFiniteRelease, check_finite_values, sanitized_losses
from fedlora.privacy.site_ledger import SiteLedger
from fedlora.text_data import collate
from tests.helpers.site_data import write_site_data

FLOAT_MAX = torch.finfo(torch.float32).max
HEAD = "base_model.model.classifier"


@pytest.fixture
def site(tmp_path, tiny_models):
    config = load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "run.output_dir": str(tmp_path / "run"),
        "federation.rounds": 2, "train.local_steps": 2, "train.batch_size": 16, "privacy.target_epsilon": 4.0,
    })
    node = {"data-path": str(write_site_data(tmp_path / "notes.jsonl", rows=80)), "state-dir": str(tmp_path / "state"), "labels": "a,b,c"}
    cached = cached_model(config, config.data.labels)
    return config, node, cached


def pooled_features(model, examples, pad_id: int) -> torch.Tensor:
    """What the classifier head sees for each example (its input), without the adapter's head."""
    seen = []
    head = model.base_model.model.classifier.modules_to_save["default"]
    handle = head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            model.eval()
            forward_logits(model, collate(examples, pad_id))
    finally:
        handle.remove()
    return torch.cat(seen)


def overflowing_head(model, examples, pad_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """(an adapter whose class-0 logit is +inf exactly for one of `examples` and finite for
    the others, that example's index). Every value of the adapter is finite."""
    h = pooled_features(model, examples, pad_id)
    best = None  # (gap, sign, feature): the feature (or its negation) that singles one example out the most
    for sign in (1.0, -1.0):
        top2 = (sign * h).topk(2, dim=0).values
        for j in range(h.shape[1]):
            gap, threshold = float(top2[0, j] - top2[1, j]), float(top2[:, j].mean())
            if threshold > 0.05 and (best is None or gap > best[0]):
                best = (gap, sign, j)
    assert best is not None and best[0] > 1e-5, "the tiny model's features do not single out one record"
    _, sign, j = best
    target = int((sign * h[:, j]).argmax())
    threshold = float((sign * h[:, j]).topk(2).values.mean())
    scale = 1e38
    adapter = adapter_of(model)
    weight, bias = torch.zeros_like(adapter[f"{HEAD}.weight"]), torch.zeros_like(adapter[f"{HEAD}.bias"])
    weight[0, j] = sign * scale
    bias[0] = FLOAT_MAX - scale * threshold  # sign * scale * h_j + bias passes FLOAT_MAX iff sign * h_j > threshold
    adapter.update({f"{HEAD}.weight": weight, f"{HEAD}.bias": bias})
    assert all(bool(torch.isfinite(v).all()) for v in adapter.values())
    # The margin is scale * gap / 2 (over 5e32) against fp32 spacing of about 2e31 near its largest value. The attack
    # works on the raw model: the target's loss, and only the target's, is not finite.
    put_adapter(model, adapter)
    model.eval()
    with torch.no_grad():
        batch = collate(examples, pad_id)
        losses = sequence_losses(forward_logits(model, batch), batch["labels"], "classification")
    assert (~torch.isfinite(losses)).nonzero().flatten().tolist() == [target]
    return adapter, target


def test_sanitized_losses_count_non_finite_as_the_clip():
    losses = torch.tensor([0.5, float("nan"), float("inf"), -float("inf"), 9.0])
    clipped, finite = sanitized_losses(losses, 5.0)
    assert clipped.tolist() == [0.5, 5.0, 5.0, 5.0, 5.0] and finite.tolist() == [True, False, False, False, True]


def test_a_release_with_a_non_finite_value_is_refused():
    check_finite_values({"eval-loss-sum": 3.0, "eval-correct": None})
    with pytest.raises(NonFiniteRelease):
        check_finite_values({"eval-loss-sum": float("nan")})


def test_evaluation_with_the_overflowing_head_moves_each_sum_by_at_most_its_sensitivity(site):
    config, node, cached = site
    pad = cached.tokenizer.pad_token_id
    examples = load_site_data(config, config.data.labels, node, cached.tokenizer).train
    adapter, target = overflowing_head(cached.model, examples, pad)
    without = examples[:target] + examples[target + 1:]
    clip = config.privacy.eval_loss_clip
    present = evaluate_locally(cached.model, examples, config, pad, loss_clip=clip)
    absent = evaluate_locally(cached.model, without, config, pad, loss_clip=clip)
    for sums in (present, absent):
        assert all(math.isfinite(v) for v in (sums.units, sums.correct, sums.loss))
    assert present.units - absent.units == 1
    assert present.loss - absent.loss == pytest.approx(clip, abs=1e-3)  # the target counts as the clip
    assert present.correct == pytest.approx(absent.correct, abs=1e-6)  # and as incorrect


def test_a_clip_near_float32s_largest_value_cannot_make_the_sum_overflow_only_with_the_record(site):
    config, node, cached = site
    pad = cached.tokenizer.pad_token_id
    examples = load_site_data(config, config.data.labels, node, cached.tokenizer).train
    adapter, target = overflowing_head(cached.model, examples, pad)
    # The clip a coordinator would pick if config validation let it: two records at it overflow a
    # float32 sum, one does not. A second record with the target's note is present or absent.
    clip = FLOAT_MAX * 0.75
    absent = evaluate_locally(cached.model, examples, config, pad, loss_clip=clip)
    present = evaluate_locally(cached.model, examples + [examples[target]], config, pad, loss_clip=clip)
    assert math.isfinite(present.loss) and math.isfinite(absent.loss)
    assert present.loss - absent.loss == pytest.approx(clip, rel=1e-6)


@pytest.mark.parametrize("key", ["privacy.eval_loss_clip", "privacy.max_grad_norm", "federation.secure_aggregation_clip"])
def test_clipping_bounds_beyond_the_cap_are_refused(key):
    from fedlora.config import MAX_CLIP, ConfigError

    load_config(None, {key: MAX_CLIP})
    with pytest.raises(ConfigError, match=key):
        load_config(None, {key: float(FLOAT_MAX)})


@pytest.mark.parametrize("impl", ["fast", "opacus"])
def test_a_dp_step_with_the_overflowing_record_is_the_step_without_it(site, impl):
    """Zero noise, a fixed expected batch: the clipped sum with the target present equals the
    one without it (its row is zeroed), and both are finite."""
    config, node, cached = site
    model, pad = cached.model, cached.tokenizer.pad_token_id
    examples = load_site_data(config, config.data.labels, node, cached.tokenizer).train[:16]
    adapter, target = overflowing_head(model, examples, pad)

    def step(batch_examples) -> torch.Tensor:
        put_adapter(model, adapter)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        with private_optimizer(model, torch.optim.SGD(params, lr=1.0), 0.0, 1.0, 16, impl=impl) as (dp_model, dp_optimizer):
            batch = collate(batch_examples, pad)
            sequence_losses(forward_logits(dp_model, batch), batch["labels"], "classification").mean().backward()
            dp_optimizer.expect_units(len(batch_examples))
            dp_optimizer.step()
        return torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(params, before)])

    present, absent = step(examples), step(examples[:target] + examples[target + 1:])
    assert torch.isfinite(present).all() and torch.isfinite(absent).all()
    assert torch.equal(present, absent)


def test_distributed_dps_rounded_sum_gives_a_non_finite_record_nothing():
    grads = [torch.randn(5, 3, 4), torch.randn(5, 7)]
    clean = rounded_clipped_sum([g.clone() for g in grads], 1.0, 1 << 10, torch.Generator().manual_seed(0))
    grads[0][2, 1, 1] = float("nan")
    grads[1][4, 0] = float("inf")
    dirty = rounded_clipped_sum(grads, 1.0, 1 << 10, torch.Generator().manual_seed(0))
    # Records 2 and 4 contribute nothing; the others' rounded vectors are bounded as before.
    without = rounded_clipped_sum([torch.cat([g[:2], g[3:4]]) for g in grads], 1.0, 1 << 10, torch.Generator().manual_seed(0))
    for d, c, w in zip(dirty, clean, without):
        assert d.dtype == torch.int64 and (d - w).abs().max() <= 5  # the same records, up to rounding
        assert (d - c).abs().max() <= 2 * (1 << 10) + 5


def send(config, node, adapter, message_type: str, server_round: int = 1) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    from fedlora.client.client_app import app

    msg = Message(content=RecordDict({"arrays": to_record(adapter), "config": config_record(config, server_round)}),
                  dst_node_id=7, message_type=message_type, group_id=str(server_round))
    return app(msg, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))


def test_a_real_site_sent_the_overflowing_head_replies_with_finite_values(site):
    """Through the site's ClientApp: the evaluation release and the trained adapter are
    finite, with the target record in the validation split and in the training split."""
    config, node, cached = site
    data = load_site_data(config, config.data.labels, node, cached.tokenizer)
    pad = cached.tokenizer.pad_token_id
    eval_adapter, _ = overflowing_head(cached.model, data.validation, pad)
    reply = send(config, node, eval_adapter, MessageType.EVALUATE, 0)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert all(math.isfinite(v) for v in dict(reply.content["metrics"]).values())

    train_adapter, _ = overflowing_head(cached.model, data.train, pad)
    reply = send(config, node, train_adapter, MessageType.TRAIN, 1)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    trained = reply.content["arrays"].to_torch_state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in trained.values())
    assert all(math.isfinite(v) for v in dict(reply.content["metrics"]).values())


def test_an_adapter_with_a_non_finite_value_is_refused_before_data_or_budget(site, tmp_path):
    config, node, cached = site
    adapter = adapter_of(cached.model)
    key = sorted(adapter)[0]
    adapter[key] = adapter[key].clone()
    adapter[key].view(-1)[0] = float("nan")
    with pytest.raises(AdapterMismatch, match="non-finite"):
        put_adapter(cached.model, adapter)
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = send(config, {**node, "data-path": str(tmp_path / "absent.jsonl")}, adapter, message_type)
        assert reply.has_error() and reply.error.reason == "internal error"
    assert not any(r.mechanisms for r in SiteLedger.load(node["state-dir"]).runs)


def test_the_last_line_refuses_a_non_finite_release_after_charging_it(site, monkeypatch):
    """Were a non-finite sum ever to get past the sanitizing, the site sends a fixed
    category instead of it, and the evaluation is in the ledger all the same."""
    from fedlora.client import training_handlers
    from fedlora.client.local_evaluation import EvalSums

    config, node, cached = site
    monkeypatch.setattr(training_handlers, "evaluate_locally", lambda *a, **k: EvalSums(10.0, 3.0, float("nan")))
    reply = send(config, node, adapter_of(cached.model), MessageType.EVALUATE, 0)
    assert reply.has_error() and reply.error.reason == "model error"
    assert [m.kind for r in SiteLedger.load(node["state-dir"]).runs for m in r.mechanisms] == ["evaluation"]

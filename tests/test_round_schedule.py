"""The round schedule (fedlora/round_schedule.py): each round's learning rate and the head-first
rounds, checked as formulas and through a real site's train handler."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import MessageType

from fedlora.adapter_state import adapter_of, from_record
from fedlora.base_model import build_peft_model
from fedlora.config import ConfigError, load_config
from fedlora.round_schedule import LORA_FACTORS, frozen_in_round, round_lr
from tests.helpers.site_data import write_site_data
from tests.helpers.site_messages import send


def test_the_cosine_rate_runs_from_lr_to_its_final_fraction_by_its_formula():
    config = load_config(None, {"train.lr": 3.0, "train.lr_schedule": "cosine", "train.lr_final_fraction": 0.1,
                                "federation.rounds": 5})
    rates = [round_lr(config.train, r, 5) for r in range(1, 6)]
    # Independently: 0.3 + 2.7 * (1 + cos(pi * k / 4)) / 2 for k = 0..4.
    assert rates == pytest.approx([3.0, 0.3 + 2.7 * (1 + math.sqrt(0.5)) / 2, 1.65, 0.3 + 2.7 * (1 - math.sqrt(0.5)) / 2, 0.3])
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = load_config(None, {"train.lr": 3.0, "train.lr_schedule": "constant"})
    assert [round_lr(constant.train, r, 5) for r in (1, 3, 5)] == [3.0, 3.0, 3.0]
    assert round_lr(config.train, 1, 1) == 3.0  # one round: the rate itself


def test_only_the_head_trains_in_the_head_rounds():
    config = load_config(None, {"train.head_rounds": 2})
    assert frozen_in_round(config.train, 1) == frozen_in_round(config.train, 2) == LORA_FACTORS
    assert frozen_in_round(config.train, 3) == ()
    assert frozen_in_round(load_config(None, {}).train, 1) == ()


@pytest.mark.parametrize("item, message", [
    ({"train.lr_schedule": "linear"}, "train.lr_schedule"),
    ({"train.lr_final_fraction": 1.0}, "train.lr_final_fraction"),
    ({"train.head_rounds": -1}, "train.head_rounds"),
])
def test_bad_schedule_keys_are_one_line_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, item)


@pytest.fixture
def head_first_site(tmp_path, tiny_models):
    config = load_config(None, {
        "model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"], "run.output_dir": str(tmp_path / "run"),
        "federation.rounds": 3, "train.local_steps": 2, "train.batch_size": 16, "train.head_rounds": 1,
        "train.lr_schedule": "cosine", "privacy.target_epsilon": 8.0,
    })
    node = {"data-path": str(write_site_data(tmp_path / "notes.jsonl", rows=80)), "state-dir": str(tmp_path / "state"), "labels": "a,b,c"}
    return config, node


def test_a_site_trains_the_head_alone_in_a_head_round_and_lora_after_it(head_first_site):
    config, node = head_first_site
    sent = adapter_of(build_peft_model(config.model, config.lora, num_labels=3, seed=config.run.seed))
    changed = {}
    for server_round in (1, 2):
        reply = send(config, node, MessageType.TRAIN, server_round)
        assert not reply.has_error(), reply.error
        back = from_record(reply.content["arrays"])
        changed[server_round] = {k for k in back if not torch.equal(back[k], sent[k])}
    lora = {k for k in sent if any(f in k for f in LORA_FACTORS)}
    head = set(sent) - lora
    assert lora and head
    assert changed[1] == head  # round 1: the head moved (DP noise alone moves it), no LoRA factor did
    assert lora & changed[2]  # round 2: LoRA trains (B gets gradient and noise)

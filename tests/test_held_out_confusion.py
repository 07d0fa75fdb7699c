"""The held-out test's confusion matrix (simulations/held_out_test.py) counts the final
adapter's own predictions: its diagonal is the exact accuracy evaluate_locally computes,
its rows the true labels."""

from __future__ import annotations

import random

import pytest

from fedlora.base_model import build_peft_model
from fedlora.client.local_evaluation import evaluate_locally
from fedlora.config import load_config
from fedlora.simulations.held_out_test import confusion_matrix, per_class_accuracy
from fedlora.text_data import Example


def test_the_confusion_matrix_holds_every_prediction_and_agrees_with_the_accuracy(tiny_models):
    config = load_config(None, {"model.path": str(tiny_models["bert"]), "data.labels": ["a", "b", "c"]})
    model = build_peft_model(config.model, config.lora, num_labels=3, seed=3)
    rng = random.Random(0)
    examples = [Example([rng.randrange(5, 200) for _ in range(rng.randrange(3, 12))], i % 3) for i in range(300)]
    matrix = confusion_matrix(model, examples, config, 0, 3)
    assert [sum(row) for row in matrix] == [100, 100, 100]  # rows: the true labels
    sums = evaluate_locally(model, examples, config, 0)
    assert sum(matrix[i][i] for i in range(3)) == pytest.approx(sums.correct)
    assert per_class_accuracy(matrix) == [matrix[i][i] / 100 for i in range(3)]
    assert per_class_accuracy([[0, 0], [1, 1]]) == [None, 0.5]

"""The default recipe trains: at reduced scale, with the project's own site training,
DP plan and strategy (simulations/recipe_study.py), it beats the head-only baseline at
the same sites, label skew, epsilon and steps."""

from __future__ import annotations

import pytest

from fedlora.config import load_config
from fedlora.simulations.recipe_study import run_cell

pytestmark = pytest.mark.slow

# A fifth of the default task's notes and a quarter of its rounds; everything else (LoRA
# placement, steps, lr schedule, strategy, epsilon with evaluation's share) is the default.
REDUCED = {"simulation.dataset_size": 1500, "simulation.test_notes": 600}


def test_the_default_recipe_beats_the_head_only_baseline_at_the_same_scale_and_epsilon():
    defaults = load_config(None, {})
    reduced = {**REDUCED, "federation.rounds": max(4, defaults.federation.rounds // 4)}
    recipe = run_cell(load_config(None, reduced), progress=lambda _: None)
    head_only = run_cell(load_config(None, {**reduced, "train.head_rounds": reduced["federation.rounds"]}),
                         progress=lambda _: None)
    assert recipe["noise_multiplier"] == head_only["noise_multiplier"]  # the same DP plan at every site
    assert recipe["accuracy"] > head_only["accuracy"] + 0.03, (recipe["accuracy"], head_only["accuracy"])

"""Shared fixtures: tiny models built from configs and saved to a temp dir, so the
real loading path (from a local folder) is exercised without any download.

`make test` runs two pytest-xdist workers (--dist loadgroup): tests marked `ray` start
a Ray cluster, and they all go to one group, so two clusters never share the two cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedlora.simulations.tiny_models import build_tiny_model

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One worker per core under pytest-xdist: a worker's torch takes one thread, not two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("llama", "gpt2", "bert")}

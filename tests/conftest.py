"""Shared fixtures: tiny models built from configs and saved to a temp dir, so the
real loading path (from a local folder) is exercised without any download.

`make test` runs three pytest-xdist workers (--dist loadgroup): tests marked `ray` start
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


def pytest_itemcollected(item: pytest.Item) -> None:
    # At collection, before xdist's pytest_collection_modifyitems reads the groups into the
    # node ids (`...@ray`), by which --dist loadgroup keeps a group on one worker.
    if item.get_closest_marker("ray"):
        item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _ray_tests_share_one_worker(request: pytest.FixtureRequest) -> None:
    """Under `--dist loadgroup` a Ray test carries its group in its node id; without it, two
    clusters share the two cores (so it went, unseen, under pytest 9, which ignores the id
    xdist 3.8 writes: pyproject.toml pins pytest below 9)."""
    if request.node.get_closest_marker("ray") and os.environ.get("PYTEST_XDIST_WORKER") \
            and getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@ray"), f"{request.node.nodeid} is not in the ray group"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("llama", "gpt2", "bert")}

"""Shared fixtures: tiny models built from configs and saved to a temp dir, so the
real loading path (from a local folder) is exercised without any download."""

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
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("llama", "gpt2", "bert")}

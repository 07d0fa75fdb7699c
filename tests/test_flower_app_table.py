"""The Flower App table in pyproject.toml: `flwr run .` finds both apps and a valid config."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

from fedlora.config import Config, from_flat
from fedlora.simulations.virtual_sites import dataset_labels

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_components_resolve_to_the_apps():
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    for attr, kind in ((components["serverapp"], ServerApp), (components["clientapp"], ClientApp)):
        module, _, name = attr.partition(":")
        assert isinstance(getattr(importlib.import_module(module), name), kind)


def test_run_config_is_valid_and_names_the_default_labels():
    run_config = PYPROJECT["tool"]["flwr"]["app"]["config"]
    config = from_flat(run_config, where="pyproject run config")
    assert config.data.labels == dataset_labels(config)


def test_run_config_lists_every_key_at_its_default():
    """Flower only lets `--run-config` override keys that the table lists."""
    config = from_flat(PYPROJECT["tool"]["flwr"]["app"]["config"])
    defaults = Config().to_flat()
    assert set(PYPROJECT["tool"]["flwr"]["app"]["config"]) == set(defaults)
    differing = {k for k, v in config.to_flat().items() if v != defaults[k]}
    assert differing == {"run.output_dir", "data.labels"}

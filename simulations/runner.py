"""`fedlora simulate`: a whole federation on this machine with Flower's simulation engine.

Virtual clients share Ray worker processes; each worker holds one base model
(client/model_cache.py) and swaps adapters in and out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fedlora.base_model import resolve_device, resolve_model_dir
from fedlora.config import Config, ConfigError
from fedlora.flower_env import FLOWER_OFFLINE_ENV, quiet_flower_notices
from fedlora.private_network import only_loopback
from fedlora.server.progress import summary_table
from fedlora.server.run_directory import RunDirectory
from fedlora.simulations.label_check import check_labels
from fedlora.simulations.virtual_sites import dataset_labels, dataset_rows, dataset_source, simulated_site_app
from fedlora.strategies import get_strategy



def prepare(config: Config) -> Config:
    """Check everything that can be checked before Ray starts; fill in derived settings."""
    try:
        get_strategy(config.strategy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    resolve_model_dir(config.model.path)
    rows = dataset_rows(config)
    if config.simulation.clients > len(rows):
        raise ConfigError(f"simulation.clients = {config.simulation.clients}: more virtual sites than rows in the dataset ({len(rows)})")
    if config.federation.min_clients > config.simulation.clients:
        config = replace(config, federation=replace(config.federation, min_clients=config.simulation.clients))
    if config.model.task == "classification":
        # The user's labels, checked here: in the workers a bad one is a traceback per worker.
        check_labels(rows, config.data.label_column, config.data.labels, dataset_source(config))
        if not config.data.labels:
            config = replace(config, data=replace(config.data, labels=dataset_labels(config)))
    return config


def simulate(config: Config, announce: Callable[[], None] | None = None) -> tuple[RunDirectory, list[dict[str, Any]]]:
    """Run the federation; `announce` is called once the inputs are checked, before Ray starts."""
    os.environ.update(FLOWER_OFFLINE_ENV)
    if not config.simulation.ray_address and only_loopback():
        # In a private network (simulations/engine_network.py) loopback is the only address:
        # Ray's local-only mode takes it instead of probing the internet and logging a warning.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    config = prepare(config)
    if announce is not None:
        announce()

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").propagate = False  # one copy of Flower's log lines, not two
    quiet_flower_notices()  # run_simulation stays on purpose: fedlora/flower_env.py says why

    from fedlora.server.server_app import make_server_app

    result: dict[str, Any] = {}

    def on_done(run_dir: RunDirectory, rows: list[dict[str, Any]]) -> None:
        result["run_dir"], result["rows"] = run_dir, rows

    cpus = os.cpu_count() or 1
    # One simulated client per GPU at a time: each Ray worker holds one base model on its GPU.
    gpus = 1.0 if resolve_device(config.train.device).type == "cuda" else 0.0
    init_args: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": True}
    if config.simulation.ray_address:
        # Join a running cluster: its nodes declared their own CPUs (ray.init refuses num_cpus here).
        init_args["address"] = config.simulation.ray_address
        client_cpus = config.simulation.cpus_per_client
    else:
        init_args.update(num_cpus=cpus, include_dashboard=False)
        client_cpus = min(config.simulation.cpus_per_client, cpus)
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": gpus}, "init_args": init_args}
    run_simulation(
        server_app=make_server_app(config, on_done),
        client_app=simulated_site_app(),
        num_supernodes=config.simulation.clients,
        backend_config=backend_config,
    )
    if "rows" not in result:
        raise RuntimeError("the simulation ended without finishing its rounds (see the log above)")
    print(summary_table(result["rows"]))
    if config.simulation.test_notes:
        from fedlora.simulations.held_out_test import held_out_accuracy

        test = held_out_accuracy(result["run_dir"].path, config)
        print(f"held-out test: accuracy {test['accuracy']:.4f} on {test['notes']} fresh notes (no site holds them)")
        from fedlora.server.dossier import write_dossier

        write_dossier(result["run_dir"].path)  # again, now with the held-out figures (test.json)
    from fedlora.server.run_report import write_report

    print(f"report: {write_report(result['run_dir'].path)}")
    print(f"run directory: {result['run_dir'].path}")  # the last line: `fedlora compare` reads it
    return result["run_dir"], result["rows"]

"""Virtual sites: the simulation dataset and each virtual site's share of it.

`simulation.dataset = "default"` is the synthetic triage-note dataset generated
from the run seed; otherwise a local JSONL/CSV file. Every worker derives the
same partition from the seed, so nothing is shipped to the workers.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from fedlora.config import Config
from fedlora.text_data import DataError, Rows, check_columns, classification_labels, read_rows
from fedlora.simulations.partitioners import dirichlet_partition, iid_partition
from fedlora.simulations.triage_notes import generate_notes

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


@lru_cache(maxsize=2)
def _dataset(dataset: str, size: int, seed: int) -> list[dict]:
    if dataset == "default":
        return generate_notes(size, seed)
    return read_rows(dataset)  # Rows: errors name the file's lines


def dataset_rows(config: Config) -> list[dict]:
    cached = _dataset(config.simulation.dataset, config.simulation.dataset_size, config.run.seed)
    rows = Rows(list(cached), getattr(cached, "lines", []))  # a copy: callers must not change the cache
    check_columns(rows, config, dataset_source(config))
    return rows


def dataset_source(config: Config) -> str:
    return "default" if config.simulation.dataset == "default" else config.simulation.dataset


def dataset_labels(config: Config) -> list[str]:
    """The label names of the simulation dataset, in class-id (sorted) order."""
    return classification_labels(dataset_rows(config), config.data.label_column, dataset_source(config))


@lru_cache(maxsize=4)
def _partition(dataset: str, size: int, seed: int, scheme: str, alpha: float, count: int, label_column: str) -> list[list[int]]:
    rows = _dataset(dataset, size, seed)
    if count > len(rows):
        raise DataError(f"simulation.clients = {count}: more virtual sites than rows in {dataset} ({len(rows)})")
    if scheme == "iid":
        return iid_partition(len(rows), count, seed)
    return dirichlet_partition([str(r[label_column]) for r in rows], count, alpha, seed)


def partition_rows(config: Config, partition_id: int, num_partitions: int) -> list[dict]:
    """This virtual site's rows."""
    rows = dataset_rows(config)
    sim = config.simulation
    parts = _partition(sim.dataset, sim.dataset_size, config.run.seed, sim.partition, sim.alpha, num_partitions, config.data.label_column)
    return [rows[i] for i in parts[partition_id]]


def simulated_site_app() -> ClientApp:
    """The site's ClientApp, serving each virtual node its partition of the dataset."""
    from fedlora.client.client_app import site_app
    from fedlora.client.site_data import VirtualSites
    from fedlora.simulations.virtual_node_ids import NotesNodeId

    return site_app(VirtualSites(partition_rows), NotesNodeId())

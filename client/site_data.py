"""This site's examples: its own file in deployment, its partition in simulation.

A deployed node names its file with the node config key `data-path`. A virtual
node of the simulation engine has `partition-id` instead and takes its share of
`simulation.dataset` (the virtual sites are built in simulations/).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config import Config
from fedlora.text_data import DataError, Example, check_columns, encode, read_rows, row_place, split_train_validation


@dataclass
class SiteData:
    train: list[Example]
    validation: list[Example]
    source: str


def site_rows(config: Config, node_config: dict) -> tuple[list[dict], str, int]:
    """(rows, where they came from, a per-site number for seeding the split)."""
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        return read_rows(path), path, 0
    if "partition-id" in node_config:
        from fedlora.simulations.virtual_sites import partition_rows  # the simulation owns partitioning

        pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
        return partition_rows(config, pid, count), f"{config.simulation.dataset} (partition {pid} of {count})", pid
    raise ValueError("node config has neither 'data-path' nor 'partition-id': this site has no data")


def load_site_data(config: Config, labels: list[str], node_config: dict, tokenizer) -> SiteData:
    rows, source, site_number = site_rows(config, node_config)
    check_columns(rows, config, source)
    if config.model.task == "classification":
        known = set(labels)
        for index, row in enumerate(rows):
            if str(row[config.data.label_column]) not in known:
                # Named by position and column, never by value: the value could be a patient's name.
                raise DataError(f"data file {source}: {row_place(rows, index)}: the value of column "
                                f"{config.data.label_column!r} is not one of data.labels")
    train_rows, val_rows = split_train_validation(rows, config.data.validation_fraction, seed=config.run.seed + site_number)
    return SiteData(
        train=encode(train_rows, tokenizer, config, labels, source),
        validation=encode(val_rows, tokenizer, config, labels, source),
        source=source,
    )

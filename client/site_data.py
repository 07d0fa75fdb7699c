"""This site's examples: its own file in deployment, its partition in simulation.

A deployed node names its file with the node config key `data-path`. A virtual
node of the simulation engine has `partition-id` instead and takes its share of
`simulation.dataset` from the data source that the simulation composes into its
ClientApp (`VirtualSites`, a mod): the client knows nothing of how the simulation
builds and partitions its dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora.config import Config
from fedlora.flower_env import quiet_flower_notices
from fedlora.client.site_policy import SitePolicy, site_policy
from fedlora.text_data import DataError, Example, encode, read_rows, row_place, split_train_validation


VirtualSiteRows = Callable[[Config, int, int], list[dict]]  # (config, partition id, partitions) -> rows
_virtual_site_rows: ContextVar[VirtualSiteRows | None] = ContextVar("virtual_site_rows", default=None)


@dataclass(frozen=True)
class VirtualSites:
    """A ClientApp mod that serves virtual nodes (node config `partition-id`) their rows
    while it handles a message. A module-level class, so that the simulation engine can
    ship the composed ClientApp to its worker processes (by reference, like `rows`)."""

    rows: VirtualSiteRows

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        quiet_flower_notices()  # in the simulation's worker process, once
        token = _virtual_site_rows.set(self.rows)
        try:
            return call_next(msg, context)
        finally:
            _virtual_site_rows.reset(token)


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
        partition_rows = _virtual_site_rows.get()
        if partition_rows is None:
            raise ValueError("node config has 'partition-id' but this ClientApp serves no virtual sites")
        pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
        return partition_rows(config, pid, count), f"{config.simulation.dataset} (partition {pid} of {count})", pid
    raise ValueError("node config has neither 'data-path' nor 'partition-id': this site has no data")


def check_site_rows(rows: list[dict], policy: SitePolicy, source: str) -> None:
    """Every row keeps the site's own rules: a text (or, in a file without the text column,
    a prompt and a response), a label among the site's declared `labels` where it declares
    them, a user under user-level DP. The rules come from the site's policy, not from the
    request: a request that passed `violation` asks for these columns and labels and no
    others, so whether this check fails cannot depend on what the coordinator chose (a task
    or label set that made it fail on some rows and not others would be an oracle).
    Errors name the row and column, never a value."""
    texts = [policy.text_column] if policy.labels or (rows and policy.text_column in rows[0]) else [policy.prompt_column, policy.response_column]
    users = [policy.user_column] if policy.privacy_unit == "user" else []
    known = set(policy.labels)
    for index, row in enumerate(rows):
        for column in (*texts, *([policy.label_column] if known else []), *users):
            value = row.get(column)
            if value is None or not str(value).strip():
                raise DataError(f"data file {source}: {row_place(rows, index)}: column {column!r} is empty or missing")
        if known and str(row[policy.label_column]) not in known:
            raise DataError(f"data file {source}: {row_place(rows, index)}: the value of column "
                            f"{policy.label_column!r} is not one of the site's labels")


def load_site_data(config: Config, labels: list[str], node_config: dict, tokenizer) -> SiteData:
    rows, source, site_number = site_rows(config, node_config)
    check_site_rows(rows, site_policy(config, node_config), source)
    train, validation = encoded_splits(rows, config, labels, source, site_number, tokenizer)
    return SiteData(train=train, validation=validation, source=source)


# Encoded splits kept in this process, by exactly what they are a function of. A simulated
# site reads the same rows in every round: tokenizing them again cost up to 0.22 s a message
# (the default's largest site; 4 ms with this).
KEPT_ENCODINGS = 16
_encodings: OrderedDict[tuple[int, str], tuple[object, list[Example], list[Example]]] = OrderedDict()


def encoded_splits(rows: list[dict], config: Config, labels: list[str], source: str, site_number: int,
                   tokenizer) -> tuple[list[Example], list[Example]]:
    """The site's (train, validation) examples: split and encoded, or, for the same rows,
    settings and tokenizer as a recent message, what that message encoded (fresh lists of
    the same examples, which nothing changes)."""
    # The whole config, not a list of the fields encode and the split read today: a field
    # they read tomorrow cannot be missed. A run's config is the same in every round.
    settings = [asdict(config), list(labels), source, site_number]
    digest = hashlib.sha256(json.dumps([settings, rows], sort_keys=True, default=repr).encode()).hexdigest()
    key = (id(tokenizer), digest)  # the tokenizer is kept in the entry, so its id is not reused meanwhile
    if key not in _encodings:
        train_rows, val_rows = split_train_validation(rows, config.data.validation_fraction, seed=config.run.seed + site_number)
        _encodings[key] = (tokenizer, encode(train_rows, tokenizer, config, labels, source),
                           encode(val_rows, tokenizer, config, labels, source))
        while len(_encodings) > KEPT_ENCODINGS:
            _encodings.popitem(last=False)
    _encodings.move_to_end(key)
    _, train, validation = _encodings[key]
    return list(train), list(validation)

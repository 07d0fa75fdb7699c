"""A site's floor on the aggregations it joins (issue 25, item 4): policy `min-sites`,
default 3, checked against the roster, the sharers and the survivors.

The threshold is the coordinator's choice. A roster of {target, colluder} with threshold 2
is a valid Bonawitz aggregation, and the coordinator subtracts the colluder's input from
the sum: the target's update in the clear. docs/privacy.md derives the bound.
"""

from __future__ import annotations

import pytest
from flwr.app import MessageType

from fedlora.client.site_policy import PolicyError, SitePolicy, site_policy
from fedlora.config import Config
from fedlora.privacy.site_ledger import SiteLedger
from tests.helpers.in_process import NODES, attempt, coordinator_identity, federation  # noqa: F401 - fixtures


def unspent(nodes) -> bool:
    return not any(r.mechanisms for c in nodes.values() for r in SiteLedger.load(c["state-dir"]).runs)


def test_a_roster_of_the_target_and_one_colluder_is_refused_by_default(federation):
    config, nodes, global_adapter = federation
    pair = {n: nodes[n] for n in NODES[:2]}
    _, result = attempt(config, pair, global_adapter)
    assert result.mean is None
    assert all(result.replies.status[n] == "error: secure aggregation" for n in pair)
    assert unspent(pair)  # refused at the roster, before training


def test_fewer_sharers_than_min_sites_are_refused_before_training(federation):
    config, nodes, global_adapter = federation
    for node_config in nodes.values():
        node_config["min-sites"] = 4
    # Two sites leave after the keys: 3 sharers, enough for the threshold (3 of 5), not for the sites.
    _, result = attempt(config, nodes, global_adapter, drop=dict.fromkeys(NODES[:2], {"query.secagg_shares"}))
    assert result.mean is None
    assert all(result.replies.status[n] == "error: secure aggregation" for n in NODES[2:])
    assert unspent(nodes)


def test_fewer_survivors_than_min_sites_unmask_nothing(federation):
    config, nodes, global_adapter = federation
    for node_config in nodes.values():
        node_config["min-sites"] = 4
    # Two sites leave after sharing: 5 sharers, 3 survivors (the threshold), fewer than 4.
    _, result = attempt(config, nodes, global_adapter, drop=dict.fromkeys(NODES[:2], {MessageType.TRAIN}))
    assert result.mean is None and result.survivors == {}


def test_min_sites_is_a_site_policy_key():
    config = Config()
    assert site_policy(config, {}).min_sites == 3 == SitePolicy().min_sites
    assert site_policy(config, {"min-sites": 5}).min_sites == 5
    with pytest.raises(PolicyError, match="'min-sites' must be >= 2"):
        site_policy(config, {"min-sites": 1})

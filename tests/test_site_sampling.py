"""federation.clients_per_round: which sites a round asks."""

from __future__ import annotations

import pytest

from fedlora.config import ConfigError, load_config
from fedlora.server.round_policy import sample_sites


def test_a_round_asks_clients_per_round_sites_reproducibly_from_the_seed():
    config = load_config(None, {"federation.clients_per_round": 10})
    nodes = list(range(1000, 2000))
    first = sample_sites(nodes, config, server_round=3)
    assert len(first) == 10 and len(set(first)) == 10 and set(first) <= set(nodes)
    assert sample_sites(nodes, config, server_round=3) == first  # the run seed decides
    assert sample_sites(nodes, config, server_round=4) != first
    assert len(sample_sites(nodes, config, server_round=3, count=4)) == 4  # replacements on a retry
    assert sample_sites(nodes[:5], config, server_round=3) == nodes[:5]  # fewer sites than asked: all
    assert sample_sites(nodes, load_config(None, {}), server_round=3) == nodes  # 0 = all


def test_under_central_dp_the_sample_is_not_predictable_from_the_seed():
    config = load_config(None, {"federation.clients_per_round": 10, "privacy.central": True})
    nodes = list(range(1000))
    assert len({tuple(sample_sites(nodes, config, server_round=1)) for _ in range(5)}) > 1


def test_clients_per_round_below_min_clients_is_refused():
    with pytest.raises(ConfigError, match="federation.clients_per_round"):
        load_config(None, {"federation.clients_per_round": 1, "federation.min_clients": 2})

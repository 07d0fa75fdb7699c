"""Partitions cover every row exactly once, are reproducible, and Dirichlet skews labels."""

from __future__ import annotations

from collections import Counter

import pytest

from fedlora.simulations.partitioners import dirichlet_partition, iid_partition


def covers_exactly_once(parts: list[list[int]], n: int) -> bool:
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n))


def label_skew(parts: list[list[int]], labels: list[str]) -> float:
    """Mean over sites of the share of the site's most common label."""
    return sum(Counter(labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts) / len(parts)


def test_iid_is_a_balanced_reproducible_cover():
    parts = iid_partition(103, 5, seed=3)
    assert covers_exactly_once(parts, 103)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == iid_partition(103, 5, seed=3) and parts != iid_partition(103, 5, seed=4)


def test_dirichlet_covers_all_rows_and_skews_more_with_smaller_alpha():
    labels = [f"c{i % 6}" for i in range(1200)]
    skewed = dirichlet_partition(labels, 8, alpha=0.1, seed=0)
    mild = dirichlet_partition(labels, 8, alpha=100.0, seed=0)
    for parts in (skewed, mild):
        assert covers_exactly_once(parts, len(labels))
        assert min(map(len, parts)) >= 10
    assert skewed == dirichlet_partition(labels, 8, alpha=0.1, seed=0)
    assert label_skew(skewed, labels) > 0.5 > label_skew(mild, labels)


def test_dirichlet_refuses_what_it_cannot_satisfy():
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(["a"] * 5 + ["b"] * 5, 5, alpha=1e-4, seed=0, min_size=2)

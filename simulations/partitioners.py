"""Splitting one dataset across virtual sites: IID, or Dirichlet(alpha) label skew.

Both are pure functions of (rows' labels, number of sites, seed) returning index
lists, so every worker process computes the same partition independently.
"""

from __future__ import annotations

import numpy as np


def iid_partition(num_rows: int, num_sites: int, seed: int) -> list[list[int]]:
    """A seeded shuffle cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_rows)
    return [part.tolist() for part in np.array_split(order, num_sites)]


def dirichlet_partition(labels: list[str], num_sites: int, alpha: float, seed: int, min_size: int = 10) -> list[list[int]]:
    """Label skew: for each label, its rows are divided among sites in proportions
    drawn from Dirichlet(alpha); redrawn until every site has `min_size` rows
    (smaller alpha = more skew). A site never ends up empty."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    min_size = min(min_size, len(labels) // num_sites)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for label in sorted(by_label):
            rows = np.array(by_label[label])
            rng.shuffle(rows)
            shares = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for site, chunk in enumerate(np.split(rows, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= max(1, min_size):
            return [sorted(p) for p in parts]
    raise ValueError(f"simulation.alpha = {alpha}: could not give each of {num_sites} sites {min_size} rows; raise alpha or use fewer clients")

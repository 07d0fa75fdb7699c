"""Length-sorted micro-batches of one Poisson-sampled batch.

A batch is padded to its longest example, and the default notes vary in length (24 to
64 tokens, 52 on average), so about a fifth of a padded batch of 64 is padding that the
upper layers compute on and throw away. Sorting the sampled rows by length and running
them as a few micro-batches, each padded to its own longest row, skips most of it.

What is computed does not change: the batch is still exactly the Poisson sample (the
rows, not their order or grouping, are what sampling drew); each row's gradient is its
own (its loss does not see other rows: attention stays within a sequence, the mean-pooled
head reads only its real tokens, padding is masked); and the per-row gradients of every
micro-batch are put together into one batch before clipping
(privacy/per_example_parts.py), so clipping, summing and noise see the same rows as for
one padded batch. Dropout draws its masks per micro-batch, from the same distribution.
"""

from __future__ import annotations


def length_sorted_parts(lengths: list[int], parts: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 sorted by length (ties by position), cut into at most
    `parts` contiguous groups of near-equal size; every position in exactly one group."""
    if parts < 1:
        raise ValueError(f"length buckets must be at least 1, got {parts}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    parts = min(parts, len(order))
    if parts <= 1:
        return [order] if order else []
    bounds = [round(k * len(order) / parts) for k in range(parts + 1)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]

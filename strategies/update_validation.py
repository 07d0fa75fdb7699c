"""Checks on every client update before it can reach aggregation."""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter


def update_problem(update: Adapter, expected: Adapter) -> str | None:
    """Why `update` must be rejected (None if it is acceptable): the keys and shapes
    of the global adapter, finite values only."""
    if set(update) != set(expected):
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        return f"wrong keys (missing {missing[:2]}, unexpected {extra[:2]})"
    for key, tensor in update.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            return f"wrong shape for {key}: {tuple(tensor.shape)} != {tuple(expected[key].shape)}"
        if not torch.isfinite(tensor).all():
            return f"non-finite values in {key}"
    return None

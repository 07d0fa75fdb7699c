"""User-level (patient-level) DP: the privacy unit is everything one user contributed.

Users, not records, are Poisson-sampled; each sampled user's records in a step are
weighted 1/n_u in the loss, so that after backward the per-record gradients of one
user sum to that user's mean gradient. `merge_rows_by_unit` sums those rows, and the
DP optimizer then clips and noises one gradient per user: a user with 100 records
moves the update no more than a user with one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def unit_weights(unit_index: torch.Tensor, num_units: int) -> torch.Tensor:
    """Per-row loss weight 1/n_u, n_u = rows of that row's unit in the batch."""
    counts = torch.bincount(unit_index, minlength=num_units).to(torch.float32)
    return 1.0 / counts[unit_index]


def merge_rows_by_unit(params: Iterable[torch.nn.Parameter], unit_index: torch.Tensor, num_units: int) -> None:
    """Replace each parameter's per-row `grad_sample` [rows, ...] by per-unit sums [units, ...]."""
    for p in params:
        rows = p.grad_sample
        if isinstance(rows, list):  # Opacus keeps a list after several backward passes
            rows = torch.cat(rows, dim=0)
        merged = rows.new_zeros((num_units, *rows.shape[1:]))
        merged.index_add_(0, unit_index.to(rows.device), rows)
        p.grad_sample = merged

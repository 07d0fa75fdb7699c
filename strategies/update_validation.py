"""Checks on every client update before it can reach aggregation.

Every rejection reason is ``"<category>: <detail>"``; `reason_category` gives the
category (``wrong keys``, ``wrong shape``, ``non-finite``, ``num-examples``,
``norm``, ``outlier``) for counting rejections by kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from fedlora.strategies.base import ClientUpdate


def reason_category(reason: str) -> str:
    return reason.split(":", 1)[0]


def update_problem(update: Adapter, expected: Adapter) -> str | None:
    """Why `update` must be rejected (None if it is acceptable): the keys and shapes
    of the global adapter, finite values only."""
    if set(update) != set(expected):
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        return f"wrong keys: missing {missing[:2]}, unexpected {extra[:2]}"
    for key, tensor in update.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            return f"wrong shape: {key} {tuple(tensor.shape)} != {tuple(expected[key].shape)}"
        if not torch.isfinite(tensor).all():
            return f"non-finite: values in {key}"
    return None


def update_norm(adapter: Adapter, global_adapter: Adapter) -> float:
    """L2 norm of (adapter - global_adapter) over all tensors together, in float64."""
    total = sum(float((adapter[k].to(torch.float64) - global_adapter[k].to(torch.float64)).square().sum()) for k in global_adapter)
    return math.sqrt(total)


def median(values: list[float]) -> float:
    ordered, n = sorted(values), len(values)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def screen_updates(
    updates: list[ClientUpdate], sent: Mapping[int, Adapter], section: StrategySection
) -> tuple[list[ClientUpdate], list[tuple[int, str]]]:
    """(accepted updates, [(node_id, reason)] for the rejected), in input order.
    `sent[node_id]` is what that site was sent, restricted to the tensors it trains
    (sites of different LoRA ranks are sent different shapes). In turn:
    `update_problem`; num_examples > 0; the update norm <= `max_update_norm` (if > 0);
    and the norm <= `outlier_factor` x the median norm of the updates that passed the
    earlier checks (if the factor > 0 and that median > 0; with one or two updates
    and a factor >= 2 nothing is an outlier)."""
    rejected: dict[int, str] = {}  # index in `updates` -> reason
    norms: dict[int, float] = {}
    for i, update in enumerate(updates):
        global_adapter = sent[update.node_id]
        problem = update_problem(update.adapter, global_adapter)
        if problem is None and update.num_examples <= 0:
            problem = f"num-examples: {update.num_examples} <= 0"
        if problem is None:
            norm = update_norm(update.adapter, global_adapter)
            if not math.isfinite(norm):  # a guard: finite values in float32 cannot overflow float64 squares
                problem = f"non-finite: update norm {norm}"
            elif section.max_update_norm > 0 and norm > section.max_update_norm:
                problem = f"norm: update norm {norm:.4g} > max_update_norm {section.max_update_norm:.4g}"
        if problem is None:
            norms[i] = norm
        else:
            rejected[i] = problem
    if section.outlier_factor > 0 and norms:
        mid = median(list(norms.values()))
        for i, norm in norms.items():
            if mid > 0 and norm > section.outlier_factor * mid:
                rejected[i] = f"outlier: update norm {norm:.4g} > outlier_factor {section.outlier_factor:g} x median {mid:.4g}"
    accepted = [u for i, u in enumerate(updates) if i not in rejected]
    return accepted, [(updates[i].node_id, reason) for i, reason in sorted(rejected.items())]

"""Non-finite values and DP: every bound fedlora relies on must hold for NaN and inf too.

The coordinator chooses the adapter a site runs, the classifier head included. A head
whose logit overflows to +inf only near one record makes that record's loss NaN
(inf - inf) or inf, and its per-example gradient NaN. Clamping keeps NaN
(`NaN.clamp(0, c)` is NaN), a clip factor of NaN is NaN, and a noisy sum of NaN is NaN:
without the rules below, "the release is NaN" would tell exactly whether the record
took part, at an infinite epsilon while the ledger charges the planned one.

So each privacy unit's contribution is sanitized inside the DP analysis, where its
bound is applied:

- a non-finite loss counts as the clip (and, in evaluation, as incorrect): it is one
  of the values the sensitivity already allows;
- a unit whose per-example gradient rows hold any non-finite value gets clip factor 0
  (`clip_factors`, in DP-SGD's step and in distributed DP's sum): a unit that
  contributes nothing is within any bound;
- and, as the last line, a release that still holds a non-finite value is replaced by
  a fixed refusal after its ledger entry. Whether a noisy release is finite is a
  function of that release, i.e. post-processing, so refusing costs no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the key steps of secure aggregation import privacy/ without torch
    import torch


class NonFiniteRelease(RuntimeError):
    """A value about to leave the site is NaN or infinite; the site refuses to send it."""


def sanitized_losses(losses: torch.Tensor, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(each loss clamped to [0, clip] with a non-finite one counted as `clip`, which losses
    were finite). Without a clip (no DP) the losses are returned as they are."""
    import torch

    finite = torch.isfinite(losses)
    if clip is None:
        return losses, finite
    return torch.where(finite, losses.nan_to_num(0.0).clamp(0.0, clip), torch.full_like(losses, clip)), finite


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's per-unit clip factor min(1, C / (norm + 1e-6)), and 0 for a unit whose norm
    is not finite (a NaN or inf anywhere in its gradient). The caller zeroes the non-finite
    values it multiplies (0 x NaN is NaN)."""
    import torch

    return torch.where(norms.isfinite(), (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)


def check_finite_values(values: Mapping[str, float | None]) -> None:
    """The last line for scalars: raise NonFiniteRelease if any released value is NaN or inf."""
    import math

    bad = sorted(k for k, v in values.items() if v is not None and not math.isfinite(float(v)))
    if bad:
        raise NonFiniteRelease(f"released values {bad} are not finite: refused (the release is charged)")


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteRelease naming the first tensor (by key) that holds NaN or inf."""
    import torch

    for key in sorted(tensors):
        if not bool(torch.isfinite(tensors[key]).all()):
            raise NonFiniteRelease(f"{what}: tensor {key} holds non-finite values")

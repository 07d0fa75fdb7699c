"""Local evaluation: the adapter's quality on this site's validation split, as sums.

What a site may release is a sum over its privacy units (examples, or users under
user-level DP) of bounded per-unit values: the unit count, correct predictions
(classification) and losses. Each unit contributes at most 1 to the count, at most 1
to `correct` (its mean accuracy) and at most `loss_clip` to `loss` (its mean clipped
loss; a non-finite loss counts as the clip and as incorrect, privacy/finite.py), so
under DP each sum has a known sensitivity and is released with Gaussian noise
(privacy/noisy_release.py). The coordinator divides sums by sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedlora.client.local_training import batch_logits, kept_prefix, on_device, sequence_losses
from fedlora.config import Config
from fedlora.privacy.finite import sanitized_losses
from fedlora.text_data import Example, collate


@dataclass
class EvalSums:
    units: float  # privacy units evaluated
    correct: float | None  # sum of per-unit accuracy (classification; None for a causal LM)
    loss: float  # sum of per-unit mean loss: cross-entropy, or a sequence's mean next-token loss


EVAL_BATCH = 128


@torch.no_grad()
def batched_logits(model: torch.nn.Module, examples: list[Example], config: Config,
                   pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) of `examples` in evaluation batches, in order, through the kept
    frozen layers where the model has them (model in eval mode)."""
    model.eval()
    prefix = kept_prefix(model, config)
    for start in range(0, len(examples), EVAL_BATCH):
        chosen = examples[start : start + EVAL_BATCH]
        batch = on_device(collate(chosen, pad_id), model)
        yield batch_logits(model, prefix, chosen, batch), batch["labels"]


@torch.no_grad()
def evaluate_locally(model: torch.nn.Module, examples: list[Example], config: Config, pad_id: int,
                     loss_clip: float | None = None) -> EvalSums:
    """Per-unit means summed over units; each example's loss clipped to `loss_clip` if given."""
    classification = config.model.task == "classification"
    losses, hits = [], []
    for logits, labels in batched_logits(model, examples, config, pad_id):
        losses.append(sequence_losses(logits, labels, config.model.task).float().cpu())
        if classification:
            hits.append((logits.argmax(dim=-1) == labels).float().cpu())
    if not examples:  # a site too small for a validation split releases zeros
        return EvalSums(0.0, 0.0 if classification else None, 0.0)
    # A non-finite loss (a head that overflows near one record) counts as the clip and as
    # incorrect: clamp keeps NaN, and a noisy sum of NaN would say the record is there.
    loss, finite = sanitized_losses(torch.cat(losses), loss_clip)
    unit_of = _unit_index(examples)
    units = int(unit_of.max()) + 1
    rows_per_unit = torch.bincount(unit_of, minlength=units).double()

    def per_unit_sum(values: torch.Tensor) -> float:
        # float64: with a coordinator-chosen loss clip near float32's largest value, a float32
        # sum would overflow to inf exactly when one more clipped record is present.
        return float((torch.zeros(units, dtype=torch.float64).index_add_(0, unit_of, values.double()) / rows_per_unit).sum())

    correct = per_unit_sum(torch.cat(hits) * finite) if classification else None
    return EvalSums(float(units), correct, per_unit_sum(loss))


def _unit_index(examples: list[Example]) -> torch.Tensor:
    """The privacy unit of each example: its user under user-level DP, else itself."""
    ids: dict[object, int] = {}
    return torch.tensor([ids.setdefault(e.unit if e.unit is not None else ("row", i), len(ids)) for i, e in enumerate(examples)])



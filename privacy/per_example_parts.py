"""Per-example gradients of one batch taken in several backward passes, put together.

A Poisson batch run as micro-batches (client/length_buckets.py) gets its per-example
gradients one micro-batch at a time. Left to themselves, Opacus would keep them as a list
and read it as gradient accumulation: its DPOptimizer divides the noised sum by the
expected batch size times the number of passes (`accumulated_iterations`), and the fast
path (privacy/lora_grad_sample.py) refuses a second pass before step(). So each pass's
`p.grad_sample` is taken aside after its backward, and the parts are concatenated into
one tensor before step(): to the DP optimizer it is one batch, the sampled one, with one
row per sampled row, exactly as if it had run in one pass.

Each micro-batch's loss is the mean over its own rows; both per-example paths scale the
gradient of a mean loss by the rows of that pass, so every row holds the gradient of its
own loss, whichever micro-batch it ran in.
"""

from __future__ import annotations

import torch


class PerExampleParts:
    """Collects `p.grad_sample` of `params` after each backward pass (`take`) and puts the
    rows back, in the order taken, as one tensor per parameter (`put_back`)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.parts: list[list[torch.Tensor]] = [[] for _ in params]

    def take(self) -> None:
        for p, parts in zip(self.params, self.parts):
            rows = getattr(p, "grad_sample", None)
            if rows is None:
                raise ValueError("a micro-batch's backward left no per-example gradients to take")
            parts.extend(rows if isinstance(rows, list) else [rows])
            p.grad_sample = None

    def put_back(self) -> None:
        for p, parts in zip(self.params, self.parts):
            p.grad_sample = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        self.parts = [[] for _ in self.params]

"""FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805): FFA's frozen A, re-oriented
by an SVD at the coordinator after every round.

Sites train and send only B (and any trainable head such as a classifier) with A
frozen at the global value, as under ffa, so bytes up and DP noise are ffa's. With
one A shared by all sites, averaging B is exact: mean(B)·A = mean(B·A). The
coordinator then re-factorizes each layer's product M = mean(B)·A_prev by its SVD
U·S·V^T: the new A = V^T (orthonormal rows), the new B = U·S, so B·A = M exactly.
The new A goes down with the next round's adapter (the coordinator sends sites the
whole adapter every round), and A's orthonormal rows bound B's per-example gradient
norms (||G·A^T|| <= ||G||) and order B's columns by importance.

Choices, following the paper and its code (github seanie12/fed-svd):
- re-factorized after every round (its `recalculate_svd_period` = 1, no warm-up);
- the first round trains B against PEFT's Kaiming-uniform A (B = 0), as the code does;
- the rank stays the adapter's rank r: M = mean(B)·A_prev has rank <= r, so the
  rank-r SVD is exact. Where M has rank below r (at the start, or a dead layer),
  the rows of V^T with zero singular values still form an orthonormal basis of the
  rest of A_prev's row space, with zero B columns: A stays orthonormal and can learn.
- the head and B are num-examples-weighted means, as under fedavg and ffa.
Stateless: the global adapter carries A. Heterogeneous LoRA ranks are not offered
(they need `exact`).
"""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter
from fedlora.strategies.base import ClientUpdate, trained_part
from fedlora.strategies.fedavg import weighted_mean64
from fedlora.strategies.ffa import FFA
from fedlora.strategies.lora_rank import lora_pairs


def orthonormal_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' with orthonormal rows, B' = U·S), both float64 and of a's rank, with
    B'·A' = b @ a. From a = R^T·Q^T (the QR of a^T) and the SVD of the small b·R^T."""
    rank, columns = a.shape
    if rank > columns:
        raise ValueError(f"fedsvd: LoRA rank {rank} exceeds the layer's {columns} input features")
    qq, rq = torch.linalg.qr(a.double().T)  # a = rq^T @ qq^T, qq with orthonormal columns
    small = b.double() @ rq.T  # b @ a = small @ qq^T
    _, _, vh = torch.linalg.svd(small, full_matrices=True)  # vh: [r, r], orthogonal
    return vh @ qq.T, small @ vh.T  # small @ vh^T = U·S, columns by descending singular value


class FedSVD(FFA):
    """FFA's training (A frozen, B and the head sent up), then the SVD re-factorization."""

    name = "fedsvd"

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        trained = [ClientUpdate(u.node_id, trained_part(u.adapter, self.frozen_factors), u.num_examples) for u in updates]
        mean = weighted_mean64(trained)
        new = {**global_adapter, **{k: v.to(torch.float32) for k, v in mean.items()}}
        for a_key, b_key in lora_pairs(global_adapter):
            a, b = orthonormal_factors(mean[b_key], global_adapter[a_key])
            new[a_key], new[b_key] = a.to(torch.float32), b.to(torch.float32)
        return new

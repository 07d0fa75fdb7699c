"""Exact LoRA aggregation: average the products, then re-factorize.

Per LoRA layer the sites' updates are dW_i = B_i·A_i. Their weighted mean M is in
general of rank up to n·r, so it is re-factorized to rank r with a truncated SVD
(the best rank-r approximation, Eckart-Young), splitting the singular values as
B = U·sqrt(S), A = sqrt(S)·V^T. M is never formed densely: with P = [w_i B_i] and
Q = [A_i] stacked, M = P·Q, and the SVD of M comes from the QR factors of P and
Q^T and the SVD of one small (n·r x n·r) matrix. One layer is held at a time.
Sites may hold different ranks (heterogeneous ranks): the products are stacked
the same way, and the result has the coordinator's rank. Each round reports `exact_energy_kept`: sum over layers of the kept s_k^2 over
the total, i.e. the fraction of the mean update's energy that rank r keeps.
"""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from strategies.base import ClientUpdate, Stateless
from strategies.fedavg import weighted_mean
from strategies.lora_rank import factorize, lora_pairs


class Exact(Stateless):
    name = "exact"

    def __init__(self, section: StrategySection):
        self.section = section
        self.last_metrics: dict[str, float] = {}

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        pairs = lora_pairs(global_adapter)
        factor_keys = {k for pair in pairs for k in pair}
        heads = [ClientUpdate(u.node_id, {k: v for k, v in u.adapter.items() if k not in factor_keys}, u.num_examples) for u in updates]
        new = weighted_mean(heads) if heads[0].adapter else {}  # a classifier head etc.
        total = sum(u.num_examples for u in updates)
        kept_energy, all_energy = 0.0, 0.0
        for a_key, b_key in pairs:
            # Sites may train different ranks: P = [w_i B_i] and Q = [A_i] stack any ranks.
            p = torch.cat([(u.num_examples / total) * u.adapter[b_key].to(torch.float64) for u in updates], dim=1)
            q = torch.cat([u.adapter[a_key].to(torch.float64) for u in updates], dim=0)
            a, b, kept, energy = factorize(p, q, fill_a=global_adapter[a_key])
            new[a_key], new[b_key] = a.float(), b.float()
            kept_energy += kept
            all_energy += energy
        self.last_metrics = {"exact_energy_kept": kept_energy / all_energy if all_energy > 0 else 1.0}
        return new

    def round_metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)

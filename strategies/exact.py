"""Exact LoRA aggregation: average the products, then re-factorize.

Per LoRA layer the sites' updates are dW_i = B_i·A_i. Their weighted mean M is in
general of rank up to n·r, so it is re-factorized to rank r with a truncated SVD
(the best rank-r approximation, Eckart-Young), splitting the singular values as
B = U·sqrt(S), A = sqrt(S)·V^T. M is never formed densely: with P = [w_i B_i] and
Q = [A_i] stacked, M = P·Q, and the SVD of M comes from the QR factors of P and
Q^T and the SVD of one small (n·r x n·r) matrix. One layer is held at a time.
Each round reports `exact_energy_kept`: sum over layers of the kept s_k^2 over
the total, i.e. the fraction of the mean update's energy that rank r keeps.
"""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from strategies.base import ClientUpdate, Stateless
from strategies.fedavg import weighted_mean


def lora_pairs(adapter: Adapter) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer in the adapter."""
    return [(k, k.replace(".lora_A.", ".lora_B.")) for k in adapter if ".lora_A." in k]


def truncated_product_svd(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of M = p @ q (p: [out, k], q: [k, in]) without forming M.
    Returns (U_r [out, r], S_r [r], V_r^T [r, in], all singular values)."""
    qp, rp = torch.linalg.qr(p)  # p = qp rp
    qq, rq = torch.linalg.qr(q.T)  # q = rq^T qq^T
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    return qp @ u[:, :rank], s[:rank], vh[:rank] @ qq.T, s


class Exact(Stateless):
    name = "exact"

    def __init__(self, section: StrategySection):
        self.section = section
        self.last_metrics: dict[str, float] = {}

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        pairs = lora_pairs(global_adapter)
        factor_keys = {k for pair in pairs for k in pair}
        new = {k: v for k, v in weighted_mean(updates).items() if k not in factor_keys}  # heads etc.
        total = sum(u.num_examples for u in updates)
        kept_energy, all_energy = 0.0, 0.0
        for a_key, b_key in pairs:
            rank = global_adapter[a_key].shape[0]
            p = torch.cat([(u.num_examples / total) * u.adapter[b_key].to(torch.float64) for u in updates], dim=1)
            q = torch.cat([u.adapter[a_key].to(torch.float64) for u in updates], dim=0)
            u_r, s_r, vh_r, s_all = truncated_product_svd(p, q, rank)
            if float(s_all.max()) == 0.0:
                # No update at all: zero factors would freeze the layer for good (each
                # factor's gradient is proportional to the other), so keep the global ones.
                new[a_key], new[b_key] = global_adapter[a_key].clone(), global_adapter[b_key].clone()
                continue
            root = s_r.sqrt()
            b = torch.zeros(global_adapter[b_key].shape, dtype=torch.float64)
            a = torch.zeros(global_adapter[a_key].shape, dtype=torch.float64)
            b[:, : len(root)] = u_r * root
            a[: len(root)] = root[:, None] * vh_r
            new[a_key], new[b_key] = a.float(), b.float()
            kept_energy += float((s_r**2).sum())
            all_energy += float((s_all**2).sum())
        self.last_metrics = {"exact_energy_kept": kept_energy / all_energy if all_energy > 0 else 1.0}
        return new

    def round_metrics(self) -> dict[str, float]:
        return dict(self.last_metrics)

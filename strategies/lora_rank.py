"""LoRA factors at a chosen rank: the math shared by `exact` and heterogeneous ranks.

A LoRA layer's update is the product B·A (B: [out, r], A: [r, in]). Re-factorizing
a (sum of) products to rank k uses the truncated SVD, splitting the singular values
evenly: B = U·sqrt(S), A = sqrt(S)·V^T. Components with no signal (a zero singular
value, or k above the product's rank) keep a usable A row and a zero B column: the
product is unchanged, and unlike an all-zero component it can still learn (each
factor's gradient is proportional to the other).
"""

from __future__ import annotations

import hashlib

import torch

from fedlora.adapter_state import Adapter


def lora_pairs(adapter: Adapter) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer in the adapter."""
    return [(k, k.replace(".lora_A.", ".lora_B.")) for k in adapter if ".lora_A." in k]


def truncated_product_svd(p: torch.Tensor, q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of M = p @ q (p: [out, k], q: [k, in]) without forming M: from
    the QR factors of p and q^T and the SVD of one small [k, k] matrix.
    Returns (U_r [out, <=r], S_r [<=r], V_r^T [<=r, in], all singular values)."""
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    return qp @ u[:, :rank], s[:rank], vh[:rank] @ qq.T, s


def factorize(p: torch.Tensor, q: torch.Tensor, fill_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-r factors (A [r, in], B [out, r]) of p @ q, r = fill_a's rows, with
    `fill_a`'s rows where there is no signal. Also (kept energy, total energy)."""
    rank = fill_a.shape[0]
    u_r, s_r, vh_r, s_all = truncated_product_svd(p.double(), q.double(), rank)
    signal = int((s_r > s_all.max() * 1e-12).sum()) if float(s_all.max()) > 0 else 0
    root = s_r[:signal].sqrt()
    a = fill_a.double().clone()
    b = torch.zeros(p.shape[0], rank, dtype=torch.float64)
    a[:signal] = root[:, None] * vh_r[:signal]
    b[:, :signal] = u_r[:, :signal] * root
    return a, b, float((s_r**2).sum()), float((s_all**2).sum())


def seeded_a_rows(count: int, columns: int, seed: int, key: str) -> torch.Tensor:
    """Fresh A rows as PEFT initialises them (Kaiming-uniform), from (seed, layer)."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    rows = torch.empty(count, columns)
    torch.nn.init.kaiming_uniform_(rows, a=5**0.5, generator=torch.Generator().manual_seed(digest))
    return rows


def to_rank(adapter: Adapter, rank: int, seed: int) -> Adapter:
    """The same LoRA products (best rank-`rank` approximation if smaller) as factors
    of rank `rank`; other tensors (a classifier head) are copied."""
    out = {k: v.clone() for k, v in adapter.items()}
    for a_key, b_key in lora_pairs(adapter):
        a, b = adapter[a_key], adapter[b_key]
        if a.shape[0] == rank:
            continue
        fill = a[:rank] if rank <= a.shape[0] else torch.cat([a, seeded_a_rows(rank - a.shape[0], a.shape[1], seed, a_key)])
        new_a, new_b, _, _ = factorize(b, a, fill)
        out[a_key], out[b_key] = new_a.float(), new_b.float()
    return out

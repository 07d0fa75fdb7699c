"""LoRA factors at a chosen rank: the math shared by `exact`, `fedsvd` and heterogeneous ranks.

A LoRA layer's update is the product B·A (B: [out, r], A: [r, in]). Re-factorizing
a (sum of) products to rank k uses the truncated SVD U·S·V^T, and keeps A's scale:
A = c·V^T and B = U·S/c, with c the root-mean-square row norm of the previous A
(PEFT's Kaiming-uniform A has rows of norm about 1/sqrt(3) for any in_features).
Splitting S evenly instead (B = U·sqrt(S), A = sqrt(S)·V^T) is just as exact, but it
ties A's size to the update's: the next round's SGD step on B scales with A^T·A, so
small singular values (sites disagreeing) shrink it (one round took A's row norm from
0.58 to 0.16 and B's step down about 13x), and large ones grow it (0.58 to 0.81 in
three rounds at train.lr = 2). Components with no signal (a zero singular value, or k above the
product's rank) keep a usable A row and a zero B column: the product is unchanged,
and unlike an all-zero component it can still learn (each factor's gradient is
proportional to the other).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from fedlora.adapter_state import Adapter

KAIMING_ROW_NORM = 3**-0.5  # PEFT's A rows: U(-1/sqrt(in), 1/sqrt(in)) per entry, in entries -> E|row|^2 = 1/3


def lora_pairs(adapter: Adapter) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer in the adapter."""
    return [(k, k.replace(".lora_A.", ".lora_B.")) for k in adapter if ".lora_A." in k]


def product_svd(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of M = p @ q (p: [out, k], q: [k, in]) without forming M: from the QR
    factors of p and q^T and the SVD of one small matrix. Returns (U [out, m], S [m],
    V^T [m, in]), m = min(out, in, k), S descending; V^T's rows are orthonormal even
    where S is zero (they then span the rest of q's row space)."""
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T, full_matrices=False)
    return qp @ u, s, vh @ qq.T


def row_scale(a: torch.Tensor) -> float:
    """Root-mean-square row norm of A; PEFT's initial scale for an all-zero A."""
    rms = float(a.double().square().sum(dim=1).mean().sqrt()) if a.numel() else 0.0
    return rms if rms > 0 else KAIMING_ROW_NORM


@dataclass
class Factors:
    a: torch.Tensor  # [r, in], float64
    b: torch.Tensor  # [out, r], float64
    kept: float  # sum of the kept s_k^2
    total: float  # sum of all s_k^2 (kept / total = the energy rank r keeps)


def factorize(p: torch.Tensor, q: torch.Tensor, fill_a: torch.Tensor) -> Factors:
    """Rank-r factors of M = p @ q (the best rank-r approximation), r = fill_a's rows,
    with A's rows of norm c = row_scale(fill_a) and `fill_a`'s rows where there is no
    signal."""
    rank = fill_a.shape[0]
    u, s, vh = product_svd(p.double(), q.double())
    top = s[:rank]
    signal = int((top > s.max() * 1e-12).sum()) if s.numel() and float(s.max()) > 0 else 0
    a = fill_a.double().clone()
    b = torch.zeros(p.shape[0], rank, dtype=torch.float64)
    c = row_scale(fill_a)
    a[:signal] = c * vh[:signal]
    b[:, :signal] = u[:, :signal] * (top[:signal] / c)
    return Factors(a, b, float((top**2).sum()), float((s**2).sum()))


def seeded_a_rows(count: int, columns: int, seed: int, key: str) -> torch.Tensor:
    """Fresh A rows as PEFT initialises them (Kaiming-uniform), from (seed, layer)."""
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    rows = torch.empty(count, columns)
    torch.nn.init.kaiming_uniform_(rows, a=5**0.5, generator=torch.Generator().manual_seed(digest))
    return rows


def lora_rank(adapter: Adapter) -> int | None:
    """The adapter's LoRA rank (the largest, should layers differ); None without LoRA layers."""
    ranks = [adapter[a_key].shape[0] for a_key, _ in lora_pairs(adapter)]
    return max(ranks) if ranks else None


def to_rank(adapter: Adapter, rank: int, seed: int) -> Adapter:
    """The same LoRA products as factors of rank `rank`; other tensors (a classifier
    head) are copied. Down: the best rank-`rank` approximation, factorized as above.
    Up: the factors as they are, plus seeded A rows (row k from (seed, layer, k), so
    every call adds the same ones) at A's row scale, with zero B columns: the product
    is unchanged."""
    out = {k: v.clone() for k, v in adapter.items()}
    for a_key, b_key in lora_pairs(adapter):
        a, b = adapter[a_key], adapter[b_key]
        if a.shape[0] == rank:
            continue
        if rank > a.shape[0]:
            # Row k is always the same seeded row, whatever rank the adapter came from, at A's scale.
            fresh = seeded_a_rows(rank, a.shape[1], seed, a_key)[a.shape[0]:] * (row_scale(a) / KAIMING_ROW_NORM)
            out[a_key] = torch.cat([a, fresh.to(a.dtype)])
            out[b_key] = torch.cat([b, torch.zeros(b.shape[0], rank - a.shape[0], dtype=b.dtype)], dim=1)
        else:
            f = factorize(b, a, a[:rank])
            out[a_key], out[b_key] = f.a.to(a.dtype), f.b.to(b.dtype)
    return out

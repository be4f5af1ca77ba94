"""SVDQuant's low-rank split: keep the top singular components of a (smoothed) weight in 16 bits.

Only the top ``rank`` components are needed. A full SVD costs O(N·K·min(N, K)) and, on a GPU, seconds for one
3072 × 12288 weight (minutes over a FLUX-size model); for weights whose smaller side exceeds
:data:`EXACT_SVD_MAX` the top components come from a seeded randomized subspace iteration (Halko, Martinsson and
Tropp 2011, algorithm 4.4) with ``rank + 64`` columns and four power iterations, which costs a few GEMMs. Either
way the residual is computed against the rounded factors, so low-rank + residual is the weight exactly; only the
choice of subspace can differ, and :func:`captured_energy` measures that.
"""

from __future__ import annotations

import torch

__all__ = ["lowrank_split", "top_singular", "captured_energy", "EXACT_SVD_MAX"]

EXACT_SVD_MAX = 1024
_OVERSAMPLE, _POWER_ITERS = 64, 4


def top_singular(w: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U (N, r), S (r,), Vh (r, K))``, fp32, the top-``rank`` singular triplets of an fp32 ``(N, K)`` matrix.
    ``method``: ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (deterministic: a fixed-seed Gaussian sketch)
    or ``"auto"`` (exact when ``min(N, K) <= EXACT_SVD_MAX``)."""
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    n, k = w.shape
    q = min(rank + _OVERSAMPLE, n, k)
    if method == "exact" or (method == "auto" and min(n, k) <= EXACT_SVD_MAX) or q >= min(n, k):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    g = torch.Generator(device=w.device).manual_seed(0)
    basis = torch.linalg.qr(w @ torch.randn(k, q, generator=g, device=w.device, dtype=w.dtype)).Q  # (N, q)
    for _ in range(_POWER_ITERS):
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ w, full_matrices=False)  # (q, K): small
    return (basis @ ub)[:, :rank], s[:rank], vh[:rank]


def captured_energy(w: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> float:
    """Fraction of ``‖W‖²_F`` that the rank branch ``(down·up)ᵀ`` removes: ``1 - ‖W - (down·up)ᵀ‖² / ‖W‖²``."""
    w = w.float()
    return float(1 - (w - (down.float() @ up.float()).T).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))


def lowrank_split(w2: torch.Tensor, rank: int, dtype: torch.dtype,
                  method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split an ``(N, K)`` weight into ``proj_down (K, rank)``, ``proj_up (rank, N)`` (both ``dtype``) and the fp32
    residual ``R = W - (proj_down·proj_up)ᵀ``, computed against the rounded factors so that nothing is lost."""
    w = w2.to(torch.float32)
    u, s, vh = top_singular(w, rank, method)
    down = vh.T.contiguous().to(dtype)
    up = (s[:, None] * u.T).contiguous().to(dtype)
    return down, up, w - (down.float() @ up.float()).T

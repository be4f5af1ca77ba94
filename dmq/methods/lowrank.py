"""SVDQuant's low-rank split: keep the top singular components of a (smoothed) weight in 16 bits."""

from __future__ import annotations

import torch

__all__ = ["lowrank_split"]


def lowrank_split(w2: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split an ``(N, K)`` weight into ``proj_down (K, rank)``, ``proj_up (rank, N)`` (both ``dtype``) and the fp32
    residual ``R = W - (proj_down·proj_up)ᵀ``, computed against the rounded factors so that nothing is lost."""
    w = w2.to(torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    down = vh[:rank].T.contiguous().to(dtype)
    up = (s[:rank, None] * u[:, :rank].T).contiguous().to(dtype)
    return down, up, w - (down.float() @ up.float()).T

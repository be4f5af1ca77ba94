"""SmoothQuant's smoothing factors: move activation outliers into the weights.

``λ_j = max|X_j|^α / max|W_j|^(1−α)`` per input channel j; the layer then computes ``(x/λ)·(W·diag(λ))ᵀ``, which
equals ``x·Wᵀ`` in exact arithmetic. The factors are applied by the SVDQuant layers (:mod:`dmq.nn.svdquant`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["weight_channel_absmax", "smoothing_factors"]

_LIMIT = 1e4


def weight_channel_absmax(module: nn.Module) -> torch.Tensor:
    """fp32 ``(Cin,)``: max |W| per input channel (a conv's taps and output channels reduced together)."""
    w = module.weight.detach().to(torch.float32).abs()
    dims = [d for d in range(w.dim()) if d != 1]
    return w.amax(dim=dims)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """fp32 ``(Cin,)`` smoothing factors from per-channel activation and weight abs-max (both ``(Cin,)``).

    Channels with no signal on either side get 1; factors are clamped to ``[1e-4, 1e4]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    w = weight_absmax.to(torch.float32)
    a = act_absmax.to(device=w.device, dtype=torch.float32)
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(a) | ~torch.isfinite(w)
    lam = a.clamp(min=1e-12).pow(alpha) / w.clamp(min=1e-12).pow(1 - alpha)
    lam = torch.where(dead, torch.ones_like(lam), lam)
    return lam.clamp(1 / _LIMIT, _LIMIT)

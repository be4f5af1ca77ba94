"""Reference: the fp8 e4m3 linear (per-token activation scales × per-channel weight scales)."""

from __future__ import annotations

import torch

from dmq.kernels.reference.quant_act import quantize_act

__all__ = ["fp8_linear"]


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = Q(x) · Wᵀ`` with x quantized to fp8 e4m3 per token (dynamic), w float8 e4m3 ``(N, K)`` and fp32
    ``w_scales (N,)``; products summed in fp32, scaled, plus bias, in x's dtype."""
    codes, s, _ = quantize_act(x, None, None, "fp8_e4m3", 0, False)
    y = codes.to(torch.float32) @ w.to(torch.float32).T
    y = y * s[:, None] * w_scales.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

"""SVDQuant layers: smoothing + a 16-bit low-rank branch + a quantized residual (SmoothQuant is rank 0).

For a weight W viewed as ``(N, K)`` (a conv's ``K = kh * kw * Cin``, see :mod:`dmq.formats`) and smoothing factors
λ ``(Cin,)``: ``W·diag(λ) = L1·L2 + R`` where ``L1·L2`` holds the top-``rank`` singular components and R is
quantized. Forward: ``y = Q(x/λ)·Q(R)ᵀ + (x/λ)·proj_down·proj_up + b``.

The state (``smooth`` ``(Cin,)``, ``proj_down`` ``(K, rank)``, ``proj_up`` ``(rank, N)``, all in the compute dtype)
and the forward live in :class:`~dmq.nn.base.QuantGemm`, which every quantized layer shares, so LoRAs can extend any
quantized layer's branch (:mod:`dmq.methods.lora`); these classes name the SVDQuant layers (rank 32 by default).
"""

from __future__ import annotations

import torch
from torch import nn

from dmq.formats import QuantSpec
from dmq.methods.lowrank import lowrank_split
from dmq.nn.conv import QuantConv2d
from dmq.nn.linear import QuantLinear

__all__ = ["SVDQuantLinear", "SVDQuantConv2d", "lowrank_split"]


class SVDQuantLinear(QuantLinear):
    """SVDQuant for ``nn.Linear``: x ``(..., K)`` → ``(..., N)``; ``proj_down (K, r)``, ``proj_up (r, N)``."""

    @classmethod
    def from_module(cls, module: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                    name: str = "", *, rank: int = 32, smooth: torch.Tensor | None = None) -> "SVDQuantLinear":
        """Smooth (optional), split off the top-``rank`` components, quantize the residual."""
        return super().from_module(module, weight_spec, act_spec, name, rank=rank, smooth=smooth)


class SVDQuantConv2d(QuantConv2d):
    """SVDQuant for ``nn.Conv2d``: smoothing per input channel; the branch is a kh×kw conv to ``r`` channels
    followed by a 1×1 conv to N (see :meth:`QuantConv2d._branch`)."""

    @classmethod
    def from_module(cls, module: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                    name: str = "", *, rank: int = 32, smooth: torch.Tensor | None = None) -> "SVDQuantConv2d":
        return super().from_module(module, weight_spec, act_spec, name, rank=rank, smooth=smooth)

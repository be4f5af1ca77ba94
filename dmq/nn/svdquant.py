"""SVDQuant layers: smoothing + a 16-bit low-rank branch + a quantized residual (SmoothQuant is rank 0).

For a weight W viewed as ``(N, K)`` (a conv's ``K = kh * kw * Cin``, see :mod:`dmq.formats`) and smoothing factors
λ ``(Cin,)``: ``W·diag(λ) = L1·L2 + R`` where ``L1·L2`` holds the top-``rank`` singular components and R is
quantized. Forward: ``y = Q(x/λ)·Q(R)ᵀ + (x/λ)·proj_down·proj_up + b``.

The state (``smooth`` ``(Cin,)``, ``proj_down`` ``(K, rank)``, ``proj_up`` ``(rank, N)``, all in the compute dtype)
and the forward live in :class:`~dmq.nn.base.QuantGemm`, which every quantized layer shares, so LoRAs can extend any
quantized layer's branch (:mod:`dmq.methods.lora`); these classes are the SVDQuant constructors.
"""

from __future__ import annotations

import torch
from torch import nn

from dmq.errors import ConfigError
from dmq.formats import QuantSpec
from dmq.nn.base import QuantGemm
from dmq.nn.conv import QuantConv2d, check_conv
from dmq.nn.linear import QuantLinear

__all__ = ["SVDQuantLinear", "SVDQuantConv2d", "lowrank_split"]


def lowrank_split(w2: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split an ``(N, K)`` weight into ``proj_down (K, rank)``, ``proj_up (rank, N)`` (both ``dtype``) and the fp32
    residual ``R = W - (proj_down·proj_up)ᵀ``, computed against the rounded factors so that nothing is lost."""
    w = w2.to(torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    down = vh[:rank].T.contiguous().to(dtype)
    up = (s[:rank, None] * u[:, :rank].T).contiguous().to(dtype)
    return down, up, w - (down.float() @ up.float()).T


def _init_lowrank(layer: QuantGemm, w3: torch.Tensor, smooth: torch.Tensor | None, rank: int,
                  name: str) -> torch.Tensor:
    """Set the layer's ``smooth`` and SVD branch from an ``(N, T, C)`` weight; returns the residual to quantize."""
    n, t, c = w3.shape
    if rank < 0 or rank > min(n, t * c):
        raise ConfigError(f"{name}: rank {rank} is outside [0, min(N, K) = {min(n, t * c)}]")
    if smooth is not None:
        if smooth.shape != (c,) or not torch.isfinite(smooth).all() or (smooth <= 0).any():
            raise ConfigError(f"{name}: smoothing factors must be {c} finite positive values")
        layer.register_buffer("smooth", smooth.to(device=w3.device, dtype=layer.compute_dtype))
        w3 = w3.to(torch.float32) * layer.smooth.to(torch.float32)
    if rank == 0:
        return w3
    down, up, residual = lowrank_split(w3.reshape(n, t * c), rank, layer.compute_dtype)
    layer.set_branch(down, up)
    return residual.reshape(n, t, c)


class SVDQuantLinear(QuantLinear):
    """SVDQuant for ``nn.Linear``: x ``(..., K)`` → ``(..., N)``; ``proj_down (K, r)``, ``proj_up (r, N)``."""

    @classmethod
    def from_module(cls, module: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                    name: str = "", *, rank: int = 32, smooth: torch.Tensor | None = None) -> "SVDQuantLinear":
        """Smooth (optional), split off the top-``rank`` components, quantize the residual."""
        w = module.weight.detach()
        layer = cls(module.in_features, module.out_features, weight_spec, act_spec, module.bias, w.dtype)
        label = name or "linear"
        layer._check_finite(w, label)
        residual = _init_lowrank(layer, w.reshape(module.out_features, 1, module.in_features), smooth, rank, label)
        layer._set_weight(residual, label)
        return layer.to(w.device)


class SVDQuantConv2d(QuantConv2d):
    """SVDQuant for ``nn.Conv2d``: smoothing per input channel; the branch is a kh×kw conv to ``r`` channels
    followed by a 1×1 conv to N (see :meth:`QuantConv2d._branch`)."""

    @classmethod
    def from_module(cls, module: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                    name: str = "", *, rank: int = 32, smooth: torch.Tensor | None = None) -> "SVDQuantConv2d":
        label = name or "conv"
        check_conv(module, label)
        w = module.weight.detach()
        cout, cin, kh, kw = w.shape
        layer = cls(cin, cout, (kh, kw), module.stride, module.padding, module.dilation, weight_spec, act_spec,
                    module.bias, w.dtype)
        layer._check_finite(w, label)
        w3 = w.permute(0, 2, 3, 1).reshape(cout, kh * kw, cin)
        layer._set_weight(_init_lowrank(layer, w3, smooth, rank, label), label)
        return layer.to(w.device)

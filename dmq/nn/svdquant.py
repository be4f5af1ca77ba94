"""SVDQuant layers: smoothing + a 16-bit low-rank branch + a quantized residual (SmoothQuant is rank 0).

For a weight W viewed as ``(N, K)`` (a conv's ``K = kh * kw * Cin``, see :mod:`dmq.formats`) and smoothing factors
λ ``(Cin,)``: ``W·diag(λ) = L1·L2 + R`` where ``L1·L2`` holds the top-``rank`` singular components and R is
quantized. Forward: ``y = Q(x/λ)·Q(R)ᵀ + (x/λ)·proj_down·proj_up + b``.

Buffers beyond :class:`~dmq.nn.base.QuantGemm`'s: ``smooth`` ``(Cin,)`` in the compute dtype (absent when no
smoothing was calibrated), ``proj_down`` ``(K, rank)`` and ``proj_up`` ``(rank, N)`` in the compute dtype (absent at
rank 0). LoRAs extend the branch by concatenation along the rank (see :mod:`dmq.methods.lora`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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


class _SVDQuantMixin:
    """The smoothing and low-rank state shared by the linear and conv variants."""

    def _init_lowrank(self, w3: torch.Tensor, smooth: torch.Tensor | None, rank: int, name: str) -> torch.Tensor:
        """Register ``smooth``/``proj_down``/``proj_up``; returns the residual ``(N, T, C)`` to quantize."""
        n, t, c = w3.shape
        if rank < 0 or rank > min(n, t * c):
            raise ConfigError(f"{name}: rank {rank} is outside [0, min(N, K) = {min(n, t * c)}]")
        self.rank = rank
        if smooth is not None:
            if smooth.shape != (c,) or not torch.isfinite(smooth).all() or (smooth <= 0).any():
                raise ConfigError(f"{name}: smoothing factors must be {c} finite positive values")
            self.register_buffer("smooth", smooth.to(self.compute_dtype))
            w3 = w3.to(torch.float32) * self.smooth.to(torch.float32)
        else:
            self.smooth = None
        if rank == 0:
            self.proj_down = self.proj_up = None
            return w3
        down, up, residual = lowrank_split(w3.reshape(n, t * c), rank, self.compute_dtype)
        self.register_buffer("proj_down", down)
        self.register_buffer("proj_up", up)
        return residual.reshape(n, t, c)

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is None:
            return x
        shape = [1] * x.dim()
        shape[self.act_channel_dim] = -1
        return x / self.smooth.to(x.dtype).reshape(shape)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Q(x/λ)·Q(R)ᵀ + b`` plus the low-rank branch ``(x/λ)·proj_down·proj_up``, in x's dtype."""
        xs = self._smoothed(x)
        w = self.dequantized_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = self._gemm(self.quantize_input(xs), w, bias)
        if self.proj_down is not None:
            y = y + self._branch(xs)
        return y

    def _lowrank_spec(self) -> dict[str, Any]:
        return {"rank": self.rank, "smooth": self.smooth is not None}

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.smooth, self.proj_down, self.proj_up)
                    if t is not None)
        return super().nbytes() + extra

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, smooth={self.smooth is not None}"


def _shell_lowrank(layer: QuantGemm, spec: dict[str, Any], k: int, n: int, smooth_channels: int) -> None:
    """Give an empty (meta) layer the smoothing/low-rank buffers a saved spec says it has."""
    layer.rank = spec["rank"]
    dtype = layer.compute_dtype
    with torch.device("meta"):
        layer.register_buffer("smooth", torch.empty(smooth_channels, dtype=dtype)) if spec["smooth"] else \
            setattr(layer, "smooth", None)
        if layer.rank:
            layer.register_buffer("proj_down", torch.empty(k, layer.rank, dtype=dtype))
            layer.register_buffer("proj_up", torch.empty(layer.rank, n, dtype=dtype))
        else:
            layer.proj_down = layer.proj_up = None


class SVDQuantLinear(_SVDQuantMixin, QuantLinear):
    """SVDQuant for ``nn.Linear``: x ``(..., K)`` → ``(..., N)``; ``proj_down (K, r)``, ``proj_up (r, N)``."""

    @classmethod
    def from_module(cls, module: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                    name: str = "", *, rank: int = 32, smooth: torch.Tensor | None = None) -> "SVDQuantLinear":
        """Smooth (optional), split off the top-``rank`` components, quantize the residual."""
        w = module.weight.detach()
        layer = cls(module.in_features, module.out_features, weight_spec, act_spec, module.bias, w.dtype)
        label = name or "linear"
        layer._check_finite(w, label)
        residual = layer._init_lowrank(w.reshape(module.out_features, 1, module.in_features), smooth, rank, label)
        layer._set_weight(residual, label)
        return layer.to(w.device)

    @classmethod
    def from_layer_spec(cls, spec: dict[str, Any]) -> "SVDQuantLinear":
        layer = super().from_layer_spec(spec)
        _shell_lowrank(layer, spec, spec["in_features"], spec["out_features"], spec["in_features"])
        return layer

    def _shape_spec(self) -> dict[str, Any]:
        return {**super()._shape_spec(), **self._lowrank_spec()}

    def _branch(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs @ self.proj_down.to(xs.dtype)) @ self.proj_up.to(xs.dtype)


class SVDQuantConv2d(_SVDQuantMixin, QuantConv2d):
    """SVDQuant for ``nn.Conv2d``: smoothing per input channel; the branch is a kh×kw conv to ``r`` channels
    (``proj_down (K, r)``, K ordered (kh, kw, Cin)) followed by a 1×1 conv to N (``proj_up (r, N)``)."""

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
        layer._set_weight(layer._init_lowrank(w3, smooth, rank, label), label)
        return layer.to(w.device)

    @classmethod
    def from_layer_spec(cls, spec: dict[str, Any]) -> "SVDQuantConv2d":
        layer = super().from_layer_spec(spec)
        kh, kw = spec["kernel_size"]
        _shell_lowrank(layer, spec, kh * kw * spec["in_channels"], spec["out_channels"], spec["in_channels"])
        return layer

    def _shape_spec(self) -> dict[str, Any]:
        return {**super()._shape_spec(), **self._lowrank_spec()}

    def _branch(self, xs: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        down = self.proj_down.to(xs.dtype).T.reshape(self.rank, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        h = F.conv2d(xs, down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.proj_up.to(xs.dtype).T[:, :, None, None])

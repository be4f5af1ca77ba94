"""``QuantLinear``: a quantized drop-in for ``nn.Linear``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmq.errors import UnsupportedModuleError
from dmq.formats import QuantSpec
from dmq.nn.base import QuantGemm

__all__ = ["QuantLinear"]


class QuantLinear(QuantGemm):
    """``y = Q(x) · Q(W)ᵀ + b`` for x ``(..., in_features)`` → y ``(..., out_features)`` in x's dtype.

    The weight ``(out_features, in_features)`` is stored quantized (see :class:`~dmq.nn.base.QuantGemm` for the
    buffers); input groups run along ``in_features``.
    """

    def __init__(self, in_features: int, out_features: int, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype, timestep_buckets: int = 0) -> None:
        super().__init__(out_features, 1, in_features, weight_spec, act_spec, bias, compute_dtype,
                         timestep_buckets)
        self.in_features = in_features

    @classmethod
    def from_module(cls, module: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                    name: str = "", *, rank: int = 0, smooth: torch.Tensor | None = None,
                    timestep_buckets: int = 0) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (or subclass), with optional smoothing ``(K,)`` and a rank-``rank`` SVD branch
        (see :meth:`QuantGemm._init_branch`). ``name`` is used in error messages."""
        label = name or "linear"
        if not isinstance(module, nn.Linear):
            raise UnsupportedModuleError(f"{label}: QuantLinear wraps nn.Linear, got {type(module).__name__}")
        w = module.weight.detach()
        layer = cls(module.in_features, module.out_features, weight_spec, act_spec, module.bias, w.dtype,
                    timestep_buckets)
        w3 = w.reshape(module.out_features, 1, module.in_features)
        layer._check_finite(w3, label)
        layer._set_weight(layer._init_branch(w3, smooth, rank, label), label)
        return layer.to(w.device)

    @classmethod
    def from_layer_spec(cls, spec: dict[str, Any]) -> "QuantLinear":
        """An empty layer (buffers on the meta device) matching a saved :meth:`layer_spec`."""
        dtype = getattr(torch, spec["compute_dtype"])
        with torch.device("meta"):
            bias = torch.empty(spec["out_features"], dtype=dtype) if spec["bias"] else None
            layer = cls(spec["in_features"], spec["out_features"], QuantSpec.from_dict(spec["weight"]),
                        QuantSpec.from_dict(spec["activation"]) if spec["activation"] else None, bias, dtype,
                        spec.get("timestep_buckets", 0))
            layer._set_weight(torch.empty(spec["out_features"], 1, spec["in_features"]), "")
        layer._shell_branch(spec, spec["in_features"])
        return layer

    def _shape_spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _gemm(self, x: torch.Tensor, w3: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w3.reshape(self.out_features, self.in_features), bias)

    def _branch(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs @ self.proj_down.to(xs.dtype)) @ self.proj_up.to(xs.dtype)

"""Quantized layers. Each wraps one float module type and keeps a pure-PyTorch reference forward."""

import torch

from dmq.errors import UnsupportedModuleError
from dmq.formats import QuantSpec
from dmq.nn.base import QuantGemm, QuantModule, outermost_quant_modules
from dmq.nn.conv import QuantConv2d, unsupported_conv_reason
from dmq.nn.linear import QuantLinear
from dmq.nn.split import SplitQuantConv2d
from dmq.nn.svdquant import SVDQuantConv2d, SVDQuantLinear

LAYER_TYPES: dict[str, type[QuantModule]] = {
    cls.__name__: cls for cls in (QuantLinear, QuantConv2d, SVDQuantLinear, SVDQuantConv2d, SplitQuantConv2d)}

__all__ = ["QuantModule", "outermost_quant_modules", "SplitQuantConv2d", "QuantGemm", "QuantLinear", "QuantConv2d", "SVDQuantLinear", "SVDQuantConv2d", "LAYER_TYPES", "why_unsupported", "quantize_module"]


def why_unsupported(module: torch.nn.Module) -> str | None:
    """Why dmq cannot quantize this GEMM-like module, or ``None`` when a quantized layer type wraps it."""
    if isinstance(module, torch.nn.Linear):
        return None
    if isinstance(module, torch.nn.Conv2d):
        return unsupported_conv_reason(module)
    return f"{type(module).__name__} has no quantized layer type in dmq (supported: nn.Linear, nn.Conv2d)"


def quantize_module(module: torch.nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                    name: str = "") -> QuantGemm:
    """The quantized layer that replaces ``module``; UnsupportedModuleError (naming it) when there is none."""
    reason = why_unsupported(module)
    if reason is not None:
        raise UnsupportedModuleError(f"{name or type(module).__name__}: {reason}")
    cls = QuantLinear if isinstance(module, torch.nn.Linear) else QuantConv2d
    return cls.from_module(module, weight_spec, act_spec, name=name)


# registers the Triton fast paths with the dispatch point (CUDA, compute capability ≥ 8.0 only)
import dmq.kernels.linear  # noqa: E402,F401

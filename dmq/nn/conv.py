"""``QuantConv2d``: a quantized drop-in for ``nn.Conv2d`` (groups=1, zero padding)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmq.errors import UnsupportedModuleError
from dmq.formats import QuantSpec
from dmq.nn.base import QuantGemm

__all__ = ["QuantConv2d", "check_conv", "unsupported_conv_reason"]


def unsupported_conv_reason(module: nn.Module) -> str | None:
    """Why a module cannot become a QuantConv2d, or ``None``."""
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not an nn.Conv2d"
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}) is not supported"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"padding {module.padding!r} / mode {module.padding_mode!r} is not supported (explicit zeros only)"
    return None


def check_conv(module: nn.Module, label: str) -> None:
    """UnsupportedModuleError, naming ``label``, unless the module can become a QuantConv2d."""
    reason = unsupported_conv_reason(module)
    if reason is not None:
        raise UnsupportedModuleError(f"{label}: {reason}")


class QuantConv2d(QuantGemm):
    """A convolution as a GEMM over ``K = (kh, kw, Cin)``: x ``(B, Cin, H, W)`` → ``(B, Cout, H', W')``.

    The weight ``(Cout, Cin, kh, kw)`` is stored as ``(Cout, kh * kw, Cin)`` codes: weight groups run along Cin
    within one kernel tap; activation groups run along channels within one input pixel.
    """

    act_channel_dim = 1

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 weight_spec: QuantSpec, act_spec: QuantSpec | None, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, timestep_buckets: int = 0) -> None:
        kh, kw = kernel_size
        super().__init__(out_channels, kh * kw, in_channels, weight_spec, act_spec, bias, compute_dtype,
                         timestep_buckets)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)

    @classmethod
    def from_module(cls, module: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None = None,
                    name: str = "", *, rank: int = 0, smooth: torch.Tensor | None = None,
                    timestep_buckets: int = 0) -> "QuantConv2d":
        """Quantize an ``nn.Conv2d`` (grouped convs and non-zero padding modes raise UnsupportedModuleError), with
        optional smoothing ``(Cin,)`` and a rank-``rank`` SVD branch (see :meth:`QuantGemm._init_branch`)."""
        label = name or "conv"
        check_conv(module, label)
        w = module.weight.detach()
        cout, cin, kh, kw = w.shape
        layer = cls(cin, cout, (kh, kw), module.stride, module.padding, module.dilation, weight_spec, act_spec,
                    module.bias, w.dtype, timestep_buckets)
        w3 = w.permute(0, 2, 3, 1).reshape(cout, kh * kw, cin)
        layer._check_finite(w3, label)
        layer._set_weight(layer._init_branch(w3, smooth, rank, label), label)
        return layer.to(w.device)

    @classmethod
    def from_layer_spec(cls, spec: dict[str, Any]) -> "QuantConv2d":
        """An empty layer (buffers on the meta device) matching a saved :meth:`layer_spec`."""
        dtype = getattr(torch, spec["compute_dtype"])
        kh, kw = spec["kernel_size"]
        with torch.device("meta"):
            bias = torch.empty(spec["out_channels"], dtype=dtype) if spec["bias"] else None
            layer = cls(spec["in_channels"], spec["out_channels"], (kh, kw), spec["stride"], spec["padding"],
                        spec["dilation"], QuantSpec.from_dict(spec["weight"]),
                        QuantSpec.from_dict(spec["activation"]) if spec["activation"] else None, bias, dtype,
                        spec.get("timestep_buckets", 0))
            layer._set_weight(torch.empty(spec["out_channels"], kh * kw, spec["in_channels"]), "")
        layer._shell_branch(spec, kh * kw * spec["in_channels"])
        return layer

    def _shape_spec(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation)}

    def _gemm(self, x: torch.Tensor, w3: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kh, kw = self.kernel_size
        w = w3.reshape(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation)

    def _branch(self, xs: torch.Tensor) -> torch.Tensor:
        """A kh×kw conv to ``rank`` channels (``proj_down (K, r)``, K ordered (kh, kw, Cin)), then a 1×1 conv to N."""
        kh, kw = self.kernel_size
        down = self.proj_down.to(xs.dtype).T.reshape(self.rank, kh, kw, self.in_channels).permute(0, 3, 1, 2)
        h = F.conv2d(xs, down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.proj_up.to(xs.dtype).T[:, :, None, None])

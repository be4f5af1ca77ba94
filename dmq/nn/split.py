"""Split-shortcut quantization (Q-Diffusion): a layer whose input is a concatenation ``cat([hidden, skip], 1)``
gets one quantized layer per channel range, so that no activation scale or weight group straddles the split."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dmq.errors import ConfigError
from dmq.formats import QuantSpec
from dmq.nn.base import QuantModule
from dmq.nn.conv import QuantConv2d, check_conv

__all__ = ["SplitQuantConv2d"]


class SplitQuantConv2d(QuantModule):
    """``y = Σ_i conv_i(x[:, s_i:s_{i+1}]) + b`` for x ``(B, Cin, H, W)``: each ``parts[i]`` is a
    :class:`QuantConv2d` over one input-channel range with its own weight scales and activation quantizer; the bias
    lives in ``parts[0]``. ``splits``: the inner channel boundaries, e.g. ``(C_hidden,)``."""

    def __init__(self, splits: tuple[int, ...], parts: list[QuantConv2d]) -> None:
        super().__init__()
        self.splits = tuple(splits)
        self.parts = nn.ModuleList(parts)

    @property
    def in_channels(self) -> int:
        return sum(p.in_channels for p in self.parts)

    @property
    def out_channels(self) -> int:
        return self.parts[0].out_channels

    @property
    def bounds(self) -> list[tuple[int, int]]:
        edges = [0, *self.splits, self.in_channels]
        return list(zip(edges[:-1], edges[1:]))

    @classmethod
    def from_module(cls, module: nn.Conv2d, splits: tuple[int, ...], weight_spec: QuantSpec,
                    act_spec: QuantSpec | None, name: str = "") -> "SplitQuantConv2d":
        """Quantize ``module`` with one QuantConv2d per input-channel range."""
        label = name or "conv"
        check_conv(module, label)
        edges = [0, *splits, module.in_channels]
        if any(b <= a for a, b in zip(edges[:-1], edges[1:])):
            raise ConfigError(f"{label}: split points {splits} must lie strictly inside (0, {module.in_channels})")
        parts = []
        for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            piece = nn.Conv2d(b - a, module.out_channels, module.kernel_size, module.stride, module.padding,
                              module.dilation, bias=module.bias is not None and i == 0, device="meta")
            piece.weight = nn.Parameter(module.weight.detach()[:, a:b], requires_grad=False)
            if piece.bias is not None:
                piece.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
            act = act_spec.fitted(b - a) if act_spec is not None else None
            parts.append(QuantConv2d.from_module(piece, weight_spec.fitted(b - a), act, name=f"{label}[{a}:{b}]"))
        return cls(tuple(splits), parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for (a, b), part in zip(self.bounds, self.parts):
            out = part(x[:, a:b])
            y = out if y is None else y + out
        return y

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)

    def layer_spec(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "splits": list(self.splits),
                "parts": [p.layer_spec() for p in self.parts]}

    @classmethod
    def from_layer_spec(cls, spec: dict[str, Any]) -> "SplitQuantConv2d":
        return cls(tuple(spec["splits"]), [QuantConv2d.from_layer_spec(p) for p in spec["parts"]])

    def extra_repr(self) -> str:
        return f"splits={self.splits}"

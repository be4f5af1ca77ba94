"""The dispatch point between quantized layers and their fast kernels.

A kernel registers itself for a layer type with a predicate (device, dtypes, specs it supports). A layer asks
:func:`find_kernel` at every call and falls back to its pure-PyTorch reference forward when nothing matches (CPU,
unsupported formats), so the reference path is always there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["register_kernel", "find_kernel"]

KernelFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
Predicate = Callable[[torch.nn.Module, torch.Tensor], bool]

_KERNELS: list[tuple[type, Predicate, KernelFn]] = []


def register_kernel(layer_type: type, predicate: Predicate, fn: KernelFn) -> None:
    """Use ``fn(layer, x)`` for layers of ``layer_type`` whenever ``predicate(layer, x)`` holds."""
    _KERNELS.append((layer_type, predicate, fn))


def find_kernel(layer: torch.nn.Module, x: torch.Tensor) -> KernelFn | None:
    """The first registered kernel that accepts this layer and input, or ``None`` (use the reference)."""
    for layer_type, predicate, fn in _KERNELS:
        if isinstance(layer, layer_type) and predicate(layer, x):
            return fn
    return None

"""Regional compilation of a (quantized) denoiser: ``torch.compile`` each repeated block instead of the whole model.

Blocks of one class share their compiled code (their parameters and buffers are graph inputs), so compile time is
that of one block per class rather than of the whole model: whole-model compilation of a dmq-quantized FLUX.1-dev
transformer ran past 215 s on the H100 (bf16: 103 s; benchmarks/results/e2e-flux-compile-h100.json). dmq's kernels
are custom ops, so each compiled block keeps them as single nodes and fuses the 16-bit work (norms, RoPE,
activations, residual adds) around them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from torch import nn

from dmq.errors import ConfigError
from dmq.nn.base import QuantModule
from dmq.nn.conv import QuantConv2d

__all__ = ["compile_blocks", "repeated_block_classes"]

logger = logging.getLogger(__name__)

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _has_gemm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.Conv2d, QuantModule)) for m in module.modules() if m is not module)


def _conv_blocks(model: nn.Module, declared: tuple[str, ...]) -> tuple[str, ...]:
    """Classes outside the declared blocks that hold a convolution directly and are instantiated at least twice (a
    U-Net's ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``): diffusers declares only the U-Net's transformer
    blocks, which left the quantized convolutions' layout copies and im2col to eager kernels."""
    def is_conv(m: nn.Module) -> bool:   # a split-shortcut conv is a QuantModule of two QuantConv2d
        return isinstance(m, (nn.Conv2d, QuantConv2d)) or \
            (isinstance(m, QuantModule) and any(isinstance(s, QuantConv2d) for s in m.modules()))

    inside_declared: set[int] = set()
    for m in model.modules():
        if type(m).__name__ in declared:
            inside_declared.update(id(s) for s in m.modules())
    counts: Counter = Counter()
    holds_declared: set[str] = set()
    for m in model.modules():
        if m is model or isinstance(m, QuantModule) or id(m) in inside_declared or \
                not any(is_conv(c) for c in m.children()):
            continue
        counts[type(m).__name__] += 1
        if any(type(s).__name__ in declared for s in m.modules()):
            holds_declared.add(type(m).__name__)
    return tuple(c for c, n in counts.items() if n >= 2 and c not in holds_declared)


def repeated_block_classes(model: nn.Module) -> tuple[str, ...]:
    """Class names of the model's repeated blocks: diffusers' ``_repeated_blocks`` when the model declares them
    (plus the repeated classes holding convolutions outside them, see :func:`_conv_blocks`), else every
    non-container class holding a linear or convolution that is instantiated at least twice, with instances inside
    no other such instance (e.g. PixArt-Σ's ``BasicTransformerBlock``)."""
    declared = tuple(getattr(model, "_repeated_blocks", None) or ())
    if declared:
        return declared + _conv_blocks(model, declared)
    candidates = [(name, m) for name, m in model.named_modules() if not isinstance(m, _CONTAINERS) and _has_gemm(m)]
    counts = Counter(type(m) for _, m in candidates)
    outer: list[str] = []
    taken: list[str] = []
    for name, mod in candidates:
        if counts[type(mod)] >= 2 and not any(name.startswith(f"{t}.") for t in taken):
            taken.append(name)
            if type(mod).__name__ not in outer:
                outer.append(type(mod).__name__)
    return tuple(outer)


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """Compile every repeated block of ``model`` in place (``module.compile(**compile_kwargs)``) after building the
    kernel weight layouts of its quantized layers, so compiled graphs only read them. Returns the names of the
    compiled modules; ConfigError when the model has no repeated block."""
    from dmq.kernels.linear import prepare_model

    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile_blocks takes the denoiser module (pipe.transformer or pipe.unet), got "
                          f"{type(model).__name__}")
    prepare_model(model)
    classes = repeated_block_classes(model)
    names = [name for name, m in model.named_modules() if type(m).__name__ in classes]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no repeated blocks to compile; use torch.compile(model)")
    for name in names:
        model.get_submodule(name).compile(**compile_kwargs)
    logger.info("dmq: compiled %d blocks of %s", len(names), ", ".join(classes))
    return names

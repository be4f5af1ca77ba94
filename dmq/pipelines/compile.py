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

__all__ = ["compile_blocks", "repeated_block_classes"]

logger = logging.getLogger(__name__)

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _has_gemm(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.Conv2d, QuantModule)) for m in module.modules() if m is not module)


def repeated_block_classes(model: nn.Module) -> tuple[str, ...]:
    """Class names of the model's repeated blocks: diffusers' ``_repeated_blocks`` when the model declares them,
    else every non-container class holding a linear or convolution that is instantiated at least twice, with
    instances inside no other such instance (e.g. PixArt-Σ's ``BasicTransformerBlock``)."""
    declared = tuple(getattr(model, "_repeated_blocks", None) or ())
    if declared:
        return declared
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

"""8-bit attention in diffusers denoisers (int8 ``QKᵀ``, fp8 ``PV``: :func:`dmq.kernels.ops.int8_attention`).

How it is installed, and why this route: a diffusers hook (``HookRegistry``, named :data:`HOOK_NAME`) on every
self- or joint-attention module runs the module's own, unchanged processor inside a ``TorchFunctionMode`` that
answers ``torch.nn.functional.scaled_dot_product_attention`` calls with the 8-bit kernel and lets every other
function through. Nothing global is patched: the mode is thread-local and active only while a hooked attention
module runs, and :func:`disable_quantized_attention` removes the hooks. Everything the processor does before the
SDPA call stays as it is, so FLUX's and SD3's joint attention quantize Q and K after RoPE and the QK norms.

The alternatives were worse here: diffusers 0.42.1's attention dispatcher keys its backend registry on a closed
``AttentionBackendName`` enum (a dmq backend could only be added by replacing a member's function), and only FLUX
among the supported families goes through the dispatcher — SD3, PixArt, DiT and the U-Nets use
``AttnProcessor2_0`` / ``JointAttnProcessor2_0``, which call ``F.scaled_dot_product_attention`` directly; writing
processors of our own would copy diffusers' forward code. The dispatcher's native backend calls the same SDPA
function, so FLUX is served too; with another backend selected (``set_attention_backend("flash")``) nothing is
quantized, which the hook's counters show.

Which calls are quantized: cross-attention modules (``is_cross_attention``: U-Net and PixArt text keys) get no
hook and stay 16-bit; a hooked call with a mask, dropout, ``is_causal``, grouped heads or different q/v head dims
falls back to PyTorch's SDPA (counted in ``Int8AttentionHook.fallback``). On CUDA the kernel needs fp16/bf16, a
head dim ≤ 256 and fp8 tensor cores (compute capability ≥ 8.9: an A100 falls back, with a warning); elsewhere the
op runs its PyTorch reference (slow, for fidelity studies).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn
from torch.overrides import TorchFunctionMode

from dmq.errors import ConfigError
from dmq.kernels._common import FP8_CAPABILITY, capability

__all__ = ["ATTENTION_MODES", "HOOK_NAME", "Int8AttentionHook", "attention_targets", "enable_quantized_attention",
           "disable_quantized_attention", "quantized_attention_hooks"]

logger = logging.getLogger(__name__)

#: values of ``QuantConfig.attention`` other than None
ATTENTION_MODES = ("int8",)
HOOK_NAME = "dmq_quantized_attention"
_MAX_HEAD_DIM = 256


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def _supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any, dropout_p: float,
               is_causal: bool, enable_gqa: bool) -> bool:
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return False
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[3] > _MAX_HEAD_DIM:
        return False
    if q.device.type == "cuda" and (q.dtype not in (torch.float16, torch.bfloat16) or not _fp8_gpu(q)):
        return False
    return q.dtype == k.dtype == v.dtype and q.is_floating_point()


_WARNED: set[int | None] = set()


def _fp8_gpu(q: torch.Tensor) -> bool:
    """Whether q's GPU has the fp8 tensor cores that the kernel's PV product needs (compute capability ≥ 8.9);
    warns once per device when it has not."""
    cap = capability(q)
    if cap >= FP8_CAPABILITY:
        return True
    if q.device.index not in _WARNED:
        _WARNED.add(q.device.index)
        logger.warning("8-bit attention needs fp8 tensor cores (compute capability >= 8.9); %s has %d.%d, so its "
                       "attention runs PyTorch's 16-bit SDPA (counted in Int8AttentionHook.fallback)", q.device, *cap)
    return False


class _QuantizedSDPA(TorchFunctionMode):
    """Sends supported ``F.scaled_dot_product_attention`` calls to ``torch.ops.dmq.int8_attention``."""

    def __init__(self, hook: "Int8AttentionHook") -> None:
        super().__init__()
        self.hook = hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        from dmq.kernels.ops import int8_attention

        q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_args(*args, **kwargs)
        # the counters count eager calls only: a Python int changed inside a compiled region is a guard that fails
        # on the next call, and every call recompiled the block (seen on PixArt-Σ, SD3 and FLUX blocks)
        counting = not torch.compiler.is_compiling()
        if not _supported(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa):
            if counting:
                self.hook.fallback += 1
            return func(*args, **kwargs)
        if counting:
            self.hook.quantized += 1
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return int8_attention(q, k, v, scale)


class Int8AttentionHook(ModelHook):
    """Runs one attention module with 8-bit SDPA. ``quantized`` / ``fallback``: SDPA calls served by the kernel /
    left to PyTorch since the hook was installed, in eager runs (compiled calls are not counted)."""

    _is_stateful = False

    def __init__(self, mode: str = "int8") -> None:
        super().__init__()
        if mode not in ATTENTION_MODES:
            raise ConfigError(f"attention mode must be one of {ATTENTION_MODES} (or None), got {mode!r}")
        self.mode = mode
        self.quantized = 0
        self.fallback = 0

    def new_forward(self, module: nn.Module, *args, **kwargs):
        with _QuantizedSDPA(self):
            return self.fn_ref.original_forward(*args, **kwargs)


def attention_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(self- / joint-attention module names that get 8-bit attention, cross-attention names kept 16-bit)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    targets, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, (Attention, AttentionModuleMixin)):
            (kept if getattr(module, "is_cross_attention", False) else targets).append(name)
    return targets, kept


def quantized_attention_hooks(model: nn.Module) -> dict[str, Int8AttentionHook]:
    """The installed hooks by module name (empty when 8-bit attention is off)."""
    hooks = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(HOOK_NAME) if registry is not None else None
        if hook is not None:
            hooks[name] = hook
    return hooks


def enable_quantized_attention(model: nn.Module, mode: str = "int8") -> list[str]:
    """Install 8-bit attention on the self- and joint-attention modules of a diffusers model (idempotent).
    Returns the names of the hooked modules; raises ConfigError for an unknown mode or a model without
    diffusers attention modules."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"attention mode must be one of {ATTENTION_MODES} (or None), got {mode!r}")
    targets, kept = attention_targets(model)
    if not targets:
        raise ConfigError(f"{type(model).__name__} has no diffusers self-attention module to quantize")
    installed = quantized_attention_hooks(model)
    for name in targets:
        if name not in installed:
            HookRegistry.check_if_exists_or_initialize(model.get_submodule(name)).register_hook(
                Int8AttentionHook(mode), HOOK_NAME)
    logger.info("dmq: %s attention on %d modules, %d cross-attention modules kept 16-bit", mode, len(targets),
                len(kept))
    return targets


def disable_quantized_attention(model: nn.Module) -> None:
    """Remove the hooks installed by :func:`enable_quantized_attention` (no-op where there are none)."""
    for name in quantized_attention_hooks(model):
        HookRegistry.check_if_exists_or_initialize(model.get_submodule(name)).remove_hook(HOOK_NAME, recurse=False)

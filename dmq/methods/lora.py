"""LoRAs on a quantized pipeline: concatenated onto the quantized layers' 16-bit low-rank branch.

For a LoRA ``ΔW = scale · B·A`` (``A (r, K)``, ``B (N, r)``; a conv's ``A (r, Cin, kh, kw)``, ``B (N, r, 1, 1)``) on a
quantized layer whose branch input is ``x/λ``: ``proj_down ← [proj_down | diag(λ)·Aᵀ]`` and
``proj_up ← [proj_up ; scale·Bᵀ]``, so the 4-bit residual is never touched and removing the LoRA slices the branch
back to the very tensors it had. A LoRA for a layer that stays floating point is applied by a forward hook that adds
``scale · B·A·x``; removing it removes the hook. Everything is validated before anything is applied.

On a model with fused projections (:mod:`dmq.methods.fuse`) a LoRA names ``to_q``, ``to_k``... as usual: each such
part keeps its ``A (r, K)`` and its ``B (n, r)`` becomes a zero-padded ``(N_fused, r)`` at the original's output rows,
and all parts of one LoRA that land on one fused layer form one branch extension (A's concatenated along the rank,
padded B's side by side), so the layer holds one ``(start, rank)`` per LoRA and removal stays exact.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dmq.errors import DmqError
from dmq.methods.fuse import fused_layers, replaced_names
from dmq.nn.base import QuantGemm

__all__ = ["add_lora", "remove_lora", "parse_lora_state_dict", "add_lora_to_model", "route_diffusers_loras"]

logger = logging.getLogger(__name__)

_SUFFIXES = {
    "down": (".lora_A.weight", ".lora_down.weight", ".lora.down.weight"),
    "up": (".lora_B.weight", ".lora_up.weight", ".lora.up.weight"),
    "alpha": (".alpha", ".lora_alpha"),
}
_PREFIXES = ("unet.", "transformer.", "base_model.model.")


def parse_lora_state_dict(state: Mapping[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module name: (A, B, alpha / rank)}`` from a LoRA state dict (peft ``lora_A``/``lora_B``, kohya-style
    ``lora_down``/``lora_up`` with optional ``alpha``), or from an already parsed ``{name: (A, B)}`` mapping."""
    if all(isinstance(v, tuple) for v in state.values()):
        return {name: (a, b, 1.0) for name, (a, b) in state.items()}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        for kind, suffixes in _SUFFIXES.items():
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix is not None:
                name = key[: -len(suffix)]
                for p in _PREFIXES:
                    name = name.removeprefix(p)
                name = re.sub(r"\.default$", "", name)
                parts.setdefault(name, {})[kind] = value
                break
        else:
            raise DmqError(f"LoRA key {key!r} is neither a lora_A/lora_down, lora_B/lora_up nor an alpha tensor")
    out = {}
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            raise DmqError(f"LoRA for {name!r} lacks its {'down (A)' if 'down' not in p else 'up (B)'} matrix")
        rank = p["down"].shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else float(rank)
        out[name] = (p["down"], p["up"], alpha / rank)
    return out


def _lora_matrices(module: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes against the module and return ``(down (K, r), up (r, N))`` in the GEMM layout of the module
    (K ordered (kh, kw, Cin) for convolutions)."""
    r = a.shape[0]
    if isinstance(module, (nn.Linear, QuantGemm)) and not isinstance(module, nn.Conv2d) and a.dim() == 2:
        k = module.in_features if isinstance(module, nn.Linear) else module.channels * module.taps
        n = module.out_features
        if a.shape != (r, k) or b.shape != (n, r):
            raise DmqError(f"LoRA {name!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a ({n} × {k}) layer "
                           f"(expected A ({r}, {k}), B ({n}, {r}))")
        return a.T, b.T
    if a.dim() == 4:
        cin = module.in_channels
        kh, kw = module.kernel_size
        n = module.out_channels
        if a.shape != (r, cin, kh, kw) or b.shape[:2] != (n, r) or b[0, 0].numel() != 1:
            raise DmqError(f"LoRA {name!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a conv with "
                           f"{cin} → {n} channels and a {kh}×{kw} kernel")
        return a.permute(0, 2, 3, 1).reshape(r, -1).T, b.reshape(n, r).T
    raise DmqError(f"LoRA {name!r}: A of shape {tuple(a.shape)} does not fit a {type(module).__name__}")


#: one part of a LoRA: (its key, its output rows ``(start, n)`` in a fused layer or None for all rows, A, B, alpha/rank)
_Part = tuple[str, tuple[int, int] | None, torch.Tensor, torch.Tensor, float]


def _parts_by_layer(model: nn.Module, parsed: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
                    ) -> dict[str, list[_Part]]:
    """The parsed LoRA grouped by the layer each part lands on: its own module, or for an original that a fused
    projection replaced, the fused layer (with the original's output rows)."""
    slices = {orig: (fused, start, n) for fused, rows in fused_layers(model).items() for orig, start, n in rows}
    groups: dict[str, list[_Part]] = {}
    for key, (a, b, alpha_scale) in parsed.items():
        layer, start, n = slices.get(key, (key, None, None))
        groups.setdefault(layer, []).append((key, (start, n) if start is not None else None, a, b, alpha_scale))
    return groups


def _merge_parts(module: nn.Module, layer: str, parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 LoRA ``(A (R, K), B (N, R))`` of a linear layer of N outputs for several parts that land on it: the
    A's concatenated along the rank, each B scaled by its alpha/rank and zero-padded to N rows at its slice."""
    n_out, k = module.out_features, module.in_features
    downs, ups = [], []
    for key, rows, a, b, alpha_scale in parts:
        start, n = rows or (0, n_out)
        r = a.shape[0]
        if a.shape != (r, k) or b.shape != (n, r):
            raise DmqError(f"LoRA {key!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit rows {start}:{start + n} "
                           f"of the ({n_out} × {k}) layer {layer!r} (expected A ({r}, {k}), B ({n}, {r}))")
        up = torch.zeros(n_out, r)
        up[start:start + n] = alpha_scale * b.detach().float()
        downs.append(a.detach().float())
        ups.append(up)
    return torch.cat(downs, 0), torch.cat(ups, 1)


class _FloatLoRAHook:
    """Adds ``scale·B·A·x`` to a floating-point Linear/Conv2d's output."""

    def __init__(self, module: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.a, self.b, self.scale = a, b, scale
        self.conv = isinstance(module, nn.Conv2d)
        self.module = module

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        a, b = self.a.to(x.dtype), self.b.to(x.dtype)
        if self.conv:
            m = self.module
            delta = F.conv2d(F.conv2d(x, a, None, m.stride, m.padding, m.dilation), b)
        else:
            delta = F.linear(F.linear(x, a), b)
        return output + self.scale * delta


def _denoiser(pipe: Any) -> nn.Module:
    from dmq.pipelines.quantize import denoiser_name

    return getattr(pipe, denoiser_name(pipe))


def add_lora(pipe: Any, lora: Mapping[str, Any], scale: float = 1.0, name: str = "default") -> None:
    """Add a LoRA (``{module name: (A, B)}`` or a LoRA state dict) to the pipeline's denoiser under ``name``.

    Quantized layers get it in their low-rank branch (smoothing accounted for); floating-point layers through a
    forward hook; parts on projections that a fused layer replaced go to their rows of it (see the module doc).
    Unknown module names, shape mismatches and a name already in use raise DmqError naming the key; nothing is
    applied unless everything fits.
    """
    add_lora_to_model(_denoiser(pipe), lora, scale, name)


def add_lora_to_model(model: nn.Module, lora: Mapping[str, Any], scale: float = 1.0, name: str = "default") -> None:
    """:func:`add_lora` on a denoiser module."""
    registry = model.__dict__.setdefault("_dmq_loras", {})
    if name in registry:
        raise DmqError(f"a LoRA named {name!r} is already added; remove_lora it first or pick another name")
    parsed = parse_lora_state_dict(lora)
    if not parsed:
        raise DmqError("the LoRA holds no matrices")
    modules = dict(model.named_modules())
    plan = []
    for target, parts in _parts_by_layer(model, parsed).items():
        module, key = modules.get(target), parts[0][0]
        if module is None:
            raise DmqError(f"LoRA key {key!r} names no module of {type(model).__name__}")
        if not isinstance(module, (nn.Linear, nn.Conv2d, QuantGemm)):
            raise DmqError(f"LoRA key {key!r}: a {type(module).__name__} takes no LoRA (Linear/Conv2d only)")
        if len(parts) == 1 and parts[0][1] is None:
            _, _, a, b, alpha_scale = parts[0]
            s = scale * alpha_scale
        else:
            a, b = _merge_parts(module, target, parts)
            s = scale
        down, up = _lora_matrices(module, target, a.detach().float(), b.detach().float())
        plan.append((target, module, a, b, down, up, s))
    handles = []
    for target, module, a, b, down, up, s in plan:
        if isinstance(module, QuantGemm):
            dtype, device = module.compute_dtype, module.qweight.device
            if module.smooth is not None:
                lam = module.smooth.float().to(device)
                down = down.to(device) * lam.repeat(module.taps)[:, None]  # K ordered (tap, channel)
            down, up = down.to(device=device, dtype=dtype), (s * up).to(device=device, dtype=dtype)
            start = module.rank
            if module.proj_down is None:
                module.set_branch(down, up)
            else:
                module.set_branch(torch.cat([module.proj_down, down], 1), torch.cat([module.proj_up, up], 0))
            module.loras[name] = (start, down.shape[1])
            handles.append((target, None))
        else:
            p = module.weight
            hook = _FloatLoRAHook(module, a.detach().to(p.device, p.dtype), b.detach().to(p.device, p.dtype), s)
            handles.append((target, module.register_forward_hook(hook)))
    registry[name] = handles
    logger.info("dmq: LoRA %r on %d layers", name, len(handles))


def remove_lora(pipe: Any, name: str) -> None:
    """Remove a LoRA added by :func:`add_lora`: the branches return to exactly the tensors they had before."""
    model = _denoiser(pipe)
    registry = model.__dict__.get("_dmq_loras", {})
    if name not in registry:
        raise DmqError(f"no LoRA named {name!r}; added: {sorted(registry)}")
    modules = dict(model.named_modules())
    for target, handle in registry.pop(name):
        if handle is not None:
            handle.remove()
            continue
        layer = modules[target]
        start, r = layer.loras.pop(name)
        keep = [i for i in range(layer.rank) if not start <= i < start + r]
        idx = torch.tensor(keep, dtype=torch.long, device=layer.proj_down.device)
        if keep:
            layer.set_branch(layer.proj_down.index_select(1, idx).contiguous(),
                             layer.proj_up.index_select(0, idx).contiguous())
        else:
            layer.set_branch(None, None)
        for other, (s, k) in list(layer.loras.items()):
            if s > start:
                layer.loras[other] = (s - r, k)


def _module_of(key: str) -> str:
    for suffixes in _SUFFIXES.values():
        for suffix in suffixes:
            if key.endswith(suffix):
                return re.sub(r"\.default$", "", key[: -len(suffix)])
    return key


def route_diffusers_loras(model: nn.Module) -> None:
    """Make diffusers' ``pipe.load_lora_weights`` work on a quantized denoiser: its ``load_lora_adapter`` is wrapped
    so that the LoRA matrices of dmq-quantized layers go into their low-rank branch (under the adapter name; remove
    with :func:`remove_lora`) and the rest goes to diffusers/peft as before. peft would otherwise wrap (or fail on)
    the quantized layers."""
    original = getattr(model, "load_lora_adapter", None)
    if original is None or getattr(original, "_dmq_routed", False):
        return

    def load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        sd = pretrained_model_name_or_path_or_dict
        if not isinstance(sd, Mapping):
            raise DmqError("on a dmq-quantized model, load LoRAs from a state dict (pipe.load_lora_weights(dict) or "
                           "dmq.add_lora); loading from a path or hub id is not routed")
        # dmq's: the quantized layers, and the originals that fused projections replaced (peft cannot wrap those)
        ours = {n for n, m in model.named_modules() if isinstance(m, QuantGemm)} | replaced_names(model)
        strip = (lambda k: k.removeprefix(f"{prefix}.")) if prefix else (lambda k: k)
        mine = {strip(k): v for k, v in sd.items()
                if (prefix is None or k.startswith(f"{prefix}.")) and _module_of(strip(k)) in ours}
        rest = {k: v for k, v in sd.items() if strip(k) not in mine}
        alphas = kwargs.get("network_alphas") or {}
        for key, alpha in alphas.items():
            module = _module_of(strip(key).removesuffix(".alpha") + ".lora_A.weight")
            if module in ours:
                mine[f"{module}.alpha"] = torch.as_tensor(alpha)
        if mine:
            add_lora_to_model(model, mine, 1.0, kwargs.get("adapter_name") or "default")
        if any(k.startswith(f"{prefix}.") if prefix else True for k in rest):
            return original(rest, prefix=prefix, hotswap=hotswap, **kwargs)
        return None

    load_lora_adapter._dmq_routed = True
    model.load_lora_adapter = load_lora_adapter

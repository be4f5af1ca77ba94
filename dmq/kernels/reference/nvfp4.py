"""References for NVFP4 (fp4 e2m1 codes in groups of 16, fp8 e4m3 group scales, fp32 per-tensor scale)."""

from __future__ import annotations

import torch

from dmq.formats import fp4_encode, pack_nibbles
from dmq.kernels.reference.quant_act import smoothed
from dmq.kernels.reference.weight_only import dequantize_weight

__all__ = ["nvfp4_amax", "nvfp4_quantize", "nvfp4_linear"]

def nvfp4_amax(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """``max |x · (1 / smooth)|`` as an fp32 scalar tensor, with one read of x: multiplying by a positive number is
    monotonic, so ``max_k (max_m |x_mk|) · (1 / s_k)`` equals the elementwise maximum bit for bit."""
    col = x.abs().amax(dim=0).to(torch.float32)
    if smooth is not None:
        col = col * torch.reciprocal(smooth.to(torch.float32))
    return col.amax() if col.numel() else torch.zeros((), dtype=torch.float32, device=x.device)


def nvfp4_quantize(x: torch.Tensor, smooth: torch.Tensor | None,
                   amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the rows of ``x · (1 / smooth)`` to nvfp4 with the per-tensor range ``amax`` (fp32 scalar).

    Returns codes uint8 ``(M, Kp/2)`` (pairs, as :func:`dmq.formats.pack_nibbles`), scales float8 e4m3
    ``(M, Kp/16)`` and the fp32 global scale ``amax / 2688``: :func:`dmq.formats.quantize`'s recipe (codes from
    ``x · (1 / scale)``) with every division correctly rounded: identical to it on every device.
    """
    m, k = x.shape
    xs = smoothed(x, smooth)
    kp = -(-k // 16) * 16
    xb = torch.nn.functional.pad(xs, (0, kp - k)).reshape(m, kp // 16, 16)
    g = amax.to(torch.float32).reshape(()) / torch.full((), 2688.0, device=x.device)
    g_safe = torch.where(g > 0, g, torch.ones_like(g))
    bmax = xb.abs().amax(dim=-1, keepdim=True)
    s8 = ((bmax / torch.full_like(bmax, 6.0)) / g_safe).clamp(max=448.0).to(torch.float8_e4m3fn)
    eff = s8.to(torch.float32) * g
    nib = fp4_encode(xb * torch.reciprocal(torch.where(eff > 0, eff, torch.ones_like(eff))))
    nib = torch.where(eff > 0, nib, torch.zeros_like(nib))
    return pack_nibbles(nib.reshape(m, kp)).contiguous(), s8.reshape(m, -1).contiguous(), g


def nvfp4_linear(x: torch.Tensor, smooth: torch.Tensor | None, proj_down: torch.Tensor | None,
                 proj_up: torch.Tensor | None, w: torch.Tensor, w_scales: torch.Tensor, w_scale2: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """``y = Q(x/smooth) · Q(W)ᵀ + (x/smooth) · proj_down · proj_up + bias`` with dynamic nvfp4 activations.

    w: fp4 codes uint8 ``(N, Kp/2)``; w_scales: fp8 e4m3 ``(N, Kp/16)``; w_scale2: fp32 scalar. The products of
    dequantized codes are summed in fp32 and scaled by both global scales at the end.
    """
    m, k = x.shape
    codes, scales, g = nvfp4_quantize(x, smooth, nvfp4_amax(x, smooth))
    a = dequantize_weight(codes, scales, "fp4", 16, k, torch.float32)
    wd = dequantize_weight(w, w_scales, "fp4", 16, k, torch.float32)
    y = (a @ wd.T) * (g * w_scale2.to(torch.float32))
    if proj_down is not None and proj_down.shape[1] > 0:
        xs = smoothed(x, smooth)
        lr = (xs.to(proj_down.dtype).to(torch.float32) @ proj_down.to(torch.float32)).to(x.dtype)
        y = y + lr.to(torch.float32) @ proj_up.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

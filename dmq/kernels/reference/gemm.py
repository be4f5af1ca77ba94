"""Reference: integer GEMM on quantized codes with scales, the low-rank up-projection and the bias in its epilogue."""

from __future__ import annotations

import math

import torch

from dmq.kernels.layouts import blocked_to_int8
from dmq.kernels.reference.im2col import im2col

__all__ = ["gemm_int", "conv_gemm_int", "conv_same_size", "weight_codes"]


def weight_codes(w: torch.Tensor, w_format: str, k: int) -> torch.Tensor:
    """int8 codes ``(N, k)`` of a weight in ``w_format`` (``"int8"`` or the blocked int4 ``"int4b"``)."""
    if w_format == "int8":
        return w[:, :k]
    if w_format == "int4b":
        return blocked_to_int8(w, k)
    raise ValueError(f"w_format must be 'int8' or 'int4b', got {w_format!r}")


def gemm_int(a: torch.Tensor, a_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, w_format: str,
             a_group: int, w_group: int, lowrank: torch.Tensor | None, proj_up: torch.Tensor | None,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``y = (Σ_k a·w · scales) + lowrank · proj_up + bias`` in ``out_dtype``.

    a: int8 codes ``(M, K)`` (int4 values held in int8). a_scales: fp32 ``(M,)`` when ``a_group == 0``, else
    ``(M, ceil(K / a_group))`` (fp16 or fp32). w: int8 ``(N, K)`` (``"int8"``) or blocked int4 uint8 ``(N, Kb / 2)``
    (``"int4b"``, see :mod:`dmq.kernels.layouts`). w_scales: ``(N,)`` when ``w_group == 0``, else
    ``(N, ceil(K / w_group))``. lowrank ``(M, R)`` and proj_up ``(R, N)``: 16-bit, or None. bias ``(N,)`` or None.

    Products are summed exactly per K-segment (the greatest common divisor of the group sizes), each segment's sum
    is scaled in fp32 by ``a_scale · w_scale`` and accumulated in K order; per-row / per-column scales multiply the
    fp32 total; then ``lowrank · proj_up`` (fp32 accumulation) and the bias are added.
    """
    m, k = a.shape
    wc = weight_codes(w, w_format, k).to(torch.float64)
    af = a.to(torch.float64)
    if a_group or w_group:
        seg = math.gcd(a_group or k, w_group or k)
        acc = torch.zeros((m, wc.shape[0]), dtype=torch.float32, device=a.device)
        for k0 in range(0, k, seg):
            p = (af[:, k0:k0 + seg] @ wc[:, k0:k0 + seg].T).to(torch.float32)
            s = torch.ones((), dtype=torch.float32, device=a.device)
            if a_group:
                s = s * a_scales[:, k0 // a_group].to(torch.float32)[:, None]
            if w_group:
                s = s * w_scales[:, k0 // w_group].to(torch.float32)[None, :]
            acc = acc + p * s
    else:
        acc = (af @ wc.T).to(torch.float32)
    if not a_group:
        acc = acc * a_scales.to(torch.float32)[:, None]
    if not w_group:
        acc = acc * w_scales.to(torch.float32)[None, :]
    if lowrank is not None and lowrank.shape[1] > 0:
        acc = acc + lowrank.to(torch.float32) @ proj_up.to(torch.float32)
    if bias is not None:
        acc = acc + bias.to(torch.float32)
    return acc.to(out_dtype)


def conv_same_size(kh: int, kw: int, ph: int, pw: int, dh: int, dw: int) -> bool:
    """Whether a stride-1 convolution with this geometry keeps the input's height and width (the case
    :func:`conv_gemm_int` serves)."""
    return 2 * ph == dh * (kh - 1) and 2 * pw == dw * (kw - 1)


def conv_gemm_int(codes: torch.Tensor, scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, kh: int,
                  kw: int, ph: int, pw: int, dh: int, dw: int, lowrank: torch.Tensor | None,
                  proj_up: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """A quantized stride-1 convolution whose output keeps the input's size, as one GEMM over its im2col.

    codes: int8 NHWC ``(B, H, W, Cp)``, Cp a multiple of 64; scales: fp32 ``(B, H, W)``, one per input pixel; w: int8
    ``(N, kh · kw · Cp)`` ordered (kh, kw, Cp); w_scales: fp32 ``(N,)``; lowrank ``(B·H·W, R)`` / proj_up ``(R, N)``
    16-bit or None; bias ``(N,)`` or None. Returns ``(B·H·W, N)`` in ``out_dtype``: :func:`gemm_int` of the im2col
    of the codes with the im2col of the scales as per-(pixel, tap) groups of Cp columns."""
    if not conv_same_size(kh, kw, ph, pw, dh, dw):
        raise ValueError(f"conv_gemm_int serves stride-1 convolutions that keep the input size; kernel {kh}x{kw}, "
                         f"padding ({ph}, {pw}), dilation ({dh}, {dw}) does not")
    cp = codes.shape[3]
    geometry = (kh, kw, 1, 1, ph, pw, dh, dw)
    return gemm_int(im2col(codes, *geometry), im2col(scales[..., None], *geometry), w, w_scales, "int8", cp, 0,
                    lowrank, proj_up, bias, out_dtype)

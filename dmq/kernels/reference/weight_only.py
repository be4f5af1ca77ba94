"""References: weight dequantization to 16-bit (or to int8 codes) and the weight-only linear (W4A16 / W8A16)."""

from __future__ import annotations

import torch

from dmq.formats import fp4_decode, unpack_nibbles
from dmq.kernels.reference.gemm import weight_codes

__all__ = ["dequantize_weight", "weight_only_linear", "WEIGHT_FORMATS"]

WEIGHT_FORMATS = ("int4b", "int8", "fp4")


def _values(w: torch.Tensor, w_scales: torch.Tensor, w_format: str, w_group: int, k: int,
            scaled: bool) -> torch.Tensor:
    if w_format not in WEIGHT_FORMATS:
        raise ValueError(f"w_format must be one of {WEIGHT_FORMATS}, got {w_format!r}")
    if w_format == "fp4":
        if w_group != 16:
            raise ValueError("fp4 (nvfp4) weights have groups of 16")
        vals = fp4_decode(unpack_nibbles(w))[:, :k]
    else:
        vals = weight_codes(w, w_format, k).to(torch.float32)
    if not scaled:
        return vals
    s = w_scales.to(torch.float32)
    if w_group:
        s = s.repeat_interleave(w_group, dim=1)[:, :k]
    else:
        s = s[:, None]
    return vals * s


def dequantize_weight(w: torch.Tensor, w_scales: torch.Tensor, w_format: str, w_group: int, k: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """``(N, k)`` weight in ``out_dtype``: ``code · scale`` rounded once (fp32 product), or the bare int8 codes when
    ``out_dtype`` is ``torch.int8`` (int formats only), or int8 ``code · sub`` for two-level int4 (uint8 integer
    group sub-scales, see :attr:`dmq.formats.QuantSpec.two_level`; out_dtype must then be int8).

    w_format: ``"int4b"`` (blocked int4, see :mod:`dmq.kernels.layouts`), ``"int8"`` or ``"fp4"`` (nvfp4 codes as
    stored, pairs per byte, with fp8 e4m3 group-16 scales; the fp32 per-tensor scale is *not* applied: codes times
    group scales are exact in bf16 and fp16). w_scales: ``(N,)`` when ``w_group == 0``, else ``(N, ≥ k / w_group)``.
    """
    if w_scales.dtype == torch.uint8 and w_format != "fp4":   # two-level int4: integer sub-scales
        if out_dtype != torch.int8 or w_format != "int4b" or not w_group:
            raise ValueError("integer (two-level) group sub-scales dequantize int4b weights to int8 code · sub only "
                             "(the per-channel second-level scale belongs to the GEMM)")
        return _values(w, w_scales, w_format, w_group, k, scaled=True).to(torch.int8)
    if out_dtype == torch.int8:
        if w_format == "fp4":
            raise ValueError("fp4 codes have no int8 form")
        return _values(w, w_scales, w_format, w_group, k, scaled=False).to(torch.int8)
    return _values(w, w_scales, w_format, w_group, k, scaled=True).to(out_dtype)


def weight_only_linear(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, w_format: str, w_group: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``y = x · (code · scale)ᵀ + bias`` for 16-bit ``x (M, K)``, in fp32 then x's dtype."""
    k = x.shape[1]
    wd = _values(w, w_scales, w_format, w_group, k, scaled=True)
    y = x.to(torch.float32) @ wd.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

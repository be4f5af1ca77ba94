"""The fp8 preset on Hopper: the Triton activation quantizer writes fp8 e4m3 codes and per-token scales, and
cuBLAS (``torch._scaled_mm``, row-wise scales, fp32 accumulation) does the GEMM. Reference:
:mod:`dmq.kernels.reference.fp8`."""

from __future__ import annotations

import torch

from dmq.kernels._common import FLOAT16, check
from dmq.kernels.triton.quant_act import quantize_act

__all__ = ["fp8_linear"]


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Same signature as the reference. K and N must be multiples of 16 (cuBLAS fp8)."""
    check(x.dim() == 2 and x.dtype in FLOAT16, "x must be 16-bit (M, K)")
    check(w.dtype == torch.float8_e4m3fn and w.dim() == 2, "w must be float8_e4m3fn (N, K)")
    m, k = x.shape
    n = w.shape[0]
    check(w.shape[1] == k and k % 16 == 0 and n % 16 == 0,
          f"torch._scaled_mm needs K and N multiples of 16, got K={k}, N={n}")
    codes, s, _ = quantize_act(x, None, None, "fp8_e4m3", 0, False)
    b16 = bias.to(torch.bfloat16) if bias is not None and x.dtype == torch.bfloat16 else None
    y = torch._scaled_mm(codes, w.t(), scale_a=s[:, None], scale_b=w_scales.to(torch.float32)[None, :],
                         bias=b16, out_dtype=torch.bfloat16)
    if x.dtype != torch.bfloat16:
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
    return y

"""im2col of an NHWC tensor (int8 codes, their scales): one program copies a block of output rows × a block of
channels of one kernel tap (contiguous runs of channels, so wide loads and stores), zeros for taps in the padding.
PyTorch's strided copy of the same int8 view moves one byte per thread step: at SDXL's 128² 320-channel conv it took
most of the quantized layer's time (benchmarks/conv_gemm.py). Reference: :mod:`dmq.kernels.reference.im2col`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmq.kernels._common import check, fixed_config, next_pow2
from dmq.kernels.reference.im2col import conv_out_hw

__all__ = ["im2col"]

_BM = 32     # output rows per program


@triton.jit
def _im2col_kernel(src_ptr, dst_ptr, M, H, W, C, HO, WO, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                   PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, TAPS: tl.constexpr,
                   BM: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    tap = tl.program_id(1)
    cc = tl.program_id(2) * BC + tl.arange(0, BC)
    b = rows // (HO * WO)
    rem = rows % (HO * WO)
    hi = (rem // WO) * SH - PH + (tap // KW) * DH
    wi = (rem % WO) * SW - PW + (tap % KW) * DW
    inside = (rows < M) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    src = ((b.to(tl.int64) * H + hi) * W + wi) * C
    x = tl.load(src_ptr + src[:, None] + cc[None, :], mask=inside[:, None] & (cc[None, :] < C), other=0)
    dst = rows.to(tl.int64) * (TAPS * C) + tap * C
    tl.store(dst_ptr + dst[:, None] + cc[None, :], x, mask=(rows[:, None] < M) & (cc[None, :] < C))


def im2col(t: torch.Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int) -> torch.Tensor:
    """Triton launcher; same signature and results (bit for bit) as :func:`dmq.kernels.reference.im2col.im2col`."""
    check(t.dim() == 4, lambda: f"t must be NHWC (B, H, W, C), got {tuple(t.shape)}")
    check(min(kh, kw, sh, sw, dh, dw) >= 1 and min(ph, pw) >= 0,
          lambda: f"bad conv geometry: kernel {kh}x{kw}, stride {sh}x{sw}, padding {ph}x{pw}, dilation {dh}x{dw}")
    t = t.contiguous()
    b, h, w, c = t.shape
    ho, wo = conv_out_hw(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    m = b * ho * wo
    out = torch.empty((m, kh * kw * c), dtype=t.dtype, device=t.device)
    if out.numel() == 0:
        return out
    bc = min(max(next_pow2(c), 16), 64 if fixed_config() else 512 // t.element_size())
    grid = (triton.cdiv(m, _BM), kh * kw, triton.cdiv(c, bc))
    _im2col_kernel[grid](t, out, m, h, w, c, ho, wo, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, TAPS=kh * kw,
                         BM=_BM, BC=bc, num_warps=4)
    return out

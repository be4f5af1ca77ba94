"""NVFP4 on Hopper (no fp4 tensor cores): a Triton kernel quantizes activations to nvfp4 bit-exactly; the GEMM
runs in bf16 on codes × group scales, which are exact in bf16 (≤ 2 significant bits × ≤ 4 ⇒ ≤ 6 ≤ 8), so only the
fp32 accumulation order and one bf16 rounding of the product before the global scales differ from the reference.
(An fp8 MMA would need the group-16 scales applied to the accumulator every 16 K, which is slower.)
Reference: :mod:`dmq.kernels.reference.nvfp4`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmq.kernels._common import FLOAT16, check, decode_e4m3, encode_e2m1, encode_e4m3, interpreting, rcp
from dmq.kernels.reference.nvfp4 import nvfp4_amax
from dmq.kernels.triton.quant_act import _load_xs
from dmq.kernels.triton.weight_only import dequantize_weight

__all__ = ["nvfp4_quantize", "nvfp4_linear"]


@triton.jit(do_not_specialize=["M"])
def _nvfp4_quant_kernel(x_ptr, sm_ptr, gs_ptr, c_ptr, s_ptr, M, K, KP, stride_xm, stride_cm, stride_sm,
                        HAS_SMOOTH: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    g = tl.load(gs_ptr)
    g_safe = tl.where(g > 0, g, 1.0)
    for k0 in range(0, KP, BG):
        rk = k0 + tl.arange(0, BG)
        xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, 1, HAS_SMOOTH, False, BM)
        x3 = tl.reshape(xs, (BM, BG // 16, 16))
        amax = tl.max(tl.abs(x3), axis=2)
        s_blk = tl.math.div_rn(tl.math.div_rn(amax, tl.zeros_like(amax) + 6.0), tl.zeros_like(amax) + g_safe)
        code8 = encode_e4m3(tl.minimum(s_blk, 448.0))
        rg = k0 // 16 + tl.arange(0, BG // 16)
        tl.store(s_ptr + rm[:, None] * stride_sm + rg[None, :], code8.to(tl.uint8),
                 mask=(rm[:, None] < M) & (rg[None, :] < KP // 16))
        eff = decode_e4m3(code8) * g
        y = x3 * rcp(tl.where(eff > 0, eff, 1.0))[:, :, None]
        nib = tl.where(eff[:, :, None] > 0, encode_e2m1(y), 0)
        lo, hi = tl.split(tl.reshape(nib, (BM, BG // 2, 2)))
        rb = k0 // 2 + tl.arange(0, BG // 2)
        tl.store(c_ptr + rm[:, None] * stride_cm + rb[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=(rm[:, None] < M) & (rb[None, :] < KP // 2))


def nvfp4_quantize(x: torch.Tensor, smooth: torch.Tensor | None,
                   amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher; same signature and bit-exact results as the reference."""
    check(x.dim() == 2 and x.dtype in FLOAT16 and x.stride(1) == 1, "x must be a K-contiguous 16-bit (M, K)")
    m, k = x.shape
    if smooth is not None:
        check(smooth.shape == (k,), f"smooth must be ({k},)")
        smooth = smooth.contiguous()
    kp = -(-k // 16) * 16
    gs = (amax.to(torch.float32).reshape(()) / torch.full((), 2688.0, device=x.device)).reshape(1)
    codes = torch.empty((m, kp // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, kp // 16), dtype=torch.uint8, device=x.device)
    if m:
        bm = 16
        _nvfp4_quant_kernel[(triton.cdiv(m, bm),)](
            x, smooth if smooth is not None else x, gs, codes, scales, m, k, kp, x.stride(0), codes.stride(0),
            scales.stride(0), HAS_SMOOTH=smooth is not None, BM=bm, BG=64, num_warps=4)
    return codes, scales.view(torch.float8_e4m3fn), gs.reshape(())


def nvfp4_linear(x: torch.Tensor, smooth: torch.Tensor | None, proj_down: torch.Tensor | None,
                 proj_up: torch.Tensor | None, w: torch.Tensor, w_scales: torch.Tensor, w_scale2: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """Kernel path of :func:`dmq.kernels.reference.nvfp4.nvfp4_linear`: Triton nvfp4 quantization, exact
    dequantization of both operands to bf16, a bf16 GEMM (fp32 accumulation), global scales, the low-rank branch
    and the bias in fp32. Tolerance vs the reference: one bf16 rounding of the GEMM output (≤ 2⁻⁸ relative)."""
    m, k = x.shape
    codes, scales, g = nvfp4_quantize(x, smooth, nvfp4_amax(x, smooth))
    # bf16 on the GPU (exact operands, no overflow); fp16 (equally exact) under the interpreter, whose in-kernel
    # bf16 casts are wrong
    dt = torch.float16 if interpreting() else torch.bfloat16
    a = dequantize_weight(codes, scales, "fp4", 16, k, dt)
    wd = dequantize_weight(w, w_scales, "fp4", 16, k, dt)
    y = (a @ wd.T if dt == torch.bfloat16 else a.float() @ wd.float().T).to(torch.float32)
    y = y * (g * w_scale2.to(torch.float32))
    if proj_down is not None and proj_down.shape[1] > 0:
        xs = x.to(torch.float32) / smooth.to(torch.float32) if smooth is not None else x.to(torch.float32)
        lr = (xs.to(proj_down.dtype) @ proj_down).to(x.dtype)
        y = y + (lr @ proj_up.to(lr.dtype)).to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)

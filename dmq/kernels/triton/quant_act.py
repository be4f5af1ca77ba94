"""Activation quantization fused with the low-rank down-projection: x is read once per pass (two passes per row
block for per-token scales, the second one from L2), divided by ``smooth``, quantized to int4 / int8 / fp8 codes,
and multiplied by ``proj_down`` (fp32 accumulation, 16-bit out). Reference: :mod:`dmq.kernels.reference.quant_act`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmq.formats import padded_channels
from dmq.kernels._common import (FLOAT16, bench_fn, check, encode_e4m3, fixed_config, m_bucket, next_pow2,
                                 rint_small)
from dmq.kernels.reference.quant_act import act_spec

__all__ = ["quantize_act"]

_TOKEN_CONFIGS = [triton.Config({"BM": bm, "BK": bk}, num_warps=4, num_stages=2)
                  for bm, bk in ((16, 256), (32, 128), (64, 64))]
_GROUP_CONFIGS = [triton.Config({"BM": bm}, num_warps=4, num_stages=2) for bm in (16, 32, 64)]
_KEY = ["M_BUCKET", "KP", "R", "GROUP", "IS_FP8", "PACK", "HAS_SMOOTH"]


@triton.jit
def _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(sm_ptr + rk, mask=rk < K, other=1.0).to(tl.float32)
        x = tl.math.div_rn(x, sm[None, :])
    return x


@triton.jit
def _lowrank_step(acc, xs, pd_ptr, rk, rr, K, R, stride_pk):
    pd = tl.load(pd_ptr + rk[:, None] * stride_pk + rr[None, :], mask=(rk[:, None] < K) & (rr[None, :] < R),
                 other=0.0)
    return tl.dot(xs.to(pd.dtype), pd, acc)


@triton.jit
def _store_codes(xs, s_div, c_ptr, rm, k0, M, KP, stride_cm, IS_FP8: tl.constexpr, QMAX: tl.constexpr,
                 PACK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    y = tl.math.div_rn(xs, s_div[:, None])
    if IS_FP8:
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        q = encode_e4m3(y)
    else:
        y = tl.minimum(tl.maximum(y, -QMAX - 1.0), QMAX)
        q = rint_small(y).to(tl.int32)
    if PACK:
        lo, hi = tl.split(tl.reshape(q, (BM, BK // 2, 2)))
        byte = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
        rk2 = k0 // 2 + tl.arange(0, BK // 2)
        tl.store(c_ptr + rm[:, None] * stride_cm + rk2[None, :], byte,
                 mask=(rm[:, None] < M) & (rk2[None, :] < KP // 2))
    else:
        rk = k0 + tl.arange(0, BK)
        if IS_FP8:
            out = q.to(tl.uint8)
        else:
            out = q.to(tl.int8)
        tl.store(c_ptr + rm[:, None] * stride_cm + rk[None, :], out, mask=(rm[:, None] < M) & (rk[None, :] < KP))


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _quant_act_kernel(x_ptr, sm_ptr, pd_ptr, c_ptr, s_ptr, lr_ptr,
                      M, K, KP, R, M_BUCKET, stride_xm, stride_cm, stride_sm, stride_pk, stride_lm,
                      HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr,
                      PACK: tl.constexpr, GROUP: tl.constexpr, BR: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    lr = tl.zeros((BM, BR), dtype=tl.float32)
    if GROUP == 0:
        amax = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, KP, BK):
            rk = k0 + tl.arange(0, BK)
            xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
            if HAS_LR:
                lr = _lowrank_step(lr, xs, pd_ptr, rk, rr, K, R, stride_pk)
        s = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX)
        tl.store(s_ptr + rm * stride_sm, s, mask=rm < M)
        s_div = tl.where(s > 0, s, 1.0)
        for k0 in range(0, KP, BK):
            rk = k0 + tl.arange(0, BK)
            xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
            _store_codes(xs, s_div, c_ptr, rm, k0, M, KP, stride_cm, IS_FP8, QMAX, PACK, BM, BK)
    else:
        for k0 in range(0, KP, GROUP):
            rk = k0 + tl.arange(0, GROUP)
            xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
            amax = tl.max(tl.abs(xs), axis=1)
            s16 = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX).to(tl.float16)
            tl.store(s_ptr + rm * stride_sm + k0 // GROUP, s16, mask=rm < M)
            s = s16.to(tl.float32)
            s_div = tl.where(s > 0, s, 1.0)
            _store_codes(xs, s_div, c_ptr, rm, k0, M, KP, stride_cm, IS_FP8, QMAX, PACK, BM, GROUP)
            if HAS_LR:
                lr = _lowrank_step(lr, xs, pd_ptr, rk, rr, K, R, stride_pk)
    if HAS_LR:
        tl.store(lr_ptr + rm[:, None] * stride_lm + rr[None, :], lr.to(lr_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rr[None, :] < R))


_token_tuned = triton.autotune(_TOKEN_CONFIGS, key=_KEY, do_bench=bench_fn)(_quant_act_kernel)
_group_tuned = triton.autotune(_GROUP_CONFIGS, key=_KEY, do_bench=bench_fn)(_quant_act_kernel)


def quantize_act(x: torch.Tensor, smooth: torch.Tensor | None, proj_down: torch.Tensor | None, qdtype: str,
                 group_size: int, pack: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher; same signature and results as :func:`dmq.kernels.reference.quant_act.quantize_act`
    (codes and scales bit-exact, lowrank within fp32-accumulation rounding)."""
    spec = act_spec(qdtype, group_size)
    check(x.dim() == 2, f"x must be (M, K), got {tuple(x.shape)}")
    check(x.dtype in FLOAT16, f"x must be float16 or bfloat16, got {x.dtype}")
    check(x.stride(-1) == 1, "x must be contiguous along K")
    check(pack is False or qdtype == "int4", "pack=True is only meaningful for int4 codes")
    m, k = x.shape
    if smooth is not None:
        check(smooth.shape == (k,), f"smooth must be ({k},), got {tuple(smooth.shape)}")
        smooth = smooth.contiguous()
    r = 0
    if proj_down is not None:
        check(proj_down.dim() == 2 and proj_down.shape[0] == k, f"proj_down must be ({k}, R), got "
                                                                f"{tuple(proj_down.shape)}")
        check(proj_down.dtype in FLOAT16, f"proj_down must be 16-bit, got {proj_down.dtype}")
        r = proj_down.shape[1]
        check(r <= 256, f"low-rank branch rank must be ≤ 256 for the fused kernel, got {r}")
        proj_down = proj_down if proj_down.stride(1) == 1 else proj_down.contiguous()
    kp = padded_channels(spec, k)
    dev = x.device
    if qdtype == "fp8_e4m3":
        codes = torch.empty((m, kp), dtype=torch.uint8, device=dev)
    elif pack:
        codes = torch.empty((m, kp // 2), dtype=torch.uint8, device=dev)
    else:
        codes = torch.empty((m, kp), dtype=torch.int8, device=dev)
    if group_size:
        scales = torch.empty((m, kp // group_size), dtype=torch.float16, device=dev)
    else:
        scales = torch.empty((m,), dtype=torch.float32, device=dev)
    lowrank = torch.empty((m, r), dtype=x.dtype, device=dev)
    if m > 0:
        br = max(16, next_pow2(r))
        qmax = float(spec.qtype.qmax)
        args = (x, smooth if smooth is not None else x, proj_down if proj_down is not None else x, codes, scales,
                lowrank, m, k, kp, r, m_bucket(m), x.stride(0), codes.stride(0),
                scales.stride(0), proj_down.stride(0) if proj_down is not None else 0, lowrank.stride(0))
        meta = dict(HAS_SMOOTH=smooth is not None, HAS_LR=r > 0, IS_FP8=qdtype == "fp8_e4m3", QMAX=qmax,
                    PACK=bool(pack), GROUP=int(group_size), BR=br)
        if fixed_config():
            bm = 16
            _quant_act_kernel[(triton.cdiv(m, bm),)](*args, **meta, BM=bm, BK=group_size or 32)
        elif group_size:
            _group_tuned[lambda c: (triton.cdiv(m, c["BM"]),)](*args, **meta, BK=group_size)
        else:
            _token_tuned[lambda c: (triton.cdiv(m, c["BM"]),)](*args, **meta)
    if qdtype == "fp8_e4m3":
        codes = codes.view(torch.float8_e4m3fn)
    return codes, scales, lowrank

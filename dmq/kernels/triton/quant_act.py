"""Activation quantization fused with the low-rank down-projection: x is divided by ``smooth``, quantized to int4 /
int8 / fp8 codes and multiplied by ``proj_down`` (fp32 accumulation, 16-bit out).

The grid is 2-D, (row blocks) × (K chunks), so that a few thousand tokens still fill the GPU: each program owns a
``BM × KCH`` tile; its low-rank partial product is added atomically into an fp32 ``(M, R)`` buffer (then rounded
to x's dtype). Per-group scales need nothing else; per-token scales take two launches (partial row maxima, then
quantization). Reference: :mod:`dmq.kernels.reference.quant_act`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmq.formats import padded_channels
from dmq.kernels._common import FLOAT16, check, encode_e4m3, fixed_config, next_pow2, rint_small
from dmq.kernels.reference.quant_act import act_spec

__all__ = ["quantize_act"]

_BM = 32                 # rows per program
_TOKEN_BK = 128          # K step of the per-token kernels
_TARGET_PROGRAMS = 1024  # enough programs for 132 SMs several times over


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
def _flush_lowrank(lr, lr_ptr, rm, rr, M, R, stride_lm, ATOMIC: tl.constexpr):
    ptrs = lr_ptr + rm[:, None] * stride_lm + rr[None, :]
    mask = (rm[:, None] < M) & (rr[None, :] < R)
    if ATOMIC:
        tl.atomic_add(ptrs, lr, mask=mask)
    else:
        tl.store(ptrs, lr.to(lr_ptr.dtype.element_ty), mask=mask)


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


@triton.jit(do_not_specialize=["M"])
def _group_kernel(x_ptr, sm_ptr, pd_ptr, c_ptr, s_ptr, lr_ptr, M, K, KP, R, KCH,
                  stride_xm, stride_cm, stride_sm, stride_pk, stride_lm,
                  HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, ATOMIC: tl.constexpr, QMAX: tl.constexpr,
                  PACK: tl.constexpr, GROUP: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    """Per-group scales (fp16, as stored by dmq.formats): one pass over a BM × KCH tile."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k_start = tl.program_id(1) * KCH
    rr = tl.arange(0, BR)
    lr = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + KCH, KP), GROUP):
        rk = k0 + tl.arange(0, GROUP)
        xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
        amax = tl.max(tl.abs(xs), axis=1)
        s16 = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX).to(tl.float16)
        tl.store(s_ptr + rm * stride_sm + k0 // GROUP, s16, mask=rm < M)
        s = s16.to(tl.float32)
        _store_codes(xs, tl.where(s > 0, s, 1.0), c_ptr, rm, k0, M, KP, stride_cm, False, QMAX, PACK, BM, GROUP)
        if HAS_LR:
            lr = _lowrank_step(lr, xs, pd_ptr, rk, rr, K, R, stride_pk)
    if HAS_LR:
        _flush_lowrank(lr, lr_ptr, rm, rr, M, R, stride_lm, ATOMIC)


@triton.jit(do_not_specialize=["M"])
def _token_amax_kernel(x_ptr, sm_ptr, pd_ptr, part_ptr, lr_ptr, M, K, KP, R, KCH,
                       stride_xm, stride_pm, stride_pk, stride_lm,
                       HAS_SMOOTH: tl.constexpr, HAS_LR: tl.constexpr, ATOMIC: tl.constexpr, BR: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr):
    """Per-token pass 1: the row maxima of a BM × KCH tile (to ``part[:, chunk]``) and its low-rank product."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    pid_k = tl.program_id(1)
    k_start = pid_k * KCH
    rr = tl.arange(0, BR)
    lr = tl.zeros((BM, BR), dtype=tl.float32)
    amax = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + KCH, KP), BK):
        rk = k0 + tl.arange(0, BK)
        xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
        if HAS_LR:
            lr = _lowrank_step(lr, xs, pd_ptr, rk, rr, K, R, stride_pk)
    tl.store(part_ptr + rm * stride_pm + pid_k, amax, mask=rm < M)
    if HAS_LR:
        _flush_lowrank(lr, lr_ptr, rm, rr, M, R, stride_lm, ATOMIC)


@triton.jit(do_not_specialize=["M"])
def _token_quant_kernel(x_ptr, sm_ptr, part_ptr, c_ptr, s_ptr, M, K, KP, KCH, NSPLIT,
                        stride_xm, stride_pm, stride_cm,
                        HAS_SMOOTH: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr, PACK: tl.constexpr,
                        NSP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Per-token pass 2: scale = max of the partial maxima / qmax (fp32), codes of a BM × KCH tile."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    pid_k = tl.program_id(1)
    rp = tl.arange(0, NSP)
    part = tl.load(part_ptr + rm[:, None] * stride_pm + rp[None, :], mask=(rm[:, None] < M) & (rp[None, :] < NSPLIT),
                   other=0.0)
    amax = tl.max(part, axis=1)
    s = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX)
    tl.store(s_ptr + rm, s, mask=(rm < M) & ((rm * 0 + pid_k) == 0))
    s_div = tl.where(s > 0, s, 1.0)
    k_start = pid_k * KCH
    for k0 in range(k_start, tl.minimum(k_start + KCH, KP), BK):
        rk = k0 + tl.arange(0, BK)
        xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
        _store_codes(xs, s_div, c_ptr, rm, k0, M, KP, stride_cm, IS_FP8, QMAX, PACK, BM, BK)


def _split(m: int, kp: int, step: int, bm: int) -> tuple[int, int]:
    """(number of K chunks, chunk length): enough programs to fill the GPU, chunks a multiple of ``step``."""
    steps = -(-kp // step)
    if fixed_config():
        nsplit = min(steps, 2)       # exercise the split (atomics, partial maxima) in the CPU tests
    else:
        nsplit = max(1, min(steps, -(-_TARGET_PROGRAMS // -(-m // bm))))
    per = -(-steps // nsplit)
    return -(-steps // per), per * step


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
    if m == 0:
        return codes.view(torch.float8_e4m3fn) if qdtype == "fp8_e4m3" else codes, scales, lowrank
    bm = _BM if m > 16 else 16
    step = group_size or _TOKEN_BK
    nsplit, kch = _split(m, kp, step, bm)
    atomic = r > 0 and nsplit > 1
    lr_buf = torch.zeros((m, r), dtype=torch.float32, device=dev) if atomic else lowrank
    br = max(16, next_pow2(r))
    qmax = float(spec.qtype.qmax)
    sm_arg = smooth if smooth is not None else x
    pd_arg = proj_down if proj_down is not None else x
    pd_stride = proj_down.stride(0) if proj_down is not None else 0
    grid = (triton.cdiv(m, bm), nsplit)
    if group_size:
        _group_kernel[grid](x, sm_arg, pd_arg, codes, scales, lr_buf, m, k, kp, r, kch,
                            x.stride(0), codes.stride(0), scales.stride(0), pd_stride, lr_buf.stride(0),
                            HAS_SMOOTH=smooth is not None, HAS_LR=r > 0, ATOMIC=atomic, QMAX=qmax, PACK=bool(pack),
                            GROUP=int(group_size), BR=br, BM=bm, num_warps=4)
    else:
        part = torch.empty((m, nsplit), dtype=torch.float32, device=dev)
        _token_amax_kernel[grid](x, sm_arg, pd_arg, part, lr_buf, m, k, kp, r, kch,
                                 x.stride(0), part.stride(0), pd_stride, lr_buf.stride(0),
                                 HAS_SMOOTH=smooth is not None, HAS_LR=r > 0, ATOMIC=atomic, BR=br, BM=bm,
                                 BK=_TOKEN_BK, num_warps=4)
        _token_quant_kernel[grid](x, sm_arg, part, codes, scales, m, k, kp, kch, nsplit,
                                  x.stride(0), part.stride(0), codes.stride(0),
                                  HAS_SMOOTH=smooth is not None, IS_FP8=qdtype == "fp8_e4m3", QMAX=qmax,
                                  PACK=bool(pack), NSP=max(2, next_pow2(nsplit)), BM=bm, BK=_TOKEN_BK, num_warps=4)
    if atomic:
        lowrank = lr_buf.to(x.dtype)
    if qdtype == "fp8_e4m3":
        codes = codes.view(torch.float8_e4m3fn)
    return codes, scales, lowrank

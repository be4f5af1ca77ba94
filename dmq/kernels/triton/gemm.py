"""Integer GEMM (int8 tensor cores) on int8 activation codes and int8 or blocked-int4 weight codes, with per-row /
per-column scales in the epilogue or per-group scales in the K loop, and ``lowrank · proj_up + bias`` fused into
the epilogue. Serves w8a8, w4a8 and w4a4 (int4 values are held in int8 on the activation side: Hopper has no int4
MMA, and the activation bytes are a few per cent of the GEMM's time). Reference: :mod:`dmq.kernels.reference.gemm`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dmq.kernels._common import FLOAT16, bench_fn, capability, check, fixed_config, interpreting, m_bucket, next_pow2
from dmq.kernels.layouts import blocked_kb
from dmq.kernels.reference.gemm import conv_same_size as _ref_conv_same_size

__all__ = ["gemm_int", "conv_gemm_int", "tma_ok"]


def _cfg(bm, bn, bkh, warps, stages):
    return triton.Config({"BM": bm, "BN": bn, "BKH": bkh, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# int8 weights: K step 2 * BKH (two K-halves per iteration; BKH=128 only where the group sizes allow it)
# (the non-TMA kernel serves every int8 GEMM of an A100; compiled for sm_80 on a CPU, `python
# benchmarks/aot_report.py --arch 8.0`, 128 x 128 with 4 warps spilled here, and with group scales in the K loop
# every earlier config spilled, 128 x 256, 256 x 128 and 128 x 128 by 4-5 KB per thread: these do not, on sm_80 or
# sm_90)
_INT8_CONFIGS = [_cfg(128, 256, 64, 8, 4), _cfg(128, 256, 128, 8, 2), _cfg(128, 128, 128, 8, 3),
                 _cfg(256, 128, 64, 8, 4)]
_INT8_CONFIGS_64 = [_cfg(64, 256, 64, 8, 3), _cfg(128, 64, 64, 8, 4), _cfg(64, 128, 64, 8, 4), _cfg(64, 64, 64, 4, 4)]
# blocked int4 weights: the K-half is fixed by the layout (64 codes)
_INT4_CONFIGS = [_cfg(128, 128, 64, 4, 4), _cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3),
                 _cfg(64, 128, 64, 4, 4)]
# swapped operands (the weight tile is the MMA's M side): BN plays the role of the MMA's M
_INT4_SWAP_CONFIGS = [_cfg(128, 128, 64, 4, 4), _cfg(256, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3),
                      _cfg(128, 64, 64, 4, 4)]
# with group scales in the K loop the swapped kernel holds three (BN, BM) accumulators: the tiles above spill
# registers on sm_90 (`python benchmarks/aot_report.py`, compiled for Hopper on a CPU; 400-1,600 bytes of stack per
# thread), these do not; the last three do not on sm_80 either (the first two spill 72-80 bytes there)
_INT4_SWAP_GROUP_CONFIGS = [_cfg(256, 64, 64, 8, 3), _cfg(128, 64, 64, 4, 4), _cfg(128, 64, 64, 8, 4),
                            _cfg(64, 128, 64, 8, 4), _cfg(64, 64, 64, 4, 4)]
# Default operand order for blocked-int4 weights. The swapped order (weight tile as the MMA's first operand) was
# faster at every shape measured on the H100 (benchmarks/results/kernels-h100.json: w4a8 g128 0.58x vs 0.47x bf16,
# w4a4 g64 0.38x vs 0.28x, w4a4 per-channel 0.69x vs 0.63x at 4096x3072x9216).
INT4_SWAP = True

_KEY = ["M_BUCKET", "N", "K", "R", "GA", "GW", "W_INT4", "HAS_BIAS", "SWAP"]


@triton.jit
def _epilogue(acc, rm, rn, om, on, M, N, as_ptr, ws_ptr, lr_ptr, up_ptr, b_ptr, o_ptr, R, stride_asm, stride_wsn,
              stride_lm, stride_ur, stride_om, A_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_LR: tl.constexpr,
              HAS_BIAS: tl.constexpr, BR: tl.constexpr):
    """Per-row / per-column scales (when not grouped), ``+ lowrank · proj_up`` (one small dot), bias, 16-bit store."""
    out = acc.to(tl.float32)
    if not A_GROUP:
        out = out * tl.load(as_ptr + rm * stride_asm).to(tl.float32)[:, None]
    if not W_GROUP:
        out = out * tl.load(ws_ptr + rn * stride_wsn).to(tl.float32)[None, :]
    if HAS_LR:
        rr = tl.arange(0, BR)
        lr = tl.load(lr_ptr + rm[:, None] * stride_lm + rr[None, :], mask=rr[None, :] < R, other=0.0)
        up = tl.load(up_ptr + rr[:, None] * stride_ur + rn[None, :], mask=rr[:, None] < R, other=0.0)
        out = tl.dot(lr, up, out)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    tl.store(o_ptr + om[:, None] * stride_om + on[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(om[:, None] < M) & (on[None, :] < N))


@triton.jit
def _tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile ``(pid_m, pid_n)``: :func:`_tile_of` its program id."""
    return _tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)


@triton.jit
def _tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile number ``pid`` as ``(pid_m, pid_n)`` in grouped order (GROUP_M row tiles share a column sweep,
    for L2 reuse)."""
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, lr_ptr, up_ptr, b_ptr, o_ptr,
                 M, N, K, KW, R, M_BUCKET, GA, GW,
                 stride_am, stride_asm, stride_wn, stride_wsn, stride_lm, stride_ur, stride_om,
                 W_INT4: tl.constexpr, A_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_LR: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, PAIR: tl.constexpr, SWAP: tl.constexpr, BR: tl.constexpr,
                 EVEN_K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    rm = om % M                      # wrapped rows/cols: loads need no M/N mask, stores are masked
    rn = on % N
    rk = tl.arange(0, BKH)
    a_rows = a_ptr + rm[:, None] * stride_am
    w_rows = w_ptr + rn[:, None] * stride_wn

    if SWAP:
        if GROUPED:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BN, BM), dtype=tl.int32)
    else:
        if GROUPED:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, 2 * BKH):
        k_lo = k0 + rk
        k_hi = k0 + BKH + rk
        if EVEN_K:
            a_lo = tl.load(a_rows + k_lo[None, :])
            a_hi = tl.load(a_rows + k_hi[None, :])
        else:
            a_lo = tl.load(a_rows + k_lo[None, :], mask=k_lo[None, :] < K, other=0)
            a_hi = tl.load(a_rows + k_hi[None, :], mask=k_hi[None, :] < K, other=0)
        if W_INT4:
            p = tl.load(w_rows + (k0 // 2 + rk)[None, :]).to(tl.int8, bitcast=True)
            w_lo = (p << 4) >> 4
            w_hi = p >> 4
        else:
            if EVEN_K:
                w_lo = tl.load(w_rows + k_lo[None, :])
                w_hi = tl.load(w_rows + k_hi[None, :])
            else:
                w_lo = tl.load(w_rows + k_lo[None, :], mask=k_lo[None, :] < KW, other=0)
                w_hi = tl.load(w_rows + k_hi[None, :], mask=k_hi[None, :] < KW, other=0)
        if GROUPED and PAIR:   # both K-halves lie in the same groups: one int32 sum, one rescale
            if SWAP:
                c = (tl.dot(w_lo, tl.trans(a_lo)) + tl.dot(w_hi, tl.trans(a_hi))).to(tl.float32)
            else:
                c = (tl.dot(a_lo, tl.trans(w_lo)) + tl.dot(a_hi, tl.trans(w_hi))).to(tl.float32)
            if A_GROUP:
                sa = tl.load(as_ptr + rm * stride_asm + k0 // GA).to(tl.float32)
                if SWAP:
                    c = c * sa[None, :]
                else:
                    c = c * sa[:, None]
            if W_GROUP:
                sw = tl.load(ws_ptr + rn * stride_wsn + k0 // GW).to(tl.float32)
                if SWAP:
                    c = c * sw[:, None]
                else:
                    c = c * sw[None, :]
            acc += c
        elif GROUPED:
            if SWAP:   # weight tile is the MMA's A operand (may stay in registers), activations the B operand
                c_lo = tl.dot(w_lo, tl.trans(a_lo)).to(tl.float32)
                c_hi = tl.dot(w_hi, tl.trans(a_hi)).to(tl.float32)
            else:
                c_lo = tl.dot(a_lo, tl.trans(w_lo)).to(tl.float32)
                c_hi = tl.dot(a_hi, tl.trans(w_hi)).to(tl.float32)
            if A_GROUP:
                sa_lo = tl.load(as_ptr + rm * stride_asm + k0 // GA).to(tl.float32)
                sa_hi = tl.load(as_ptr + rm * stride_asm + (k0 + BKH) // GA, mask=(rm * 0 + (k0 + BKH)) < K,
                                other=0.0).to(tl.float32)
                if SWAP:
                    c_lo = c_lo * sa_lo[None, :]
                    c_hi = c_hi * sa_hi[None, :]
                else:
                    c_lo = c_lo * sa_lo[:, None]
                    c_hi = c_hi * sa_hi[:, None]
            if W_GROUP:
                sw_lo = tl.load(ws_ptr + rn * stride_wsn + k0 // GW).to(tl.float32)
                sw_hi = tl.load(ws_ptr + rn * stride_wsn + (k0 + BKH) // GW, mask=(rn * 0 + (k0 + BKH)) < K,
                                other=0.0).to(tl.float32)
                if SWAP:
                    c_lo = c_lo * sw_lo[:, None]
                    c_hi = c_hi * sw_hi[:, None]
                else:
                    c_lo = c_lo * sw_lo[None, :]
                    c_hi = c_hi * sw_hi[None, :]
            acc += c_lo + c_hi
        else:
            # (an int32 accumulator passed as tl.dot's acc does not compile on Triton 3.6; the add is folded
            # into the MMA by Triton's combine pass)
            if SWAP:
                acc += tl.dot(w_lo, tl.trans(a_lo))
                acc += tl.dot(w_hi, tl.trans(a_hi))
            else:
                acc += tl.dot(a_lo, tl.trans(w_lo))
                acc += tl.dot(a_hi, tl.trans(w_hi))

    if SWAP:
        acc = tl.trans(acc)
    _epilogue(acc, rm, rn, om, on, M, N, as_ptr, ws_ptr, lr_ptr, up_ptr, b_ptr, o_ptr, R, stride_asm, stride_wsn,
              stride_lm, stride_ur, stride_om, A_GROUP, W_GROUP, HAS_LR, HAS_BIAS, BR)


def _tma_cfg(bm, bn, bk, warps, stages, per_sm=None):
    """A TMA GEMM config; ``per_sm``: the persistent kernel's programs per SM (its launch grid)."""
    def hook(nargs):   # host-side descriptors carry the tile shape: set it to this config's
        nargs["a_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk]
    extra = {} if per_sm is None else {"PER_SM": per_sm}
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, **extra}, num_warps=warps,
                         num_stages=stages, pre_hook=hook)


# int8 weights through TMA (Hopper): measured on the H100 (benchmarks/scratch runs of issue 7), 128x256x128 with 4
# stages was best at FLUX shapes (1.44-1.59x bf16 without the epilogue), 128x128x64 with 5 stages at small N/K.
# 64-row tiles for layers whose 128x128 tiles fill the GPU only ~1.2 times (SDXL's 2048 x 1280 x 1280: 160 tiles
# on 132 SMs).
_TMA_CONFIGS = [_tma_cfg(128, 256, 128, 8, 4), _tma_cfg(256, 128, 128, 8, 3), _tma_cfg(128, 256, 128, 8, 3),
                _tma_cfg(128, 128, 64, 4, 5), _tma_cfg(128, 128, 128, 4, 4), _tma_cfg(64, 128, 128, 4, 4)]
# grouped scales: one K step per group (BK = 64 divides every supported group size). Tiles of 128 x 256 and
# 256 x 128 with 8 warps, and 128 x 128 with 4, spill registers on sm_90 here (`python benchmarks/aot_report.py`):
# a fp32 accumulator beside the int32 run sum (RUNS, convolutions) or the per-step products needs 2 x BM x BN
# registers per program; these tiles fit.
_TMA_CONFIGS_64 = [_tma_cfg(128, 128, 64, 8, 4), _tma_cfg(64, 256, 64, 8, 4), _tma_cfg(128, 64, 64, 4, 6),
                   _tma_cfg(64, 128, 64, 4, 6)]
_TMA_KEY = ["M_BUCKET", "N", "K", "R", "GA", "GW", "HAS_BIAS", "RUNS", "CONV_KW"]
# Per-row × per-column scaled TMA GEMMs (w8a8, the two-level and per-channel W4A4 layers) as a persistent kernel
# (:func:`_gemm_tma_persistent_kernel`). Off until measured on a GPU (benchmarks/kernel_bench.py's ``-persistent``
# rows, benchmarks/e2e.py's ``-persistent`` suffix); bit-exact against the one-tile-per-program kernel in the CPU
# tests and compiled for sm_90 by benchmarks/aot_report.py.
PERSISTENT = False
_SMS: dict[int, int] = {}
# its configs: the one-tile-per-program kernel's, one program per SM, and the two of them that fit twice on an sm_90
# SM (registers and shared memory, `python benchmarks/aot_report.py`: 128x128x64 with 5 stages, 98 KB; 64x128x128
# with 4, 110 KB) also with two, so that one program's epilogue overlaps the other's main loop
_PERSISTENT_CONFIGS = [_tma_cfg(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_warps, c.num_stages, 1)
                       for c in _TMA_CONFIGS] + [_tma_cfg(128, 128, 64, 4, 5, 2), _tma_cfg(64, 128, 128, 4, 4, 2)]
# How group scales are applied when a run of K steps shares every scale (gcd of the group sizes > BK, e.g. a
# convolution's per-(pixel, tap) activation scales over Cin channels): 0 = per K step; 1 = int32 accumulation over
# the run and one rescale at its end. On the H200 at SDXL's 128² 320-channel conv (32768 x 2880 x 320): 0.106 ms
# against 0.134 per K step and 0.118 with the run as a nested loop, 0.075 with per-row scales
# (benchmarks/conv_gemm.py).
GROUP_RUNS = 1


@triton.jit
def _group_scaled(part, k0, rm, rn, as_ptr, ws_ptr, GA, GW, stride_asm, stride_wsn, A_GROUP: tl.constexpr,
                  W_GROUP: tl.constexpr):
    """An int32 partial product over K columns in the groups of column ``k0``, in fp32 times their scales."""
    c = part.to(tl.float32)
    if A_GROUP:
        c = c * tl.load(as_ptr + rm * stride_asm + k0 // GA).to(tl.float32)[:, None]
    if W_GROUP:
        c = c * tl.load(ws_ptr + rn * stride_wsn + k0 // GW).to(tl.float32)[None, :]
    return c


@triton.jit
def _conv_tap(k0, CP, CONV_KW: tl.constexpr, CW, PH, PW, DH, DW):
    """Implicit-GEMM convolution (stride 1, output grid = input grid): K column ``k0`` lies in tap ``(dy, dx)`` at
    channel ``c0``; the tap reads input pixel ``p + sy·W + sx`` for output pixel ``p``. Returns (that row shift,
    c0, sy, sx)."""
    t = k0 // CP
    dy = t // CONV_KW
    sy = dy * DH - PH
    sx = (t - dy * CONV_KW) * DW - PW
    return sy * CW + sx, k0 - t * CP, sy, sx


@triton.jit
def _tap_scales(part, rm, sy, sx, as_ptr, CH, CW):
    """An int32 partial product over one tap's channels times its rows' input-pixel scales: zero where the tap
    falls outside the image (padding, or the next row / image that the shifted row window reached)."""
    ow = rm % CW
    oh = (rm // CW) % CH
    valid = (oh + sy >= 0) & (oh + sy < CH) & (ow + sx >= 0) & (ow + sx < CW)
    s = tl.load(as_ptr + rm + sy * CW + sx, mask=valid, other=0.0)
    return part.to(tl.float32) * s[:, None]


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _gemm_tma_kernel(a_desc, as_ptr, w_desc, ws_ptr, lr_ptr, up_ptr, b_ptr, o_ptr,
                     M, N, K, R, M_BUCKET, GA, GW, GRUN, stride_asm, stride_wsn, stride_lm, stride_ur, stride_om,
                     CH, CW, CP, PH, PW, DH, DW,
                     A_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                     RUNS: tl.constexpr, CONV_KW: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """int8 × int8 GEMM with both operands loaded by the tensor-memory accelerator (host-side descriptors; out of
    bounds reads are zeros, so no masks and no K tail). Group scales (multiples of BK): per K step (RUNS = 0), or
    once per run of GRUN K columns that share them, after an int32 accumulation over the run (RUNS = 1).
    CONV_KW > 0: an implicit-GEMM convolution of CONV_KW-wide taps over the NHWC codes ``a (B·CH·CW, CP)`` (one
    descriptor row per pixel, shifted per tap, see :func:`_conv_tap`), per-pixel scales ``as (B·CH·CW,)`` gathered
    per tap (runs of GRUN = CP columns)."""
    pid_m, pid_n = _tile(M, N, BM, BN, GROUP_M)
    om = pid_m * BM + tl.arange(0, BM)
    on = pid_n * BN + tl.arange(0, BN)
    rm = om % M                      # wrapped rows/cols: loads need no M/N mask, stores are masked
    rn = on % N
    if A_GROUP or W_GROUP:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    if RUNS:
        part = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        if CONV_KW:
            shift, c0, sy, sx = _conv_tap(k0, CP, CONV_KW, CW, PH, PW, DH, DW)
            a = a_desc.load([pid_m * BM + shift, c0])
        else:
            a = a_desc.load([pid_m * BM, k0])
        w = w_desc.load([pid_n * BN, k0])
        if RUNS:
            part += tl.dot(a, w.T)
            if ((k0 + BK) % GRUN == 0) | (k0 + BK >= K):
                if CONV_KW:
                    acc += _tap_scales(part, rm, sy, sx, as_ptr, CH, CW)
                else:
                    acc += _group_scaled(part, k0, rm, rn, as_ptr, ws_ptr, GA, GW, stride_asm, stride_wsn, A_GROUP,
                                         W_GROUP)
                part = tl.zeros((BM, BN), dtype=tl.int32)
        elif A_GROUP or W_GROUP:
            acc += _group_scaled(tl.dot(a, w.T), k0, rm, rn, as_ptr, ws_ptr, GA, GW, stride_asm, stride_wsn,
                                 A_GROUP, W_GROUP)
        else:
            acc += tl.dot(a, w.T)
    _epilogue(acc, rm, rn, om, on, M, N, as_ptr, ws_ptr, lr_ptr, up_ptr, b_ptr, o_ptr, R, stride_asm, stride_wsn,
              stride_lm, stride_ur, stride_om, A_GROUP, W_GROUP, HAS_LR, HAS_BIAS, BR)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _gemm_tma_persistent_kernel(a_desc, as_ptr, w_desc, ws_ptr, lr_ptr, up_ptr, b_ptr, o_ptr, M, N, K, R, M_BUCKET,
                                stride_asm, stride_wsn, stride_lm, stride_ur, stride_om,
                                HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr,
                                BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PER_SM: tl.constexpr):
    """The per-row × per-column scaled path of :func:`_gemm_tma_kernel` as a persistent kernel: the programs
    (PER_SM per SM, which only the launch grid uses) walk the output tiles, and the tile loop is flattened with the
    K loop so that the next tile's TMA loads are issued while this tile's epilogue runs. The epilogue's tile comes
    from its own counter (``done``) instead of values carried across the flattened loop."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    programs = tl.num_programs(0)
    done = tl.program_id(0) - programs
    for t in tl.range(tl.program_id(0), tiles, programs, flatten=True):
        pid_m, pid_n = _tile_of(t, M, N, BM, BN, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            acc += tl.dot(a_desc.load([pid_m * BM, k0]), w_desc.load([pid_n * BN, k0]).T)
        done += programs
        pid_m, pid_n = _tile_of(done, M, N, BM, BN, GROUP_M)
        om = pid_m * BM + tl.arange(0, BM)
        on = pid_n * BN + tl.arange(0, BN)
        _epilogue(acc, om % M, on % N, om, on, M, N, as_ptr, ws_ptr, lr_ptr, up_ptr, b_ptr, o_ptr, R, stride_asm,
                  stride_wsn, stride_lm, stride_ur, stride_om, False, False, HAS_LR, HAS_BIAS, BR)


def tma_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the TMA kernel can serve these int8 operands: a Hopper (or newer) GPU, or the interpreter, and
    16-byte aligned rows and bases."""
    if not interpreting() and (capability(a) or (0, 0)) < (9, 0):
        return False
    return all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, w))


def _even_k(args):
    return args["K"] % (2 * args["BKH"]) == 0


def _pair(args):
    """Both K-halves of a step lie in the same scale groups (e.g. g128 with 64-wide halves)."""
    step = 2 * args["BKH"]
    return args["GA"] % step == 0 and args["GW"] % step == 0


_gemm_h = triton.heuristics({"EVEN_K": _even_k, "PAIR": _pair})(_gemm_kernel)
_TUNED = {
    "int8": triton.autotune(_INT8_CONFIGS, key=_KEY, do_bench=bench_fn)(_gemm_h),
    "int8_64": triton.autotune(_INT8_CONFIGS_64, key=_KEY, do_bench=bench_fn)(_gemm_h),
    "int4b": triton.autotune(_INT4_CONFIGS, key=_KEY, do_bench=bench_fn)(_gemm_h),
    "int4b_swap": triton.autotune(_INT4_SWAP_CONFIGS, key=_KEY, do_bench=bench_fn)(_gemm_h),
    "int4b_swap_group": triton.autotune(_INT4_SWAP_GROUP_CONFIGS, key=_KEY, do_bench=bench_fn)(_gemm_h),
    "tma": triton.autotune(_TMA_CONFIGS, key=_TMA_KEY, do_bench=bench_fn)(_gemm_tma_kernel),
    "tma_64": triton.autotune(_TMA_CONFIGS_64, key=_TMA_KEY, do_bench=bench_fn)(_gemm_tma_kernel),
    "tma_persistent": triton.autotune(_PERSISTENT_CONFIGS, key=["M_BUCKET", "N", "K", "R", "HAS_BIAS"],
                                      do_bench=bench_fn)(_gemm_tma_persistent_kernel),
}


def gemm_int(a: torch.Tensor, a_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, w_format: str,
             a_group: int, w_group: int, lowrank: torch.Tensor | None, proj_up: torch.Tensor | None,
             bias: torch.Tensor | None, out_dtype: torch.dtype, swap: bool | None = None) -> torch.Tensor:
    """Triton launcher; same signature as :func:`dmq.kernels.reference.gemm.gemm_int`. Group sizes must be
    multiples of 64 (one K-half of the tile); R ≤ 256. ``swap``: compute the tile as ``W · Aᵀ`` (the unpacked
    weight is the MMA's first operand, which Hopper can read from registers), then transpose it once; None: the
    module default :data:`INT4_SWAP` (int4b weights only)."""
    if swap is None:
        swap = INT4_SWAP and w_format == "int4b"
    check(a.dim() == 2 and a.dtype == torch.int8,
          lambda: f"a must be int8 (M, K) codes, got {a.dtype} {tuple(a.shape)}")
    check(a.stride(1) == 1, "a must be contiguous along K")
    check(w_format in ("int8", "int4b"), lambda: f"w_format must be 'int8' or 'int4b', got {w_format!r}")
    check(out_dtype in FLOAT16, lambda: f"out_dtype must be float16 or bfloat16, got {out_dtype}")
    m, k = a.shape
    n = w.shape[0]
    check(w.dim() == 2 and w.stride(1) == 1, "w must be a K-contiguous (N, ...) matrix")
    if w_format == "int8":
        check(w.dtype == torch.int8, lambda: f"int8 weights must be int8, got {w.dtype}")
        check(w.shape[1] >= k, lambda: f"weight has {w.shape[1]} K columns, activations {k}")
        kw = w.shape[1]
    else:
        check(w.dtype == torch.uint8, lambda: f"int4b weights must be uint8, got {w.dtype}")
        check(w.shape[1] * 2 >= blocked_kb(k),
              lambda: f"int4b weight holds {w.shape[1] * 2} codes per row, need "
                      f"{blocked_kb(k)} for K={k} (see dmq.kernels.layouts)")
        kw = w.shape[1] * 2
    for name, g in (("a_group", a_group), ("w_group", w_group)):
        check(g >= 0 and g % 64 == 0,
              lambda: f"{name} must be 0 (per row/column) or a multiple of 64 for the Triton GEMM "
                      f"(the K-half of a tile), got {g}; use the reference for finer groups")
    if a_group:
        check(a_scales.shape == (m, -(-k // a_group)),
              lambda: f"a_scales must be ({m}, {-(-k // a_group)}), got "
                      f"{tuple(a_scales.shape)}")
    else:
        check(a_scales.shape == (m,), lambda: f"a_scales must be ({m},), got {tuple(a_scales.shape)}")
    if w_group:
        check(w_scales.dim() == 2 and w_scales.shape[0] == n and w_scales.shape[1] >= -(-k // w_group),
              lambda: f"w_scales must be ({n}, ≥{-(-k // w_group)}), got {tuple(w_scales.shape)}")
    else:
        check(w_scales.shape == (n,), lambda: f"w_scales must be ({n},), got {tuple(w_scales.shape)}")
    r, lowrank, proj_up = _epilogue_args(lowrank, proj_up, bias, m, n)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    a_scales = a_scales.contiguous()
    w_scales = w_scales.contiguous()
    args = (a, a_scales, w, w_scales, lowrank if r else out, proj_up if r else out,
            bias if bias is not None else out, out, m, n, k, kw, r, m_bucket(m), a_group, w_group,
            a.stride(0), a_scales.stride(0), w.stride(0), w_scales.stride(0),
            lowrank.stride(0) if r else 0, proj_up.stride(0) if r else 0, out.stride(0))
    meta = dict(W_INT4=w_format == "int4b", A_GROUP=a_group > 0, W_GROUP=w_group > 0, HAS_LR=r > 0,
                HAS_BIAS=bias is not None, GROUPED=bool(a_group or w_group), SWAP=bool(swap),
                BR=max(16, next_pow2(r)))

    def grid(c):
        return (triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]),)

    if w_format == "int8" and tma_ok(a, w):
        _launch_tma(a, a_scales, w, w_scales, args[4:8], m, n, k, r, a_group, w_group, meta, grid)
    elif fixed_config():
        _gemm_h[grid(dict(BM=32, BN=32))](*args, **meta, BM=32, BN=32, BKH=64, GROUP_M=4)
    elif w_format == "int4b":
        name = ("int4b_swap_group" if meta["GROUPED"] else "int4b_swap") if swap else "int4b"
        _TUNED[name][grid](*args, **meta)
    elif (a_group % 128 == 0) and (w_group % 128 == 0):
        _TUNED["int8"][grid](*args, **meta)
    else:
        _TUNED["int8_64"][grid](*args, **meta)
    return out


def _epilogue_args(lowrank: torch.Tensor | None, proj_up: torch.Tensor | None, bias: torch.Tensor | None, m: int,
                   n: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """Checked epilogue operands of an ``(m, n)`` output: ``(R, lowrank, proj_up)``, R = 0 without a branch, the
    branch K-contiguous."""
    r = 0
    if lowrank is not None and lowrank.shape[1] > 0:
        r = lowrank.shape[1]
        check(proj_up is not None and proj_up.shape == (r, n), lambda: f"proj_up must be ({r}, {n})")
        check(lowrank.dtype == proj_up.dtype and lowrank.dtype in FLOAT16, "lowrank and proj_up must share a "
                                                                           "16-bit dtype")
        check(lowrank.shape[0] == m and r <= 256,
              lambda: f"lowrank must be ({m}, R ≤ 256), got {tuple(lowrank.shape)}")
        lowrank = lowrank if lowrank.stride(1) == 1 else lowrank.contiguous()
        proj_up = proj_up if proj_up.stride(1) == 1 else proj_up.contiguous()
    if bias is not None:
        check(bias.shape == (n,), lambda: f"bias must be ({n},), got {tuple(bias.shape)}")
    return r, lowrank, proj_up


def conv_gemm_int(codes: torch.Tensor, scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, kh: int,
                  kw: int, ph: int, pw: int, dh: int, dw: int, lowrank: torch.Tensor | None,
                  proj_up: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Triton launcher (TMA GPUs and the interpreter); same signature and results as
    :func:`dmq.kernels.reference.gemm.conv_gemm_int`: the implicit-GEMM convolution reads each tap's rows straight
    from the NHWC codes (one descriptor row per pixel, shifted per tap; rows past the tensor read as zeros, taps
    outside the image get a zero scale), so no im2col of codes or scales is written."""
    check(codes.dim() == 4 and codes.dtype == torch.int8 and codes.is_contiguous(),
          lambda: f"codes must be contiguous int8 (B, H, W, Cp), got {codes.dtype} {tuple(codes.shape)}")
    b, h, wd, cp = codes.shape
    check(cp % 64 == 0, lambda: f"the padded channel count must be a multiple of 64, got {cp}")
    check(scales.shape == (b, h, wd) and scales.dtype == torch.float32,
          lambda: f"scales must be fp32 ({b}, {h}, {wd}), got {scales.dtype} {tuple(scales.shape)}")
    check(_ref_conv_same_size(kh, kw, ph, pw, dh, dw),
          lambda: f"conv_gemm_int serves stride-1 convolutions that keep the input size; kernel {kh}x{kw}, "
                  f"padding ({ph}, {pw}), dilation ({dh}, {dw}) does not")
    k = kh * kw * cp
    check(w.dim() == 2 and w.dtype == torch.int8 and w.shape[1] >= k and w.stride(1) == 1,
          lambda: f"w must be K-contiguous int8 (N, ≥{k}), got {w.dtype} {tuple(w.shape)}")
    n = w.shape[0]
    check(w_scales.shape == (n,), lambda: f"w_scales must be ({n},), got {tuple(w_scales.shape)}")
    a = codes.reshape(b * h * wd, cp)
    check(tma_ok(a, w), "conv_gemm_int needs a GPU with TMA (compute capability 9.0) and 16-byte aligned operands")
    m = a.shape[0]
    r, lowrank, proj_up = _epilogue_args(lowrank, proj_up, bias, m, n)
    check(out_dtype in FLOAT16, lambda: f"out_dtype must be float16 or bfloat16, got {out_dtype}")
    out = torch.empty((m, n), dtype=out_dtype, device=codes.device)
    if m == 0 or n == 0:
        return out
    meta = dict(A_GROUP=True, W_GROUP=False, HAS_LR=r > 0, HAS_BIAS=bias is not None, BR=max(16, next_pow2(r)))
    tail = (lowrank if r else out, proj_up if r else out, bias if bias is not None else out, out)

    def grid(c):
        return (triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]),)

    _launch_tma(a, scales.reshape(m), w, w_scales.contiguous(), tail, m, n, k, r, cp, 0, meta, grid,
                conv=(h, wd, cp, kh, kw, ph, pw, dh, dw))
    return out


def _launch_tma(a, a_scales, w, w_scales, tail, m, n, k, r, a_group, w_group, meta, grid, conv=None):
    """``conv``: ``(H, W, Cp, kh, kw, ph, pw, dh, dw)`` of an implicit-GEMM convolution over NHWC codes
    ``a (B·H·W, Cp)`` with per-pixel scales (then ``k = kh·kw·Cp`` and ``a_group = Cp``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    lowrank, proj_up, bias, out = tail
    # the weight may hold more K columns than the activations: its descriptor stops at K (zeros beyond)
    a_desc = TensorDescriptor(a, [a.shape[0], a.shape[1]], [a.stride(0), 1], [64, 64])
    w_desc = TensorDescriptor(w, [n, k], [w.stride(0), 1], [64, 64])
    groups = [g for g in (a_group, w_group) if g]
    run = math.gcd(*groups) if groups else 0     # K columns that share every scale (BK = 64 divides it)
    ch, cw, cp, kw_taps, ph, pw, dh, dw = (conv[0], conv[1], conv[2], conv[4], *conv[5:]) if conv else (0,) * 8
    head = (a_desc, a_scales, w_desc, w_scales, lowrank, proj_up, bias, out, m, n, k, r, m_bucket(m))
    strides = (a_scales.stride(0), w_scales.stride(0), lowrank.stride(0) if r else 0, proj_up.stride(0) if r else 0,
               out.stride(0))
    if PERSISTENT and not (groups or conv):
        _launch_persistent(head, strides, {key: meta[key] for key in ("HAS_LR", "HAS_BIAS", "BR")}, a, m, n)
        return
    args = (*head, a_group, w_group, run, *strides, ch, cw, cp, ph, pw, dh, dw)
    meta = {key: meta[key] for key in ("A_GROUP", "W_GROUP", "HAS_LR", "HAS_BIAS", "BR")}
    meta["RUNS"] = conv is not None or (bool(GROUP_RUNS) and run > 64)
    meta["CONV_KW"] = kw_taps
    if fixed_config():
        a_desc.block_shape = [64, 64]
        w_desc.block_shape = [64, 64]
        _gemm_tma_kernel[grid(dict(BM=64, BN=64))](*args, **meta, BM=64, BN=64, BK=64, GROUP_M=4)
    else:
        _TUNED["tma_64" if (a_group or w_group) else "tma"][grid](*args, **meta)


def _launch_persistent(head: tuple, strides: tuple, meta: dict, a: torch.Tensor, m: int, n: int) -> None:
    """:func:`_gemm_tma_persistent_kernel` on :func:`_launch_tma`'s operands (no group scales, no convolution):
    the config's programs per SM (3 programs with the fixed config of the interpreter and the quick GPU checks, so
    that programs walk several tiles)."""
    if fixed_config():
        programs = 3
    elif capability(a) and not a.is_cuda:   # compile-only (dmq.kernels.aot): an H100's count
        programs = 132
    else:
        idx = a.device.index if a.device.index is not None else torch.cuda.current_device()
        if idx not in _SMS:
            _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        programs = _SMS[idx]
    tail = (*head, *strides)

    def grid(c):
        return (min(programs * c["PER_SM"], triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"])),)

    if fixed_config():   # (the descriptors' block shape is already the fixed config's, 64 x 64)
        _gemm_tma_persistent_kernel[grid(dict(BM=64, BN=64, PER_SM=1))](*tail, **meta, BM=64, BN=64, BK=64,
                                                                         GROUP_M=4, PER_SM=1)
    else:
        _TUNED["tma_persistent"][grid](*tail, **meta)

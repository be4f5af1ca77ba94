"""Activation quantization: x is divided by ``smooth`` and quantized to int4 / int8 / fp8 codes; the low-rank
down-projection ``(x / smooth) · proj_down`` is one cuBLAS GEMM ``x · (proj_down / smooth)``.

Per token, one program owns a few whole rows (autotuned) and makes two passes over them (row maxima, then codes;
the second read mostly hits L2), one launch; two-level int4 groups go through it too (their second-level scale is
per token). Per group, the grid is 2-D, (row blocks) × (K chunks), so that a few thousand tokens still fill the GPU.
An in-kernel down-projection (a 16-row MMA per K step) cost 3-5x the quantization itself on the H100 (issue 7
measurements), hence cuBLAS. Reference: :mod:`dmq.kernels.reference.quant_act`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmq.formats import SUB_MAX, padded_channels
from dmq.kernels._common import (FLOAT16, bench_fn, check, encode_e4m3, fixed_config, fold_down, m_bucket, next_pow2,
                                rcp, rint_small)
from dmq.kernels.reference.quant_act import TWO_LEVEL, act_spec, pixel_rows

__all__ = ["quantize_act"]

_BM = 32                 # rows per program of the group kernel
_TARGET_PROGRAMS = 1024  # enough programs for 132 SMs several times over
# per-token kernel: autotuned over rows per program and K step, keyed on K and the bucketed M. 16 x 512 with 8 warps
# was the best of a sweep at 4096 x 3072 on the H100 (28 us, vs 68 us for whole rows held in registers and 103 us for
# an earlier split-K two-launch version); but 16 rows give a 4096-token layer only 256 programs that walk K twice, and
# at K = 12288 that took 0.14 ms vs 0.095 ms for the one-pass group kernel (issue 7, kernels-h100.json). BK = 0: the
# whole row in one load (WHOLE), with 1-4 rows: on the H200 (benchmarks/quant_variants.py) int8 at 4096 x 3072 took
# 14.8 us with 4 rows against 20.4 us for the two-pass kernel's best, and 256 x 3072 took 2.8 against 7.1 us (16
# rows per program left 16 programs); the two-pass 4 x 2048 and 2 x 2048 configs never won there.
_TOKEN_CONFIGS = [triton.Config({"BM": bm, "BK": bk, "WHOLE": bk == 0}, num_warps=w)
                  for bm, bk, w in ((16, 512, 8), (8, 1024, 8), (8, 512, 4), (4, 1024, 4),
                                    (4, 0, 8), (2, 0, 8), (1, 0, 16))]
# NCHW images read in place (PLANAR): a program's rows are a run of pixels, contiguous in each channel plane, so
# loads coalesce along pixels; two passes over K of BK channels. Eager U-Net convolutions get their inputs in NCHW,
# and the NCHW -> NHWC copy of them was the largest cost of an eager SDXL conv layer at 128² x 320 besides its
# GEMM (78 us against 121 us, benchmarks/results/conv-gemm-h200.json, stage-* rows). Not yet timed on a GPU.
_PLANAR_ROWS = 64        # image sizes H·W must be a multiple (and of every BM below); others are copied to rows
_PLANAR_CONFIGS = [triton.Config({"BM": bm, "BK": bk, "WHOLE": False}, num_warps=w)
                   for bm, bk, w in ((64, 64, 4), (64, 32, 4), (32, 64, 4), (64, 128, 8))]
_TOKEN_BM = 16           # the interpreter's fixed config (no autotuning there)
SUB_MAX_C = tl.constexpr(SUB_MAX)  # a jit function may read a global only when it is a constexpr


@triton.jit
def _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HW, HAS_SMOOTH: tl.constexpr, PLANAR: tl.constexpr,
             BM: tl.constexpr):
    """A (BM, BK) fp32 tile of x / smooth: rows ``rm``, columns ``rk``. PLANAR: x is a contiguous NCHW image
    (K channels, HW pixels per image, HW a multiple of BM, so no row is out of range) read in place, pixel m of
    image m // HW at offset m % HW of each channel plane: a program's rows are one run of contiguous pixels, which
    the hints (and no row mask) let the compiler load 16 bytes at a time."""
    if PLANAR:
        rows = tl.max_contiguous(tl.multiple_of((rm // HW) * K * HW + rm % HW, BM), BM)
        x = tl.load(x_ptr + rows[:, None] + rk[None, :] * HW, mask=rk[None, :] < K, other=0.0)
    else:
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
    x = x.to(tl.float32)
    if HAS_SMOOTH:
        sm = tl.load(sm_ptr + rk, mask=rk < K, other=1.0).to(tl.float32)
        x = x * rcp(sm)[None, :]
    return x


@triton.jit
def _store_codes(xs, inv, c_ptr, rm, k0, M, KP, stride_cm, IS_FP8: tl.constexpr, QMAX: tl.constexpr,
                 PACK: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    y = xs * inv[:, None]
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


@triton.jit
def _store_two_level(xs, s2_div, c_ptr, rm, k0, M, KP, stride_cm, QMAX: tl.constexpr, SUB: tl.constexpr,
                     GROUP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Two-level int4 (see dmq.formats.QuantSpec.two_level) of a (BM, BK) tile, BK a multiple of GROUP, given the
    rows' second-level scales: sub-scales per group, then int8 ``code · sub``."""
    xg = tl.reshape(xs, (BM, BK // GROUP, GROUP))
    s_g = tl.math.div_rn(tl.max(tl.abs(xg), axis=2), QMAX)
    sub = tl.minimum(tl.maximum(rint_small(tl.math.div_rn(s_g, s2_div[:, None])), 1.0), SUB)
    y = xg * rcp(sub * s2_div[:, None])[:, :, None]
    q = rint_small(tl.minimum(tl.maximum(y, -QMAX - 1.0), QMAX)).to(tl.int32)
    out = tl.reshape(q * sub.to(tl.int32)[:, :, None], (BM, BK))
    rk = k0 + tl.arange(0, BK)
    tl.store(c_ptr + rm[:, None] * stride_cm + rk[None, :], out.to(tl.int8),
             mask=(rm[:, None] < M) & (rk[None, :] < KP))


@triton.jit(do_not_specialize=["M"])
def _group_kernel(x_ptr, sm_ptr, c_ptr, s_ptr, M, K, KP, KCH, stride_xm, HW, stride_cm, stride_sm,
                  HAS_SMOOTH: tl.constexpr, PLANAR: tl.constexpr, QMAX: tl.constexpr, PACK: tl.constexpr,
                  GROUP: tl.constexpr, BM: tl.constexpr):
    """Per-group scales (fp16, as stored by dmq.formats): one pass over a BM × KCH tile."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k_start = tl.program_id(1) * KCH
    for k0 in range(k_start, tl.minimum(k_start + KCH, KP), GROUP):
        rk = k0 + tl.arange(0, GROUP)
        xs = _load_xs(x_ptr, sm_ptr, rm, rk, M, K, stride_xm, HW, HAS_SMOOTH, PLANAR, BM)
        amax = tl.max(tl.abs(xs), axis=1)
        s16 = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX).to(tl.float16)
        tl.store(s_ptr + rm * stride_sm + k0 // GROUP, s16, mask=rm < M)
        s = s16.to(tl.float32)
        _store_codes(xs, rcp(tl.where(s > 0, s, 1.0)), c_ptr, rm, k0, M, KP, stride_cm, False, QMAX, PACK, BM,
                     GROUP)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _token_kernel(x_ptr, sm_ptr, c_ptr, s_ptr, M, K, KP, M_BUCKET, stride_xm, HW, stride_cm,
                  HAS_SMOOTH: tl.constexpr, PLANAR: tl.constexpr, IS_FP8: tl.constexpr, QMAX: tl.constexpr,
                  PACK: tl.constexpr, TWO_LEVEL_GROUP: tl.constexpr, WHOLE: tl.constexpr, BM: tl.constexpr,
                  BK: tl.constexpr):
    """Per-token scale = amax / qmax (fp32) and codes of BM whole rows: a max pass, then a quantization pass (its
    re-read of x mostly hits L2), or, when one K step covers the row (WHOLE), one load kept in registers.
    TWO_LEVEL_GROUP > 0: two-level int4 in groups of that size, the per-token scale being scale2 = amax / qmax /
    SUB_MAX (the largest group scale over SUB_MAX)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    if WHOLE:
        xs = _load_xs(x_ptr, sm_ptr, rm, tl.arange(0, BK), M, K, stride_xm, HW, HAS_SMOOTH, PLANAR, BM)
        amax = tl.max(tl.abs(xs), axis=1)
    else:
        amax = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, KP, BK):
            xs = _load_xs(x_ptr, sm_ptr, rm, k0 + tl.arange(0, BK), M, K, stride_xm, HW, HAS_SMOOTH, PLANAR, BM)
            amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
    s = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX)
    if TWO_LEVEL_GROUP:
        s = tl.math.div_rn(s, tl.zeros_like(s) + SUB_MAX_C)
    tl.store(s_ptr + rm, s, mask=rm < M)
    s_div = tl.where(s > 0, s, 1.0)
    inv = rcp(s_div)
    for k0 in range(0, KP, BK):
        if not WHOLE:
            xs = _load_xs(x_ptr, sm_ptr, rm, k0 + tl.arange(0, BK), M, K, stride_xm, HW, HAS_SMOOTH, PLANAR, BM)
        if TWO_LEVEL_GROUP:
            _store_two_level(xs, s_div, c_ptr, rm, k0, M, KP, stride_cm, QMAX, SUB_MAX_C, TWO_LEVEL_GROUP, BM, BK)
        else:
            _store_codes(xs, inv, c_ptr, rm, k0, M, KP, stride_cm, IS_FP8, QMAX, PACK, BM, BK)


_WHOLE_MAX = 16384   # elements of a whole-row tile (BM x padded K)


def _token_prune(configs, named_args, **kwargs):
    """Configs whose K step fits the row: BK lowered to the row's padded length (a power of two, at least 64, so a
    two-level group always fits), duplicates dropped; whole-row configs (BK = 0) take that length when the tile stays
    within :data:`_WHOLE_MAX` elements (two-level groups: one row per program only, the per-group reshape of wider
    tiles was 2-5x slower on the H200, benchmarks/results/quant-variants-h200.json)."""
    bk_max = max(next_pow2(named_args["KP"]), 64)
    seen, out = set(), []
    for c in configs:
        bm, whole = c.kwargs["BM"], c.kwargs["WHOLE"]
        if whole and (bm * bk_max > _WHOLE_MAX or (kwargs.get("TWO_LEVEL_GROUP") and bm > 1)):
            continue
        bk = bk_max if whole else max(min(c.kwargs["BK"], bk_max), kwargs.get("TWO_LEVEL_GROUP") or 0)
        key = (bm, bk, whole, c.num_warps)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config({"BM": bm, "BK": bk, "WHOLE": whole}, num_warps=c.num_warps))
    return out


_TOKEN_KEY = ["KP", "M_BUCKET", "TWO_LEVEL_GROUP", "IS_FP8", "PACK", "HAS_SMOOTH"]
_token_tuned = triton.autotune(_TOKEN_CONFIGS, key=_TOKEN_KEY, prune_configs_by={"early_config_prune": _token_prune},
                               do_bench=bench_fn)(_token_kernel)
_token_planar_tuned = triton.autotune(_PLANAR_CONFIGS, key=_TOKEN_KEY,
                                      prune_configs_by={"early_config_prune": _token_prune},
                                      do_bench=bench_fn)(_token_kernel)


def _split(m: int, kp: int, step: int, bm: int) -> tuple[int, int]:
    """(number of K chunks, chunk length): enough programs to fill the GPU, chunks a multiple of ``step``."""
    steps = -(-kp // step)
    if fixed_config():
        nsplit = min(steps, 2)       # exercise the split in the CPU tests
    else:
        nsplit = max(1, min(steps, -(-_TARGET_PROGRAMS // -(-m // bm))))
    per = -(-steps // nsplit)
    return -(-steps // per), per * step


def quantize_act(x: torch.Tensor, smooth: torch.Tensor | None, proj_down: torch.Tensor | None, qdtype: str,
                 group_size: int, pack: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher; same signature and results as :func:`dmq.kernels.reference.quant_act.quantize_act`
    (codes and scales bit-exact; lowrank within 16-bit rounding: the smoothing is folded into proj_down, see
    :func:`_lowrank`)."""
    spec = act_spec(qdtype, group_size)
    two_level = qdtype == TWO_LEVEL
    check(x.dim() in (2, 4), lambda: f"x must be (M, K) or an image (B, C, H, W), got {tuple(x.shape)}")
    check(x.dtype in FLOAT16, lambda: f"x must be float16 or bfloat16, got {x.dtype}")
    check(pack is False or qdtype == "int4", "pack=True is only meaningful for int4 codes")
    hw = 1
    if x.dim() == 4:
        check(proj_down is None, "an image input (B, C, H, W) takes no proj_down")
        hw = x.shape[2] * x.shape[3]
        if not (x.is_contiguous() and hw % _PLANAR_ROWS == 0):
            x, hw = pixel_rows(x).contiguous(), 1     # channels-last (a view) or an odd size (a copy)
    planar = x.dim() == 4
    check(planar or x.stride(-1) == 1, "x must be contiguous along K")
    m, k = (x.numel() // x.shape[1], x.shape[1]) if planar else x.shape
    if smooth is not None:
        check(smooth.shape == (k,), lambda: f"smooth must be ({k},), got {tuple(smooth.shape)}")
        smooth = smooth.contiguous()
    r = 0
    if proj_down is not None:
        check(proj_down.dim() == 2 and proj_down.shape[0] == k,
              lambda: f"proj_down must be ({k}, R), got "
                      f"{tuple(proj_down.shape)}")
        check(proj_down.dtype in FLOAT16, lambda: f"proj_down must be 16-bit, got {proj_down.dtype}")
        r = proj_down.shape[1]
        check(r <= 256, lambda: f"low-rank branch rank must be ≤ 256 for the fused kernel, got {r}")
        proj_down = proj_down if proj_down.stride(1) == 1 else proj_down.contiguous()
    kp = padded_channels(spec, k)
    dev = x.device
    if qdtype == "fp8_e4m3":
        codes = torch.empty((m, kp), dtype=torch.uint8, device=dev)
    elif pack:
        codes = torch.empty((m, kp // 2), dtype=torch.uint8, device=dev)
    else:
        codes = torch.empty((m, kp), dtype=torch.int8, device=dev)
    if group_size and not two_level:
        scales = torch.empty((m, kp // group_size), dtype=torch.float16, device=dev)
    else:
        scales = torch.empty((m,), dtype=torch.float32, device=dev)
    lowrank = _lowrank(x, smooth, proj_down) if r else x.new_empty((m, 0))
    if m == 0:
        return codes.view(torch.float8_e4m3fn) if qdtype == "fp8_e4m3" else codes, scales, lowrank
    qmax = float(spec.qtype.qmax)
    sm_arg = smooth if smooth is not None else x
    if group_size and not two_level:
        bm = _BM if m > 16 else 16
        nsplit, kch = _split(m, kp, group_size, bm)
        _group_kernel[(triton.cdiv(m, bm), nsplit)](x, sm_arg, codes, scales, m, k, kp, kch, x.stride(0), hw,
                                                    codes.stride(0), scales.stride(0), HAS_SMOOTH=smooth is not None,
                                                    PLANAR=planar, QMAX=qmax, PACK=bool(pack),
                                                    GROUP=int(group_size), BM=bm, num_warps=4)
    else:
        # two-level: kp is a multiple of the group size, and so is bk (both powers of two, bk ≥ group)
        args = (x, sm_arg, codes, scales, m, k, kp, m_bucket(m), x.stride(0), hw, codes.stride(0))
        meta = dict(HAS_SMOOTH=smooth is not None, PLANAR=planar, IS_FP8=qdtype == "fp8_e4m3", QMAX=qmax,
                    PACK=bool(pack), TWO_LEVEL_GROUP=int(group_size) if two_level else 0)
        if fixed_config():
            _token_kernel[(triton.cdiv(m, _TOKEN_BM),)](*args, **meta, BM=_TOKEN_BM, BK=max(64, group_size),
                                                        WHOLE=False, num_warps=8)
        else:
            tuned = _token_planar_tuned if planar else _token_tuned
            tuned[lambda c: (triton.cdiv(m, c["BM"]),)](*args, **meta)
    if qdtype == "fp8_e4m3":
        codes = codes.view(torch.float8_e4m3fn)
    return codes, scales, lowrank


def _lowrank(x: torch.Tensor, smooth: torch.Tensor | None, proj_down: torch.Tensor) -> torch.Tensor:
    """``(x / smooth) · proj_down`` as ``x · (proj_down / smooth)``: one GEMM on x as it is, with the smoothing
    folded into the (K, R) projection (:func:`dmq.kernels._common.fold_down`). (M, R) in x's dtype."""
    return x @ fold_down(smooth, proj_down, x.dtype)

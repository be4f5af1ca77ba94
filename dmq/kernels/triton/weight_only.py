"""Weight-only kernels: a GEMV/skinny GEMM (M ≤ 16) that streams int4 / int8 weights and dequantizes in registers
(the adaLN modulation linears: M = 1…8 per step), and a dequantization kernel (int4b / int8 / nvfp4 → 16-bit, or
int4b → int8 codes) used for large M (dequantize once, then cuBLAS) and by the nvfp4 path.
References: :mod:`dmq.kernels.reference.weight_only`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dmq.kernels._common import FLOAT16, bench_fn, check, decode_e2m1, decode_e4m3, fixed_config, \
    small_int_f32
from dmq.kernels.layouts import blocked_kb
from dmq.kernels.reference.weight_only import WEIGHT_FORMATS

__all__ = ["weight_only_linear", "dequantize_weight", "GEMV_MAX_M"]

GEMV_MAX_M = 16
# int4b weights and M ≤ this: the CUDA-core GEMV (no MMA tile, no layout conversion). It reads the weights once per
# row of x: at 2×3072×18432 it took 44 µs on the H100 against 32 µs for the MMA kernel, 24 µs at M = 1
# (benchmarks/gemv_variants.py, benchmarks/kernel_bench.py).
ELT_MAX_M = 1
_FMT = {"int4b": 0, "int8": 1, "fp4": 2}


@triton.jit
def _int4b_f32(p):
    """uint8 int4b bytes → (low, high) signed codes in fp32, exact and conversion-free (a two's-complement nibble
    ``c`` has ``c + 8 == nibble ^ 8``)."""
    p = p.to(tl.int32)
    return small_int_f32((p & 15) ^ 8, 8), small_int_f32((p >> 4) ^ 8, 8)


@triton.jit
def _load_halves(w_ptr, rn, k0, KW, stride_wn, rk, FMT: tl.constexpr, BKH: tl.constexpr):
    """Codes of K block ``[k0, k0 + 2*BKH)`` as two fp32 (BN, BKH) tiles and their K indices."""
    rows = w_ptr + rn[:, None] * stride_wn
    if FMT == 0:      # int4b: low nibble k0 + j, high nibble k0 + BKH + j
        lo, hi = _int4b_f32(tl.load(rows + (k0 // 2 + rk)[None, :]))
        k_lo = k0 + rk
        k_hi = k0 + BKH + rk
    elif FMT == 1:    # int8
        k_lo = k0 + rk
        k_hi = k0 + BKH + rk
        # int8 → float by conversion: the conversion-free decode (as int4b's) was slower here in a one-off H100 run
        lo = tl.load(rows + k_lo[None, :], mask=k_lo[None, :] < KW, other=0).to(tl.float32)
        hi = tl.load(rows + k_hi[None, :], mask=k_hi[None, :] < KW, other=0).to(tl.float32)
    else:             # fp4 pairs: low nibble k0 + 2j, high nibble k0 + 2j + 1
        kb = k0 // 2 + rk
        p = tl.load(rows + kb[None, :], mask=kb[None, :] < KW // 2, other=0).to(tl.int32)
        lo = decode_e2m1(p & 15)
        hi = decode_e2m1((p >> 4) & 15)
        k_lo = k0 + 2 * rk
        k_hi = k_lo + 1
    return lo, hi, k_lo, k_hi


@triton.jit
def _group_scale(ws_ptr, rn, kk, stride_wsn, GW, NG, FMT: tl.constexpr):
    """Per-element group scales (BN, BKH) for K indices ``kk``."""
    g = kk // GW
    s = tl.load(ws_ptr + rn[:, None] * stride_wsn + g[None, :], mask=g[None, :] < NG, other=0)
    if FMT == 2:
        return decode_e4m3(s.to(tl.int32))
    return s.to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, KW, GW, NG,
                 stride_xm, stride_wn, stride_wsn, stride_om,
                 FMT: tl.constexpr, W_GROUP: tl.constexpr, HALF_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    """M ≤ 16 rows (padded to the 16-row MMA tile) × BN weight rows; the weight tile is dequantized to x's
    dtype in registers (exact: raw codes, or fp4 codes × fp8 scales) and fed to tl.dot, which also makes Triton
    pipeline the weight loads."""
    pid = tl.program_id(0)
    on = pid * BN + tl.arange(0, BN)
    rn = on % N
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BKH)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, 2 * BKH):
        lo, hi, k_lo, k_hi = _load_halves(w_ptr, rn, k0, KW, stride_wn, rk, FMT, BKH)
        if W_GROUP and not HALF_GROUPS:
            lo = lo * _group_scale(ws_ptr, rn, k_lo, stride_wsn, GW, NG, FMT)
            hi = hi * _group_scale(ws_ptr, rn, k_hi, stride_wsn, GW, NG, FMT)
        x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + k_lo[None, :],
                       mask=(rm[:, None] < M) & (k_lo[None, :] < K), other=0.0)
        x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + k_hi[None, :],
                       mask=(rm[:, None] < M) & (k_hi[None, :] < K), other=0.0)
        p_lo = tl.dot(x_lo, tl.trans(lo.to(x_lo.dtype)))
        p_hi = tl.dot(x_hi, tl.trans(hi.to(x_hi.dtype)))
        if W_GROUP and HALF_GROUPS:   # each K-half lies in one group: scale the partial sums, (BN,) loads
            g_lo = k0 // GW
            g_hi = (k0 + BKH) // GW
            s_lo = tl.load(ws_ptr + rn * stride_wsn + g_lo).to(tl.float32)
            s_hi = tl.load(ws_ptr + rn * stride_wsn + g_hi, mask=(rn * 0 + g_hi) < NG, other=0.0).to(tl.float32)
            acc += p_lo * s_lo[None, :] + p_hi * s_hi[None, :]
        else:
            acc += p_lo + p_hi
    if not W_GROUP:
        acc = acc * tl.load(ws_ptr + rn).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    tl.store(o_ptr + rm[:, None] * stride_om + on[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (on[None, :] < N))


@triton.jit(do_not_specialize=["M"])
def _gemv_int4b_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, GW, stride_xm, stride_wn, stride_wsn,
                       stride_om, W_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    """One row of x (grid axis 0) × BN weight rows, int4b: each K step reads NB whole 128-code blocks (64 bytes) per
    weight row, multiplies on CUDA cores in fp32 and reduces per 64-code half, which is one g64 group (groups are
    multiples of 64: the scale of half ``h`` is group ``(k0 + 64 h) // GW``)."""
    m = tl.program_id(0)
    on = tl.program_id(1) * BN + tl.arange(0, BN)
    rn = on % N
    rb = tl.arange(0, NB)
    rj = tl.arange(0, 64)
    wrow = w_ptr + rn[:, None, None] * stride_wn + rb[None, :, None] * 64 + rj[None, None, :]
    acc = tl.zeros((BN, NB), dtype=tl.float32)
    for k0 in range(0, K, NB * 128):
        kk = k0 + rb[:, None] * 128 + rj[None, :]
        lo, hi = _int4b_f32(tl.load(wrow + k0 // 2, mask=(kk < K)[None, :, :], other=0))
        x_lo = tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + m * stride_xm + kk + 64, mask=kk + 64 < K, other=0.0).to(tl.float32)
        p_lo = tl.sum(lo * x_lo[None, :, :], axis=2)
        p_hi = tl.sum(hi * x_hi[None, :, :], axis=2)
        if W_GROUP:
            g_lo = (k0 + rb * 128) // GW
            g_hi = (k0 + rb * 128 + 64) // GW
            s_lo = tl.load(ws_ptr + rn[:, None] * stride_wsn + g_lo[None, :], mask=(k0 + rb * 128)[None, :] < K,
                           other=0.0)
            s_hi = tl.load(ws_ptr + rn[:, None] * stride_wsn + g_hi[None, :],
                           mask=(k0 + rb * 128 + 64)[None, :] < K, other=0.0)
            acc += p_lo * s_lo.to(tl.float32) + p_hi * s_hi.to(tl.float32)
        else:
            acc += p_lo + p_hi
    out = tl.sum(acc, axis=1)
    if not W_GROUP:
        out = out * tl.load(ws_ptr + rn).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(b_ptr + rn).to(tl.float32)
    tl.store(o_ptr + m * stride_om + on, out.to(o_ptr.dtype.element_ty), mask=on < N)


# measured on the H100 at 1x3072x18432 g64 (issue 7): 16 rows x 8 blocks, 8 warps was best (1.8x bf16); 8 rows x
# 4 blocks, 4 warps at 1x3072x3072
_ELT_CONFIGS = [triton.Config({"BN": bn, "NB": nb}, num_warps=w) for bn, nb, w in ((16, 8, 8), (16, 4, 8), (16, 2, 4),
                                                                                    (32, 2, 8), (8, 4, 4))]
_ELT_TUNED = triton.autotune(_ELT_CONFIGS, key=["N", "K", "W_GROUP", "HAS_BIAS"], do_bench=bench_fn)(
    _gemv_int4b_kernel)


@triton.jit
def _dequant_kernel(w_ptr, ws_ptr, o_ptr, N, K, KW, GW, NG, stride_wn, stride_wsn, stride_on,
                    FMT: tl.constexpr, W_GROUP: tl.constexpr, SCALED: tl.constexpr, INT_SUB: tl.constexpr,
                    HALF_GROUPS: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * 2 * BKH
    on = pid_n * BN + tl.arange(0, BN)
    rn = on % N
    rk = tl.arange(0, BKH)
    lo, hi, k_lo, k_hi = _load_halves(w_ptr, rn, k0, KW, stride_wn, rk, FMT, BKH)
    if (INT_SUB or SCALED) and HALF_GROUPS:
        # each K-half lies in one group: one (BN,) scale load per half instead of a per-element gather (the
        # gather made the two-level expansion 4x slower than the bare unpack at K = 12288 on the H100)
        g_hi = (k0 + BKH) // GW
        lo = lo * tl.load(ws_ptr + rn * stride_wsn + k0 // GW).to(tl.float32)[:, None]
        hi = hi * tl.load(ws_ptr + rn * stride_wsn + g_hi, mask=(rn * 0 + g_hi) < NG, other=0).to(tl.float32)[:, None]
    elif INT_SUB:   # two-level int4: code · integer sub-scale, exact in fp32 and in int8
        lo = lo * _group_scale(ws_ptr, rn, k_lo, stride_wsn, GW, NG, FMT)
        hi = hi * _group_scale(ws_ptr, rn, k_hi, stride_wsn, GW, NG, FMT)
    elif SCALED:
        if W_GROUP:
            lo = lo * _group_scale(ws_ptr, rn, k_lo, stride_wsn, GW, NG, FMT)
            hi = hi * _group_scale(ws_ptr, rn, k_hi, stride_wsn, GW, NG, FMT)
        else:
            s = tl.load(ws_ptr + rn).to(tl.float32)[:, None]
            lo = lo * s
            hi = hi * s
    rows = o_ptr + on[:, None] * stride_on
    nmask = on[:, None] < N
    tl.store(rows + k_lo[None, :], lo.to(o_ptr.dtype.element_ty), mask=nmask & (k_lo[None, :] < K))
    tl.store(rows + k_hi[None, :], hi.to(o_ptr.dtype.element_ty), mask=nmask & (k_hi[None, :] < K))


_GEMV_TUNED: dict[int, object] = {}


_GEMV_CONFIGS = [triton.Config({"BN": bn}, num_warps=4, num_stages=st) for bn, st in ((32, 4), (64, 4), (64, 6),
                                                                                  (128, 3))]


def _gemv_tuned(bm: int):
    if bm not in _GEMV_TUNED:
        _GEMV_TUNED[bm] = triton.autotune(_GEMV_CONFIGS, key=["N", "K", "FMT", "W_GROUP", "HAS_BIAS"],
                                          do_bench=bench_fn)(_gemv_kernel)
    return _GEMV_TUNED[bm]


def _check_weight(w: torch.Tensor, w_scales: torch.Tensor, w_format: str, w_group: int, k: int) -> int:
    """Validate; returns the number of codes per weight row the kernel may read (KW)."""
    check(w_format in WEIGHT_FORMATS, lambda: f"w_format must be one of {WEIGHT_FORMATS}, got {w_format!r}")
    check(w.dim() == 2 and w.stride(1) == 1, "w must be a K-contiguous (N, ...) matrix")
    n = w.shape[0]
    if w_format == "int4b":
        check(w.dtype == torch.uint8 and w.shape[1] * 2 >= blocked_kb(k),
              lambda: f"int4b weight must be uint8 (N, ≥{blocked_kb(k) // 2}), got {w.dtype} {tuple(w.shape)}")
        kw = w.shape[1] * 2
    elif w_format == "int8":
        check(w.dtype == torch.int8 and w.shape[1] >= k, lambda: f"int8 weight must be int8 (N, ≥{k})")
        kw = w.shape[1]
    else:
        check(w.dtype == torch.uint8 and w.shape[1] * 2 >= k, lambda: f"fp4 weight must be uint8 (N, ≥{-(-k // 2)})")
        check(w_group == 16 and w_scales.dtype in (torch.float8_e4m3fn, torch.uint8),
              "fp4 weights need group 16 and fp8 e4m3 scales")
        kw = w.shape[1] * 2
    if w_format != "fp4":
        check(w_group == 0 or w_group % 64 == 0, lambda: f"w_group must be 0 or a multiple of 64, got {w_group}")
    if w_group:
        check(w_scales.dim() == 2 and w_scales.shape[0] == n and w_scales.shape[1] >= -(-k // w_group),
              lambda: f"w_scales must be ({n}, ≥{-(-k // w_group)}), got {tuple(w_scales.shape)}")
    else:
        check(w_scales.shape == (n,), lambda: f"w_scales must be ({n},), got {tuple(w_scales.shape)}")
    return kw


def _scale_arg(w_scales: torch.Tensor) -> torch.Tensor:
    s = w_scales.contiguous()
    return s.view(torch.uint8) if s.dtype == torch.float8_e4m3fn else s


def weight_only_linear(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor, w_format: str, w_group: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """Triton GEMV for ``M ≤ 16`` (same signature as the reference); larger M raises (use
    :func:`dequantize_weight` + a 16-bit GEMM, as :mod:`dmq.kernels.ops` does)."""
    check(x.dim() == 2 and x.dtype in FLOAT16, lambda: f"x must be 16-bit (M, K), got {x.dtype} {tuple(x.shape)}")
    check(x.stride(1) == 1, "x must be contiguous along K")
    m, k = x.shape
    check(m <= GEMV_MAX_M, lambda: f"the GEMV kernel takes M ≤ {GEMV_MAX_M}, got {m}")
    kw = _check_weight(w, w_scales, w_format, w_group, k)
    n = w.shape[0]
    if bias is not None:
        check(bias.shape == (n,), lambda: f"bias must be ({n},)")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    s = _scale_arg(w_scales)
    if w_format == "int4b" and m <= ELT_MAX_M:
        args = (x, w, s, bias if bias is not None else out, out, m, n, k, max(w_group, 1), x.stride(0), w.stride(0),
                s.stride(0), out.stride(0))
        meta = dict(W_GROUP=w_group > 0, HAS_BIAS=bias is not None)
        if fixed_config():
            _gemv_int4b_kernel[(m, triton.cdiv(n, 16))](*args, **meta, BN=16, NB=2)
        else:
            _ELT_TUNED[lambda c: (m, triton.cdiv(n, c["BN"]))](*args, **meta)
        return out
    ng = s.shape[1] if w_group else 1
    bm = 16
    args = (x, w, s, bias if bias is not None else out, out, m, n, k, kw, max(w_group, 1), ng,
            x.stride(0), w.stride(0), s.stride(0), out.stride(0))
    meta = dict(FMT=_FMT[w_format], W_GROUP=w_group > 0, HALF_GROUPS=w_group > 0 and w_group % 64 == 0
                and w_format != "fp4", HAS_BIAS=bias is not None, BM=bm, BKH=64)
    if fixed_config():
        _gemv_kernel[(triton.cdiv(n, 32),)](*args, **meta, BN=32)
    else:
        _gemv_tuned(bm)[lambda c: (triton.cdiv(n, c["BN"]),)](*args, **meta)
    return out


def dequantize_weight(w: torch.Tensor, w_scales: torch.Tensor, w_format: str, w_group: int, k: int,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """Triton launcher; same signature and results as :func:`dmq.kernels.reference.weight_only.dequantize_weight`
    (exact: one fp32 product, one rounding)."""
    kw = _check_weight(w, w_scales, w_format, w_group, k)
    check(out_dtype in FLOAT16 + (torch.int8,), lambda: f"out_dtype must be 16-bit or int8, got {out_dtype}")
    check(out_dtype != torch.int8 or w_format != "fp4", "fp4 codes have no int8 form")
    int_sub = w_scales.dtype == torch.uint8 and w_format != "fp4"   # fp4 scales may come as uint8 bits
    check(not int_sub or (out_dtype == torch.int8 and w_format == "int4b" and w_group > 0),
          "integer (two-level) group sub-scales dequantize int4b weights to int8 code · sub only")
    n = w.shape[0]
    out = torch.empty((n, k), dtype=out_dtype, device=w.device)
    if n == 0 or k == 0:
        return out
    s = _scale_arg(w_scales)
    bn = 32
    grid = (triton.cdiv(n, bn), triton.cdiv(k, 128))
    _dequant_kernel[grid](w, s, out, n, k, kw, max(w_group, 1), s.shape[1] if w_group else 1,
                          w.stride(0), s.stride(0), out.stride(0), FMT=_FMT[w_format], W_GROUP=w_group > 0,
                          SCALED=out_dtype != torch.int8, INT_SUB=int_sub,
                          HALF_GROUPS=w_group > 0 and w_group % 64 == 0 and w_format != "fp4", BN=bn, BKH=64,
                          num_warps=4)
    return out

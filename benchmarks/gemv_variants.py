"""W4A16 (int4b, g64) GEMV design variants at the modulation shapes (issue 7's 2.5× GEMV target), in one process:
dmq's CUDA-core kernel (``_gemv_int4b_kernel``, one program per row of x) and an MMA kernel with the decoded weight
as the first operand (``swap``: ``DECODE`` 0 = int→float conversions, 1 = conversion-free fp32 then 16-bit, 2 = 16-bit
magic numbers with an offset correction), each over a few tile configs (the best is kept), against bf16 ``F.linear``
and dmq's ``weight_only_linear`` (which picks a kernel by M). Writes ``benchmarks/results/gemv-variants-<device>.json``.

    python benchmarks/gemv_variants.py
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from common import write_results  # noqa: E402
from kernel_bench import bench, quant_weight, slug  # noqa: E402

from dmq.formats import QuantSpec  # noqa: E402
from dmq.kernels._common import small_int_f32  # noqa: E402
from dmq.kernels.reference import weight_only as rwo  # noqa: E402
from dmq.kernels.triton import weight_only as two  # noqa: E402


@triton.jit
def _swap(x_ptr, w_ptr, ws_ptr, b_ptr, o_ptr, M, N, K, GW, NG, stride_xm, stride_wn, stride_wsn, stride_om,
          DECODE: tl.constexpr, X_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr):
    """out^T (BN, BM) = W (BN, K) @ x^T (K, BM): the decoded weight is the MMA's A operand."""
    on = tl.program_id(0) * BN + tl.arange(0, BN)
    rn = on % N
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BKH)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for k0 in range(0, K, 2 * BKH):
        p = tl.load(w_ptr + rn[:, None] * stride_wn + (k0 // 2 + rk)[None, :])
        k_lo = k0 + rk
        k_hi = k0 + BKH + rk
        xt_lo = tl.load(x_ptr + rm[None, :] * stride_xm + k_lo[:, None], mask=(rm[None, :] < M) & (k_lo[:, None] < K),
                        other=0.0)
        xt_hi = tl.load(x_ptr + rm[None, :] * stride_xm + k_hi[:, None], mask=(rm[None, :] < M) & (k_hi[:, None] < K),
                        other=0.0)
        if DECODE == 0:
            p8 = p.to(tl.int8, bitcast=True)
            d_lo = tl.dot(((p8 << 4) >> 4).to(tl.float32).to(xt_lo.dtype), xt_lo)
            d_hi = tl.dot((p8 >> 4).to(tl.float32).to(xt_lo.dtype), xt_hi)
        elif DECODE == 1:
            pi = p.to(tl.int32)
            d_lo = tl.dot(small_int_f32((pi & 15) ^ 8, 8).to(xt_lo.dtype), xt_lo)
            d_hi = tl.dot(small_int_f32((pi >> 4) ^ 8, 8).to(xt_lo.dtype), xt_hi)
        else:
            pi = p.to(tl.int32)
            if X_BF16:
                lo = (((pi & 15) ^ 8) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                hi = (((pi >> 4) ^ 8) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                off = 136.0
            else:
                lo = (((pi & 15) ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                hi = (((pi >> 4) ^ 8) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                off = 1032.0
            d_lo = tl.dot(lo, xt_lo) - off * tl.sum(xt_lo.to(tl.float32), axis=0)[None, :]
            d_hi = tl.dot(hi, xt_hi) - off * tl.sum(xt_hi.to(tl.float32), axis=0)[None, :]
        g_hi = (k0 + BKH) // GW
        s_lo = tl.load(ws_ptr + rn * stride_wsn + k0 // GW).to(tl.float32)
        s_hi = tl.load(ws_ptr + rn * stride_wsn + g_hi, mask=(rn * 0 + g_hi) < NG, other=0.0).to(tl.float32)
        acc += d_lo * s_lo[:, None] + d_hi * s_hi[:, None]
    acc += tl.load(b_ptr + rn).to(tl.float32)[:, None]
    tl.store(o_ptr + rm[None, :] * stride_om + on[:, None], acc.to(o_ptr.dtype.element_ty),
             mask=(rm[None, :] < M) & (on[:, None] < N))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


rows = []
dev = "cuda"
torch.manual_seed(0)
t0 = time.time()
SWAP = [(bn, w, s) for bn in (64, 128, 256) for w in (4, 8) for s in (3, 5)]
ELT = ((16, 2, 4), (16, 2, 8), (16, 4, 8), (16, 8, 8), (32, 2, 8), (8, 4, 4), (32, 4, 8))
for (m, k, n, dt) in ((1, 3072, 18432, torch.bfloat16), (2, 3072, 18432, torch.bfloat16), (4, 3072, 18432, torch.bfloat16),
                      (8, 3072, 18432, torch.bfloat16), (1, 3072, 18432, torch.float16), (1, 3072, 3072, torch.bfloat16),
                      (1, 1152, 6912, torch.bfloat16)):
    w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
    b = torch.randn(n, device=dev, dtype=dt)
    x = torch.randn(m, k, device=dev, dtype=dt)
    w4, s4 = quant_weight(w.float(), QuantSpec("int4", "group", 64))
    s4 = s4.to(dt).contiguous() if s4.dtype in (torch.float16, torch.bfloat16) else s4
    ref = rwo.weight_only_linear(x, w4, s4, "int4b", 64, b)
    case = f"{m}x{k}x{n}-{str(dt).removeprefix('torch.')}"
    t_bf16 = bench(lambda: F.linear(x, w, b))[0]
    o = torch.empty((m, n), device=dev, dtype=dt)
    found = {"bf16": (t_bf16, "", None),
             "dmq-weight_only_linear": (bench(lambda: two.weight_only_linear(x, w4, s4, "int4b", 64, b))[0], "",
                                        rel(two.weight_only_linear(x, w4, s4, "int4b", 64, b), ref))}
    for bn, nb, nw in ELT:
        def f(bn=bn, nb=nb, nw=nw):
            two._gemv_int4b_kernel[(m, triton.cdiv(n, bn))](x, w4, s4, b, o, m, n, k, 64, x.stride(0), w4.stride(0),
                                                            s4.stride(0), o.stride(0), W_GROUP=True, HAS_BIAS=True,
                                                            BN=bn, NB=nb, num_warps=nw)
        f()
        t, e = bench(f)[0], rel(o, ref)
        if "cuda-core" not in found or t < found["cuda-core"][0]:
            found["cuda-core"] = (t, f"BN={bn},NB={nb},w{nw}", e)
    for dec in (0, 1, 2):
        for bn, nw, st in SWAP:
            def f(bn=bn, nw=nw, st=st):
                _swap[(triton.cdiv(n, bn),)](x, w4, s4, b, o, m, n, k, 64, s4.shape[1], x.stride(0), w4.stride(0),
                                             s4.stride(0), o.stride(0), DECODE=dec, X_BF16=dt == torch.bfloat16,
                                             BM=16, BN=bn, BKH=64, num_warps=nw, num_stages=st)
            f()
            t, e = bench(f)[0], rel(o, ref)
            key = f"mma-swap-decode{dec}"
            if key not in found or t < found[key][0]:
                found[key] = (t, f"BN={bn},w{nw},s{st}", e)
    for variant, (t, cfg, e) in found.items():
        rows.append({"case": case, "variant": variant, "M": m, "K": k, "N": n, "ms": round(t, 5),
                     "ratio_vs_bf16": round(t_bf16 / t, 3), "config": cfg, "rel_err_vs_reference": e})
        print(f"{case:24s} {variant:24s} {t:8.5f} ms  x{t_bf16 / t:5.2f}  {cfg}  {e}", flush=True)
print(f"wrote {write_results(f'gemv-variants-{slug(torch.cuda.get_device_name())}', rows)}  ({time.time() - t0:.0f}s)")

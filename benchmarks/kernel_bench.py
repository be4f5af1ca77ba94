"""Kernel benchmark (H100 targets of issue 7): bf16 cuBLAS, fp8 ``torch._scaled_mm``, dmq w8a8 / w4a8 / w4a4 +
low-rank (group and per-channel, fused, with two LoRAs, unfused, and ablations), and the W4A16 modulation GEMV, at
FLUX / PixArt-Σ / SDXL shapes, all in one process. Prints ratios vs bf16 and as a fraction of the fp8 ceiling
(``_scaled_mm`` on pre-quantized operands), and writes ``benchmarks/results/kernels-<device>.json``.

    python benchmarks/kernel_bench.py                 # everything (CUDA GPU needed)
    python benchmarks/kernel_bench.py --check         # GPU correctness checks vs the references first
    python benchmarks/kernel_bench.py --cases flux_qkv,flux_mod --budget-s 300

Variant names: ``dmq-w4a4-*-r32``: the resident int4 weight is expanded to an int8 workspace per call, then the
int8 (TMA on Hopper) GEMM; ``+2lora`` = rank 32 + 16 + 16; ``-inloop`` = nibbles unpacked inside the GEMM's K loop
(weight tile as the MMA's first operand); ``-unpack`` (w4a8) = the per-call int8 workspace; ``-persistent`` = the
same layer with the persistent TMA GEMM (one program per SM walking the tiles). The layer paths take
``proj_down / smooth`` folded once (``folded_down``), as the layers cache it. The layer path (dmq.kernels.linear,
INT4_GEMM="auto") is ``dmq-w4a4-ch-r32`` without group scales and ``-inloop`` with them; ``abl-*`` = ablations
(quantization with / without the down-projection, unpack alone, GEMM with / without its epilogue, without group
scales).

Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``): GPU time without Python launch overhead,
as under torch.compile + CUDA graphs. Fidelity: SQNR (dB) of each variant's output vs the fp32 float linear
``x·Wᵀ + b`` on 256 rows of the same data (activations with 1% outlier channels).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, gpu_script_args, switched, write_results  # noqa: E402

CASES = [  # name, M, K, N (most important first: a run cut short by --budget-s keeps these)
    ("flux_qkv", 4096, 3072, 9216),
    ("flux_mod", 1, 3072, 18432),
    ("pixart_mlp_cfg", 8192, 1152, 4608),
    ("sdxl_attn_cfg", 8192, 640, 640),
    ("flux_mlp_up", 4096, 3072, 12288),
    ("flux_mlp_down", 4096, 12288, 3072),
    ("flux_single_in", 4608, 3072, 12288),
    ("flux_single_out", 4608, 15360, 3072),
    ("flux_text_qkv", 512, 3072, 9216),
    ("pixart_attn_cfg", 8192, 1152, 1152),
    ("sdxl_attn2_cfg", 2048, 1280, 1280),
    ("sdxl_ff_up_cfg", 2048, 1280, 10240),
    ("sdxl_ff_down_cfg", 2048, 5120, 1280),
    ("small_m", 256, 3072, 3072),
    ("flux_mod_m2", 2, 3072, 18432),
]
FID_ROWS = 256


def slug(name: str) -> str:
    m = re.search(r"\b([HhAaBbLl]\d{2,3})\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def bench(fn) -> tuple[float, str]:
    import triton

    fn()
    torch.cuda.synchronize()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20)), "cudagraph"
    except Exception as e:  # noqa: BLE001 - fall back to event timing, and say so
        print(f"   (cudagraph timing failed: {type(e).__name__}: {str(e)[:80]}; using events)")
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=60)), "events"


def sqnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    err = (y.float() - ref.float()).pow(2).sum().item()
    return float("inf") if err == 0 else 10 * math.log10(ref.float().pow(2).sum().item() / err)


def best_config(tuned) -> str | None:
    cfg = getattr(tuned, "best_config", None)
    if cfg is None:
        return None
    kw = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw},w{cfg.num_warps},s{cfg.num_stages}"


# -- data ------------------------------------------------------------------------------------------------------------------
def make_data(m, k, n, dev):
    g = torch.Generator(device=dev).manual_seed(k * 7 + n)
    x = torch.randn(m, k, device=dev, generator=g)
    idx = torch.randperm(k, device=dev, generator=g)[: max(1, k // 100)]
    x[:, idx] *= 20
    w = torch.randn(n, k, device=dev, generator=g) / math.sqrt(k)
    b = torch.randn(n, device=dev, generator=g) * 0.1
    return x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16)


def quant_weight(w32, spec):
    from dmq.formats import quantize
    from dmq.kernels.layouts import int4_to_blocked

    n, k = w32.shape
    q = quantize(w32.reshape(n, 1, k), spec)
    codes = q.codes.reshape(n, -1)
    if spec.dtype == "int4":
        return int4_to_blocked(codes, k), q.scales.contiguous()
    return codes.contiguous(), q.scales.contiguous()


def svd_parts(x, w, rank):
    """SmoothQuant-style smoothing (alpha 0.5) and a rank-``rank`` SVD branch of the smoothed weight."""
    torch.manual_seed(0)
    ax = x.float().abs().amax(0).clamp(min=1e-5)
    aw = w.float().abs().amax(0).clamp(min=1e-5)
    smooth = (ax.sqrt() / aw.sqrt()).clamp(1e-2, 1e2).to(torch.float16)
    ws = w.float() * smooth.float()[None, :]
    u, s, v = torch.svd_lowrank(ws, q=rank + 8, niter=2)
    pd = (v[:, :rank] * s[:rank]).to(torch.bfloat16).contiguous()            # (K, r)
    pu = u[:, :rank].T.to(torch.bfloat16).contiguous()                        # (r, N)
    resid = ws - (pd.float() @ pu.float()).T
    return smooth, pd, pu, resid


# -- variants --------------------------------------------------------------------------------------------------------------
def gemm_variants(m, k, n, dev):
    from dmq.formats import QuantSpec, padded_channels, quantize
    from dmq.kernels import ops
    from dmq.kernels._common import fold_down
    from dmq.kernels.layouts import int4_to_blocked
    from dmq.kernels.triton import gemm as tg
    from dmq.kernels.triton import quant_act as tq

    x, w, b = make_data(m, k, n, dev)
    w32 = w.float()
    v = {}   # name -> (fn(x) -> y, fidelity?, bytes/param, which tuned kernel)
    v["bf16"] = (lambda xx: F.linear(xx, w, b), True, 2.0, None)

    # fp8 ceiling: cuBLAS on pre-quantized operands; and the full dmq fp8 path
    w8 = quant_weight(w32, QuantSpec("fp8_e4m3", "channel"))
    a8, sa8, _ = tq.quantize_act(x, None, None, "fp8_e4m3", 0, False)
    sb = w8[1].float()[None, :]
    v["fp8-scaled_mm-ceiling"] = (lambda xx: torch._scaled_mm(a8, w8[0].t(), scale_a=sa8[:, None], scale_b=sb,
                                                              out_dtype=torch.bfloat16), False, 1.0, None)
    v["dmq-fp8"] = (lambda xx: ops.fp8_linear(xx, w8[0], w8[1], b), True, 1.0, None)

    wi8 = quant_weight(w32, QuantSpec("int8", "channel"))
    v["dmq-w8a8"] = (lambda xx: ops.quantized_linear(xx, None, None, None, wi8[0], wi8[1], "int8", 0, b, "int8", 0),
                     True, 1 + 4 / k, "tma")
    w48 = quant_weight(w32, QuantSpec("int4", "group", 128))

    def unpack(wt, ws, wg, kk=k):
        """int4b → int8 codes (N, kk): the unpack-per-call path (kk = the activation codes' padded K)."""
        return ops.dequantize_weight(wt, ws, "int4b", wg, kk, torch.int8)

    v["dmq-w4a8-g128-inloop"] = (lambda xx: ops.quantized_linear(xx, None, None, None, w48[0], w48[1], "int4b", 128,
                                                                 b, "int8", 0), True, 0.5 + 2 / 128,
                                 "int4b_swap_group")
    v["dmq-w4a8-g128-unpack"] = (lambda xx: ops.quantized_linear(xx, None, None, None, unpack(w48[0], w48[1], 128),
                                                                 w48[1], "int8", 128, b, "int8", 0), True,
                                 0.5 + 2 / 128, "tma_64")
    smooth, pd, pu, resid = svd_parts(x[:FID_ROWS * 4], w, 32)
    g2 = torch.Generator(device=dev).manual_seed(1)
    pd64 = torch.cat([pd, (torch.randn(k, 32, device=dev, generator=g2) * 0.02).to(pd.dtype)], 1).contiguous()
    pu64 = torch.cat([pu, (torch.randn(32, n, device=dev, generator=g2) * 0.02).to(pu.dtype)], 0).contiguous()
    folded = {32: fold_down(smooth, pd, x.dtype), 64: fold_down(smooth, pd64, x.dtype)}   # as the layers cache it
    branch = lambda r: r * (k + n) * 2 / (k * n)  # noqa: E731
    for tag, spec, ag in (("ch", QuantSpec("int4", "channel"), 0), ("g64", QuantSpec("int4", "group", 64), 64)):
        wq, wsc = quant_weight(resid, spec)
        kp_a = padded_channels(QuantSpec("int4", "group", 64) if ag else QuantSpec("int4", "token"), k)
        wg = 64 if ag else 0
        bpp = 0.5 + (2 / 64 if ag else 4 / k)
        tk = "tma_64" if ag else "tma"

        def layer_path(pdr, pur, wq=wq, wsc=wsc, wg=wg, ag=ag, kp_a=kp_a):
            """Unpack the resident int4 weight to an int8 workspace, quantize + down-project, int8 GEMM with the
            up-projection in its epilogue (the layer path for per-channel w4a4)."""
            return lambda xx: ops.quantized_linear(xx, smooth, None, pur, unpack(wq, wsc, wg, kp_a), wsc, "int8", wg,
                                                   b, "int4", ag, folded_down=folded[pdr.shape[1]])
        v[f"dmq-w4a4-{tag}-r32"] = (layer_path(pd, pu), True, bpp + branch(32), tk)
        v[f"dmq-w4a4-{tag}-r32+2lora"] = (layer_path(pd64, pu64), False, bpp + branch(64), tk)
        v[f"dmq-w4a4-{tag}-r32-inloop"] = (
            (lambda wq, wsc, wg, ag: lambda xx: ops.quantized_linear(xx, smooth, pd, pu, wq, wsc, "int4b", wg, b,
                                                                     "int4", ag))(wq, wsc, wg, ag),
            True, bpp + branch(32), "int4b_swap_group" if ag else "int4b_swap")

        def unfused(xx, wq=wq, wsc=wsc, wg=wg, ag=ag, kp_a=kp_a):  # noqa: E306
            y = ops.quantized_linear(xx, smooth, None, None, unpack(wq, wsc, wg, kp_a), wsc, "int8", wg, b, "int4", ag)
            lr = (xx / smooth.to(xx.dtype)) @ pd
            return y + lr @ pu
        v[f"dmq-w4a4-{tag}-r32-unfused"] = (unfused, True, bpp + branch(32), tk)

        # ablations on pre-quantized activations / pre-unpacked weights
        codes, sc, lr = tq.quantize_act(x, smooth, pd, "int4", ag, False)
        w8c = unpack(wq, wsc, wg, kp_a)
        v[f"abl-{tag}-quant+down-only"] = ((lambda ag: lambda xx: (
            tq.quantize_act(xx, smooth, None, "int4", ag, False), xx @ folded[32]))(ag), False, None, None)
        v[f"abl-{tag}-quant-only"] = ((lambda ag: lambda xx: tq.quantize_act(xx, smooth, None, "int4", ag, False))
                                      (ag), False, None, None)
        v[f"abl-{tag}-unpack-only"] = ((lambda wq, wsc, wg, kp_a: lambda xx: unpack(wq, wsc, wg, kp_a))
                                       (wq, wsc, wg, kp_a), False, None, None)
        v[f"abl-{tag}-gemm+epilogue"] = ((lambda w8c, wsc, wg, ag, codes, sc, lr: lambda xx: tg.gemm_int(
            codes, sc, w8c, wsc, "int8", ag, wg, lr, pu, b, torch.bfloat16))(w8c, wsc, wg, ag, codes, sc, lr),
            False, None, tk)
        v[f"abl-{tag}-gemm-no-epilogue"] = ((lambda w8c, wsc, wg, ag, codes, sc: lambda xx: tg.gemm_int(
            codes, sc, w8c, wsc, "int8", ag, wg, None, None, None, torch.bfloat16))(w8c, wsc, wg, ag, codes, sc),
            False, None, tk)
        if ag:
            # same codes, scales collapsed to one per row / column: what the in-loop group scales cost
            sa1, sw1 = sc[:, 0].float().contiguous(), wsc[:, 0].float().contiguous()
            v["abl-g64-gemm-no-epilogue-no-scales"] = ((lambda w8c, codes, sa1, sw1: lambda xx: tg.gemm_int(
                codes, sa1, w8c, sw1, "int8", 0, 0, None, None, None, torch.bfloat16))(w8c, codes, sa1, sw1),
                False, None, "tma")
    # two-level int4 g64 on both sides (dmq.formats.QuantSpec.two_level): the resident 4-bit weight is expanded to
    # int8 code · sub per call and the per-token × per-channel int8 GEMM runs with no scales in its K loop
    spec2 = QuantSpec("int4", "group", 64, two_level=True)
    q2 = quantize(resid.reshape(n, 1, k), spec2)
    wq2, sub2, s2w = int4_to_blocked(q2.codes.reshape(n, -1), k), q2.scales.contiguous(), q2.scale2.contiguous()
    kp2 = padded_channels(spec2, k)
    bpp2 = 0.5 + 1 / 64 + 4 / k
    expand2 = lambda: ops.dequantize_weight(wq2, sub2, "int4b", 64, kp2, torch.int8)  # noqa: E731

    def path2(pdr, pur):
        return lambda xx: ops.quantized_linear(xx, smooth, None, pur, expand2(), s2w, "int8", 0, b, "int4_2l", 64,
                                               folded_down=folded[pdr.shape[1]])
    v["dmq-w4a4-2l-r32"] = (path2(pd, pu), True, bpp2 + branch(32), "tma")
    v["dmq-w4a4-2l-r32-persistent"] = (persistent(path2(pd, pu)), False, bpp2 + branch(32), "tma_persistent")
    v["dmq-w8a8-persistent"] = (persistent(v["dmq-w8a8"][0]), False, 1 + 4 / k, "tma_persistent")
    v["dmq-w4a4-2l-r32+2lora"] = (path2(pd64, pu64), False, bpp2 + branch(64), "tma")
    v["abl-2l-quant+down-only"] = (lambda xx: (tq.quantize_act(xx, smooth, None, "int4_2l", 64, False),
                                               xx @ folded[32]), False, None, None)
    v["abl-2l-unpack-only"] = (lambda xx: expand2(), False, None, None)
    return x, w, b, v


def persistent(fn):
    """``fn`` run with the persistent TMA GEMM (dmq.kernels.triton.gemm.PERSISTENT)."""
    from dmq.kernels.triton import gemm as tg

    def run(xx):
        with switched(tg, "PERSISTENT", True):
            return fn(xx)
    return run


def run_gemm_case(name, m, k, n, dev, rows):
    from dmq.kernels.triton import gemm as tg

    x, w, b, variants = gemm_variants(m, k, n, dev)
    xf = x[:FID_ROWS]
    y_ref = xf.float() @ w.float().T + b.float()
    t_bf16 = t_fp8 = None
    for vname, (fn, fid, bpp, tuned) in variants.items():
        try:
            ms, timer = bench(lambda: fn(x))
        except Exception as e:  # noqa: BLE001 - record and go on
            print(f"{name:18s} {vname:38s} FAILED: {type(e).__name__}: {str(e)[:200]}")
            rows.append({"case": name, "variant": vname, "M": m, "K": k, "N": n, "error": str(e)[:300]})
            continue
        if vname == "bf16":
            t_bf16 = ms
        if vname == "fp8-scaled_mm-ceiling":
            t_fp8 = ms
        row = {"case": name, "variant": vname, "M": m, "K": k, "N": n, "ms": round(ms, 5),
               "ratio_vs_bf16": round(t_bf16 / ms, 3) if t_bf16 else None,
               "frac_of_fp8": round(t_fp8 / ms, 3) if t_fp8 else None, "timer": timer}
        if bpp is not None:
            row["bytes_per_param"] = round(bpp, 4)
        if fid:
            row["sqnr_db"] = round(sqnr(fn(x)[:FID_ROWS], y_ref), 2)
        if tuned:
            row["config"] = best_config(tg._TUNED[tuned])
        rows.append(row)
        print(f"{name:18s} {vname:38s} {ms:8.4f} ms  x{row['ratio_vs_bf16'] or 0:5.2f} bf16  "
              f"{row['frac_of_fp8'] or 0:5.2f} of fp8  {row.get('sqnr_db', '')}")
    del x, w, b, variants
    torch.cuda.empty_cache()


def run_gemv_case(name, m, k, n, dev, rows):
    from dmq.formats import QuantSpec
    from dmq.kernels import ops
    from dmq.kernels.triton import weight_only as two

    x, w, b = make_data(m, k, n, dev)
    y_ref = x.float() @ w.float().T + b.float()
    w4 = quant_weight(w.float(), QuantSpec("int4", "group", 64))
    w8 = quant_weight(w.float(), QuantSpec("int8", "channel"))
    variants = {"bf16": (lambda: F.linear(x, w, b), 2.0),
                "dmq-w4a16-g64-gemv": (lambda: ops.weight_only_linear(x, w4[0], w4[1], "int4b", 64, b),
                                       0.5 + 2 / 64),
                "dmq-w8a16-ch-gemv": (lambda: ops.weight_only_linear(x, w8[0], w8[1], "int8", 0, b), 1 + 4 / k)}
    t_bf16 = None
    for vname, (fn, bpp) in variants.items():
        ms, timer = bench(fn)
        t_bf16 = t_bf16 or ms
        gbs = (n * k * bpp) / (ms * 1e-3) / 1e9
        row = {"case": name, "variant": vname, "M": m, "K": k, "N": n, "ms": round(ms, 5),
               "ratio_vs_bf16": round(t_bf16 / ms, 3), "frac_of_fp8": None, "timer": timer,
               "bytes_per_param": round(bpp, 4), "weight_GBps": round(gbs, 1), "sqnr_db": round(sqnr(fn(), y_ref), 2)}
        if vname != "bf16":
            row["config"] = best_config(two._ELT_TUNED if "w4" in vname and m <= two.ELT_MAX_M
                                        else two._GEMV_TUNED.get(16))
        rows.append(row)
        print(f"{name:18s} {vname:38s} {ms:8.4f} ms  x{row['ratio_vs_bf16']:5.2f} bf16  {gbs:7.0f} GB/s  "
              f"{row['sqnr_db']}")


# -- GPU correctness checks ----------------------------------------------------------------------------------------------
def run_checks(dev, rows):
    """Triton vs reference on the GPU at odd shapes, bf16 included (the CPU interpreter cannot check bf16).
    Autotuning is off here (one fixed config per kernel) to keep compile time short."""
    os.environ["DMQ_KERNELS_NO_AUTOTUNE"] = "1"
    try:
        _run_checks(dev, rows)
    finally:
        del os.environ["DMQ_KERNELS_NO_AUTOTUNE"]


def _run_checks(dev, rows):
    from dmq.formats import QuantSpec, quantize
    from dmq.kernels import linear as kl
    from dmq.kernels import ops
    from dmq.kernels.dispatch import find_kernel
    from dmq.kernels.layouts import int4_to_blocked
    from dmq.kernels.reference import fp8 as rfp8
    from dmq.kernels.reference import gemm as rg
    from dmq.kernels.reference import nvfp4 as rnv
    from dmq.kernels.reference import quant_act as rq
    from dmq.kernels.reference import weight_only as rwo
    from dmq.kernels.triton import fp8 as tfp8
    from dmq.kernels.triton import gemm as tg
    from dmq.kernels.triton import nvfp4 as tnv
    from dmq.kernels.triton import quant_act as tq
    from dmq.kernels.triton import weight_only as two
    from dmq.nn.conv import QuantConv2d
    from dmq.nn.linear import QuantLinear

    def rel(a, b):
        a, b = a.float(), b.float()
        return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()

    def record(name, ok, err=None):
        rows.append({"case": "gpu_check", "variant": name, "passed": bool(ok),
                     "max_rel_err": None if err is None else float(f"{err:.3g}")})
        print(f"check {name:50s} {'PASS' if ok else 'FAIL'} {'' if err is None else f'{err:.2e}'}")

    def guard(name, f):
        try:
            f()
        except Exception as e:  # noqa: BLE001
            rows.append({"case": "gpu_check", "variant": name, "passed": False, "error": str(e)[:300]})
            print(f"check {name:50s} ERROR {type(e).__name__}: {str(e)[:300]}")

    for dt in (torch.bfloat16,):     # fp16 is checked bit-for-bit by tests/test_kernels.py on the CPU
        dn = str(dt).split(".")[-1]
        for m, k in ((1, 37), (37, 300), (130, 3072)):
            x = (torch.randn(m, k, device=dev) * 2).to(dt)
            sm = (torch.rand(k, device=dev) + .5).half()
            pd = (torch.randn(k, 48, device=dev) / 8).to(dt)
            for qd, g, pk in (("int4", 64, False), ("int4", 0, True), ("int8", 0, False), ("fp8_e4m3", 0, False)):
                def f(m=m, k=k, x=x, qd=qd, g=g, pk=pk):
                    a = tq.quantize_act(x, sm, pd, qd, g, pk)
                    r = rq.quantize_act(x, sm, pd, qd, g, pk)
                    cv = (lambda t: t.view(torch.uint8)) if qd.startswith("fp8") else (lambda t: t)
                    ok = torch.equal(cv(a[0]), cv(r[0])) and torch.equal(a[1], r[1])
                    e = rel(a[2], r[2])
                    record(f"quant_act {dn} {qd} g{g} p{int(pk)} M{m} K{k}", ok and e < 1e-2, e)
                guard(f"quant_act {dn} {qd} M{m}", f)
        for m, k, n, fmt, ag, wg, r in ((1, 64, 37, "int8", 0, 0, 0), (37, 200, 50, "int4b", 64, 64, 24),
                                        (130, 3072, 300, "int4b", 0, 0, 32), (130, 1152, 200, "int4b", 0, 128, 0),
                                        (130, 1152, 200, "int8", 64, 0, 16), (300, 3072, 1000, "int8", 0, 0, 64),
                                        (300, 3072, 1000, "int8", 64, 64, 32), (130, 1152, 200, "int8", 0, 128, 0)):
            def f(m=m, k=k, n=n, fmt=fmt, ag=ag, wg=wg, r=r):
                qa = 8 if (fmt == "int4b" or ag) else 128
                a = torch.randint(-qa, qa, (m, k), dtype=torch.int8, device=dev)
                wc = torch.randint(-8 if fmt == "int4b" else -128, 8 if fmt == "int4b" else 128, (n, k),
                                   dtype=torch.int8, device=dev)
                from dmq.formats import pack_nibbles
                wt = int4_to_blocked(pack_nibbles(F.pad(wc, (0, k % 2)))) if fmt == "int4b" else wc
                nrm = 1 / (qa * 16 * k ** .5)
                a_s = ((torch.rand(m, -(-k // ag), device=dev) + .5) * nrm).half() if ag else \
                    (torch.rand(m, device=dev) + .5) * nrm
                w_s = (torch.rand(n, -(-k // wg), device=dev) + .5).half() if wg else torch.rand(n, device=dev) + .5
                lr = torch.randn(m, r, device=dev).to(dt) if r else None
                up = (torch.randn(r, n, device=dev) / 4).to(dt) if r else None
                bias = torch.randn(n, device=dev).to(dt)
                y = tg.gemm_int(a, a_s, wt, w_s, fmt, ag, wg, lr, up, bias, dt)
                yr = rg.gemm_int(a, a_s, wt, w_s, fmt, ag, wg, lr, up, bias, dt)
                e = rel(y, yr)
                record(f"gemm {dn} {fmt} a{ag} w{wg} r{r} {m}x{k}x{n}", e < 1e-2, e)
                if fmt == "int4b":
                    e = rel(tg.gemm_int(a, a_s, wt, w_s, fmt, ag, wg, lr, up, bias, dt, swap=True), yr)
                    record(f"gemm-swap {dn} {fmt} a{ag} w{wg} r{r} {m}x{k}x{n}", e < 1e-2, e)
            guard(f"gemm {dn} {fmt} {m}x{k}x{n}", f)
        for spec in (QuantSpec("int4", "group", 64), QuantSpec("int8", "channel"), QuantSpec("nvfp4", "group", 16)):
            def f(spec=spec):
                n, k = 300, 3072
                q = quantize(torch.randn(n, 1, k, device=dev), spec)
                wt = q.codes.reshape(n, -1)
                fmt = {"int4": "int4b", "int8": "int8", "nvfp4": "fp4"}[spec.dtype]
                wt = int4_to_blocked(wt, k) if fmt == "int4b" else wt
                g = spec.group_size or 0
                ok = torch.equal(two.dequantize_weight(wt, q.scales, fmt, g, k, dt),
                                 rwo.dequantize_weight(wt, q.scales, fmt, g, k, dt))
                record(f"dequant {dn} {spec.describe()}", ok)
                if fmt != "fp4":
                    for m in (1, 3, 8, 16):
                        x = torch.randn(m, k, device=dev).to(dt)
                        e = rel(two.weight_only_linear(x, wt, q.scales, fmt, g, None),
                                rwo.weight_only_linear(x, wt, q.scales, fmt, g, None))
                        record(f"gemv {dn} {spec.describe()} M{m}", e < 1e-2, e)
            guard(f"weight-only {dn} {spec.describe()}", f)

        def f_nv():
            m, k, n = 130, 1000, 200
            x = torch.randn(m, k, device=dev).to(dt)
            q = quantize(torch.randn(n, 1, k, device=dev), QuantSpec("nvfp4", "group", 16))
            sm = (torch.rand(k, device=dev) + .5).half()
            am = rnv.nvfp4_amax(x, sm)
            a, r = tnv.nvfp4_quantize(x, sm, am), rnv.nvfp4_quantize(x, sm, am)
            ok = torch.equal(a[0], r[0]) and torch.equal(a[1].view(torch.uint8), r[1].view(torch.uint8))
            record(f"nvfp4_quantize {dn}", ok)
            args = (x, sm, None, None, q.codes.reshape(n, -1), q.scales, q.scale2, None)
            e = rel(tnv.nvfp4_linear(*args), rnv.nvfp4_linear(*args))
            record(f"nvfp4_linear {dn}", e < 1e-2, e)
        guard(f"nvfp4 {dn}", f_nv)

        def f_fp8():
            lin = torch.nn.Linear(1024, 512).to(dev, dt)
            layer = QuantLinear.from_module(lin, QuantSpec("fp8_e4m3", "channel"), QuantSpec("fp8_e4m3", "token"))
            x = torch.randn(77, 1024, device=dev).to(dt)
            e = rel(tfp8.fp8_linear(x, layer.qweight, layer.wscales, layer.bias),
                    rfp8.fp8_linear(x, layer.qweight, layer.wscales, layer.bias))
            record(f"fp8_linear {dn}", e < 3e-2, e)
        guard(f"fp8 {dn}", f_fp8)

        # layers through dispatch vs their reference forward
        presets = {"w8a8": (QuantSpec("int8", "channel"), QuantSpec("int8", "token")),
                   "w4a8": (QuantSpec("int4", "group", 128), QuantSpec("int8", "token")),
                   "w4a4": (QuantSpec("int4", "group", 64), QuantSpec("int4", "group", 64)),
                   "w4a16": (QuantSpec("int4", "group", 64), None),
                   "fp8": (QuantSpec("fp8_e4m3", "channel"), QuantSpec("fp8_e4m3", "token")),
                   "nvfp4": (QuantSpec("nvfp4", "group", 16), QuantSpec("nvfp4", "group", 16)),
                   "w4a4-2l": (QuantSpec("int4", "group", 64, two_level=True),
                               QuantSpec("int4", "group", 64, two_level=True))}
        for pname, (ws, acts) in presets.items():
            for m in (1, 37, 600):
                def f(pname=pname, ws=ws, acts=acts, m=m):
                    k = 1024 if pname == "fp8" else 1000       # cuBLAS fp8 needs K % 16 == 0
                    lin = torch.nn.Linear(k, 400).to(dev, dt)
                    layer = QuantLinear.from_module(lin, ws, acts)
                    x = torch.randn(2, m, k, device=dev).to(dt)
                    assert find_kernel(layer, x) is not None, "no kernel dispatched"
                    e = rel(layer(x), layer.reference_forward(x))
                    record(f"layer {pname} {dn} x(2,{m},{k})", e < 2e-2, e)
                guard(f"layer {pname} {dn} M{m}", f)
        for acts in (QuantSpec("int8", "token"), QuantSpec("int4", "group", 64), None):
            def f(acts=acts):
                conv = torch.nn.Conv2d(320, 192, 3, padding=1).to(dev, dt)
                layer = QuantConv2d.from_module(conv, QuantSpec("int4", "group", 64), acts)
                x = torch.randn(2, 320, 17, 13, device=dev).to(dt)
                assert find_kernel(layer, x) is not None, "no kernel dispatched"
                e = rel(layer(x), layer.reference_forward(x))
                record(f"conv {dn} {acts.describe() if acts else 'weight-only'}", e < 2e-2, e)
            guard(f"conv {dn}", f)
        two_level = QuantSpec("int4", "group", 64, two_level=True)
        for ws, acts in ((QuantSpec("int8", "channel"), QuantSpec("int8", "token")), (two_level, two_level)):
            def f(ws=ws, acts=acts):
                # the implicit-GEMM conv (TMA windows at negative and past-the-end rows of 17 x 13 images), then the
                # quantizer reading 16 x 24 NCHW images in place against their channels-last view
                layer = QuantConv2d.from_module(torch.nn.Conv2d(320, 192, 3, padding=1).to(dev, dt), ws, acts)
                x = torch.randn(2, 320, 17, 13, device=dev).to(dt)
                y_im2col = layer(x)
                with switched(kl, "IMPLICIT_CONV", True):
                    y = layer(x)
                e = rel(y, layer.reference_forward(x))
                record(f"conv {dn} implicit {acts.describe()}", e < 2e-2 and torch.equal(y, y_im2col), e)
                x = torch.randn(2, 320, 16, 24, device=dev).to(dt)
                y = layer(x)
                e = rel(y, layer.reference_forward(x))
                same = torch.equal(y, layer(x.contiguous(memory_format=torch.channels_last)))
                record(f"conv {dn} planar quantizer {acts.describe()}", e < 2e-2 and same, e)
            guard(f"conv {dn} implicit / planar", f)
        for pname in ("w8a8", "w4a4-2l"):
            def f_persistent(pname=pname):   # the persistent TMA GEMM: the same bits as one tile per program
                layer = QuantLinear.from_module(torch.nn.Linear(3072, 1000).to(dev, dt), *presets[pname])
                x = torch.randn(1000, 3072, device=dev).to(dt)
                want = layer(x)
                with switched(tg, "PERSISTENT", True):
                    got = layer(x)
                e = rel(got, layer.reference_forward(x))
                record(f"layer {pname} {dn} persistent GEMM", e < 2e-2 and torch.equal(got, want), e)
            guard(f"layer {pname} {dn} persistent", f_persistent)

    def f_compile():
        k, n = 1024, 512
        x = torch.randn(4, 100, k, device=dev).to(torch.bfloat16)
        q = quantize(torch.randn(n, 1, k, device=dev), QuantSpec("int4", "group", 64))
        wt = int4_to_blocked(q.codes.reshape(n, -1), k)
        sm = (torch.rand(k, device=dev) + .5).half()
        pd = (torch.randn(k, 32, device=dev) / 8).bfloat16()
        pu = (torch.randn(32, n, device=dev) / 8).bfloat16()

        def fn(x):
            return torch.nn.functional.gelu(ops.fused_w4a4_lowrank(x, sm, pd, pu, wt, q.scales, None, 64))

        torch._dynamo.reset()
        ref = fn(x)
        t0 = time.time()
        got = torch.compile(fn, fullgraph=True)(x)
        e = rel(got, ref)
        record(f"torch.compile(fullgraph=True) fused op ({time.time() - t0:.0f}s)", e < 1e-2, e)
    guard("torch.compile", f_compile)


def _options(ap) -> None:
    ap.add_argument("--check", action="store_true", help="GPU correctness checks before timing")
    ap.add_argument("--check-last", action="store_true", help="GPU correctness checks after timing")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after this many seconds")


def main() -> None:
    args = gpu_script_args(__doc__, "kernel_bench.py", _options)
    import dmq.kernels.linear  # noqa: F401 - registers the layer kernels

    try:
        import diffusers  # noqa: F401 - the results file records its version
    except ImportError:
        import types

        sys.modules["diffusers"] = types.SimpleNamespace(__version__="not installed")
    dev = torch.device("cuda")
    t0 = time.time()
    name = f"kernels-{slug(device_name())}"
    rows: list[dict] = []
    print(f"{device_name()}  torch {torch.__version__}")
    if args.check:
        run_checks(dev, rows)
        write_results(name, rows, Path(args.results_dir))
    if not args.no_bench:
        for cname, m, k, n in CASES:
            if args.wanted and cname not in args.wanted:
                continue
            if time.time() - t0 > args.budget_s:
                print(f"budget reached: skipping {cname}")
                rows.append({"case": cname, "variant": "skipped", "M": m, "K": k, "N": n, "error": "time budget"})
                continue
            t1 = time.time()
            (run_gemv_case if m <= 16 else run_gemm_case)(cname, m, k, n, dev, rows)
            print(f"-- {cname} took {time.time() - t1:.0f}s (total {time.time() - t0:.0f}s)")
            write_results(name, rows, Path(args.results_dir))
    if args.check_last:
        run_checks(dev, rows)
    path = write_results(name, rows, Path(args.results_dir))
    print(f"wrote {path}  ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()

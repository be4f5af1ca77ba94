"""Quantized 3×3 convolutions at SDXL's shapes (1024², classifier-free guidance: batch 2) on a GPU: how the
per-(pixel, tap) activation scales of the im2col GEMM are applied (``dmq.kernels.triton.gemm.GROUP_RUNS``: per K
step, or once per run of Cin columns), against the same GEMM with per-row scales (no
scales in the K loop), a bf16 cuBLAS GEMM of the same shape and the bf16 cuDNN convolution; the im2col of the int8
codes by dmq's Triton kernel and by PyTorch's strided copy (the reference); then whole ``QuantConv2d`` layers
(w8a8 and two-level W4A4 with a rank-32 branch: quantization, im2col, GEMM; or, ``-implicit``, the implicit-GEMM
kernel ``conv_gemm_int`` without im2col) against cuDNN (NCHW and channels-last inputs), each layer's GPU time per
kernel (profiler), and the per-pixel activation quantizer reading the NCHW input in place against a copy to NHWC
rows first (``quant-*`` rows).

    python benchmarks/conv_gemm.py            # → benchmarks/results/conv-gemm-<device>.json

Times are CUDA-graph replays (median); ratios are bf16 cuDNN time / variant time (> 1 is faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, gpu_script_args, write_results  # noqa: E402
from kernel_bench import bench, slug  # noqa: E402

CASES = [  # name, Cin, Cout, H = W (batch 2)
    ("down0_320", 320, 320, 128),
    ("up0_640_320", 640, 320, 128),
    ("down1_640", 640, 640, 64),
    ("down2_1280", 1280, 1280, 32),
    ("up2_2560_1280", 2560, 1280, 32),
]
RUN_MODES = {0: "per-step", 1: "runs"}


def gemm_rows(name: str, cin: int, cout: int, hw: int, dev, t_conv: float) -> list[dict]:
    from dmq.kernels.reference import im2col as ri2c
    from dmq.kernels.triton import gemm as tg
    from dmq.kernels.triton import im2col as ti2c

    m, k, n = 2 * hw * hw, 9 * cin, cout
    g = torch.Generator(device=dev).manual_seed(cin + cout)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev, generator=g)
    a_tap = (torch.rand(m, 9, device=dev, generator=g) + 0.5).half() * 1e-3
    a_row = a_tap.float().mean(1)
    w_s = torch.rand(n, device=dev, generator=g) + 0.5
    a16, w16 = a.bfloat16(), w.bfloat16()
    variants = {"bf16-gemm": lambda: a16 @ w16.T,
                "dmq-gemm-per-row-scales": lambda: tg.gemm_int(a, a_row, w, w_s, "int8", 0, 0, None, None, None,
                                                               torch.bfloat16)}
    for mode, label in RUN_MODES.items():
        def run(mode=mode):
            tg.GROUP_RUNS = mode
            return tg.gemm_int(a, a_tap, w, w_s, "int8", cin, 0, None, None, None, torch.bfloat16)
        variants[f"dmq-gemm-tap-scales-{label}"] = run
    ref = variants["dmq-gemm-tap-scales-per-step"]().float()
    rows = []
    for vname, fn in variants.items():
        ms, timer = bench(fn)
        row = {"case": name, "variant": vname, "M": m, "K": k, "N": n, "ms": round(ms, 5),
               "ratio_vs_cudnn": round(t_conv / ms, 3), "timer": timer}
        if vname.startswith("dmq-gemm-tap"):
            row["max_rel_diff_vs_per_step"] = float(f"{((fn().float() - ref).abs().max() / ref.abs().max()):.3g}")
        rows.append(row)
    tg.GROUP_RUNS = 1
    codes = a[:, :cin].reshape(2, hw, hw, cin).contiguous()
    pix_scales = a_tap[:, 4].float().reshape(2, hw, hw).contiguous()
    ms, timer = bench(lambda: tg.conv_gemm_int(codes, pix_scales, w, w_s, 3, 3, 1, 1, 1, 1, None, None, None,
                                               torch.bfloat16))
    rows.append({"case": name, "variant": "dmq-conv-gemm-implicit", "M": m, "K": k, "N": n, "ms": round(ms, 5),
                 "ratio_vs_cudnn": round(t_conv / ms, 3), "timer": timer})
    for vname, fn in (("im2col-codes-triton", ti2c.im2col), ("im2col-codes-torch", ri2c.im2col)):
        ms, timer = bench(lambda fn=fn: fn(codes, 3, 3, 1, 1, 1, 1, 1, 1))
        rows.append({"case": name, "variant": vname, "M": m, "K": k, "N": n, "ms": round(ms, 5),
                     "ratio_vs_cudnn": round(t_conv / ms, 3), "timer": timer, "out_GBps": round(m * k / ms / 1e6)})
    return rows


def layer_rows(name: str, cin: int, cout: int, hw: int, dev, x, t_conv: float) -> list[dict]:
    from dmq.formats import QuantSpec
    from dmq.kernels import linear as klinear
    from dmq.kernels.triton import gemm as tg
    from dmq.nn.conv import QuantConv2d
    from dmq.nn.svdquant import SVDQuantConv2d

    conv = torch.nn.Conv2d(cin, cout, 3, padding=1).to(dev, torch.bfloat16)
    spec2 = QuantSpec("int4", "group", 64, two_level=True)
    layers = {"w8a8": QuantConv2d.from_module(conv, QuantSpec("int8", "channel"), QuantSpec("int8", "token")),
              "svdquant-w4a4-2l-r32": SVDQuantConv2d.from_module(conv, spec2, spec2, rank=32)}
    y_ref = conv(x).float()
    rows = []
    for lname, layer in layers.items():
        for label, mode, implicit in (*((lb, md, False) for md, lb in RUN_MODES.items()), ("implicit", 1, True)):
            def run(layer=layer, mode=mode, implicit=implicit):
                tg.GROUP_RUNS = mode
                klinear.IMPLICIT_CONV = implicit
                return layer(x)
            ms, timer = bench(run)
            err = (run().float() - y_ref).pow(2).mean() / y_ref.pow(2).mean()
            rows.append({"case": name, "variant": f"layer-{lname}-{label}", "M": 2 * hw * hw, "K": 9 * cin,
                         "N": cout, "ms": round(ms, 5), "ratio_vs_cudnn": round(t_conv / ms, 3), "timer": timer,
                         "rel_mse_vs_bf16": float(f"{err.item():.3g}")})
    tg.GROUP_RUNS = 1
    klinear.IMPLICIT_CONV = False
    rows += stage_rows(name, cin, cout, hw, layers, x)
    return rows


def quant_rows(name: str, cin: int, hw: int, x: torch.Tensor, t_conv: float) -> list[dict]:
    """The per-pixel quantizer on the NCHW input read in place (``planar``, what the layers do) against PyTorch's
    NCHW → NHWC copy followed by the row quantizer (``rows-after-copy``, the layers before) and the row quantizer
    alone on an input already channels-last (``rows-channels-last``), for int8 and two-level int4 (with smoothing)."""
    from dmq.kernels.triton import quant_act as tq

    smooth = torch.rand(cin, device=x.device, dtype=x.dtype) + 0.5
    nhwc = x.permute(0, 2, 3, 1).reshape(-1, cin).contiguous()
    rows = []
    for qd, g in (("int8", 0), ("int4_2l", 64)):
        ref = tq.quantize_act(nhwc, smooth, None, qd, g, False)
        variants = {"planar": lambda qd=qd, g=g: tq.quantize_act(x, smooth, None, qd, g, False),
                    "rows-after-copy": lambda qd=qd, g=g: tq.quantize_act(
                        x.permute(0, 2, 3, 1).reshape(-1, cin).contiguous(), smooth, None, qd, g, False),
                    "rows-channels-last": lambda qd=qd, g=g: tq.quantize_act(nhwc, smooth, None, qd, g, False)}
        same = all(torch.equal(t, r) for t, r in zip(variants["planar"]()[:2], ref[:2]))
        for label, fn in variants.items():
            ms, timer = bench(fn)
            rows.append({"case": name, "variant": f"quant-{qd}-{label}", "M": 2 * hw * hw, "K": cin,
                         "ms": round(ms, 5), "ratio_vs_cudnn": round(t_conv / ms, 3), "timer": timer,
                         "planar_codes_equal_rows": same})
    return rows


def stage_rows(name: str, cin: int, cout: int, hw: int, layers: dict, x: torch.Tensor,
               iters: int = 20) -> list[dict]:
    """Where each layer's time goes: GPU time per kernel (profiler, averaged over ``iters`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for lname, layer in layers.items():
        layer(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                layer(x)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type.name != "CUDA" or ev.count < iters:
                continue
            rows.append({"case": name, "variant": f"stage-{lname}", "kernel": ev.key[:80], "M": 2 * hw * hw,
                         "K": 9 * cin, "N": cout, "ms": round(ev.device_time_total / 1e3 / iters, 5),
                         "calls_per_layer": ev.count // iters, "timer": "profiler"})
    return rows


def main() -> None:
    args = gpu_script_args(__doc__, "conv_gemm.py")
    import dmq.kernels.linear  # noqa: F401 - registers the layer kernels

    dev = torch.device("cuda")
    rows: list[dict] = []
    for name, cin, cout, hw in CASES:
        if args.wanted and name not in args.wanted:
            continue
        x = torch.randn(2, cin, hw, hw, device=dev, dtype=torch.bfloat16)
        wt = torch.randn(cout, cin, 3, 3, device=dev, dtype=torch.bfloat16) / (9 * cin) ** 0.5
        t_conv, timer = bench(lambda: F.conv2d(x, wt, None, 1, 1))
        rows.append({"case": name, "variant": "bf16-cudnn-conv", "M": 2 * hw * hw, "K": 9 * cin, "N": cout,
                     "ms": round(t_conv, 5), "ratio_vs_cudnn": 1.0, "timer": timer})
        x_cl, wt_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, wt))
        t_cl, timer = bench(lambda x_cl=x_cl, wt_cl=wt_cl: F.conv2d(x_cl, wt_cl, None, 1, 1))
        rows.append({"case": name, "variant": "bf16-cudnn-conv-channels-last", "M": 2 * hw * hw, "K": 9 * cin,
                     "N": cout, "ms": round(t_cl, 5), "ratio_vs_cudnn": round(t_conv / t_cl, 3), "timer": timer})
        rows += gemm_rows(name, cin, cout, hw, dev, t_conv)
        rows += quant_rows(name, cin, hw, x, t_conv)
        rows += layer_rows(name, cin, cout, hw, dev, x, t_conv)
        for r in rows:
            if r["case"] == name:
                print(f"{name:14s} {r['variant']:40s} {r.get('kernel', '')[:50]:50s} {r['ms']:8.4f} ms  "
                      f"x{r.get('ratio_vs_cudnn', 0):5.2f} cuDNN")
        write_results(f"conv-gemm-{slug(device_name())}", rows, Path(args.results_dir))
    print(f"wrote {write_results(f'conv-gemm-{slug(device_name())}', rows, Path(args.results_dir))}")


if __name__ == "__main__":
    main()

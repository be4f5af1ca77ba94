"""Compile every Triton kernel dmq launches at the kernel benchmark's shapes, SDXL's convolutions and three
attention shapes for an NVIDIA GPU, on a machine without one (:mod:`dmq.kernels.aot`), and write what that GPU would
run: per kernel specialization (an autotuned launch gives one per config), whether it compiles, registers, spills,
shared memory against the SM's limit, programs per SM, and the SASS instruction mix (tensor-core MMAs, TMA copies,
global load / store widths).

    python benchmarks/aot_report.py                           # sm_90 (H100, H200), all cases
    python benchmarks/aot_report.py --arch 8.0 --cases flux_qkv,conv     # A100; also 8.6, 8.9, 10.0, 12.0

Nothing runs on a GPU; the Triton that is installed compiles (the results file records its version: the GPU
machine's is 3.6). Rows: ``case`` = kernel, ``variant`` = its constexprs and config, ``first_seen`` = the launch
that first recorded it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.pop("TRITON_INTERPRET", None)   # the compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, switched, write_results  # noqa: E402
from kernel_bench import CASES  # noqa: E402

from dmq.kernels._common import FP8_CAPABILITY  # noqa: E402
from dmq.kernels.aot import compile_only  # noqa: E402
from dmq.kernels.layouts import blocked_kb  # noqa: E402

log = logging.getLogger("aot_report")
BF16 = torch.bfloat16
RANK = 32


def _e(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def linear_launches(m: int, k: int, n: int) -> list[tuple[str, Callable[[], object]]]:
    """The launches of dmq's quantized linears at one GEMM shape (CPU tensors of zeros)."""
    from dmq.kernels.triton import fp8, gemm, nvfp4, quant_act, weight_only

    x, smooth, down = _e(m, k), torch.ones(k, dtype=BF16), _e(k, RANK)
    lr, up = _e(m, RANK), _e(RANK, n)
    w8, w4b = _e(n, k, dtype=torch.int8), _e(n, blocked_kb(k) // 2, dtype=torch.uint8)
    ch = torch.ones(n)
    g64 = torch.ones(n, -(-k // 64), dtype=torch.float16)
    sub = torch.ones(n, blocked_kb(k) // 64, dtype=torch.uint8)
    if m <= 16:
        return [("gemv-int4b-g64", lambda: weight_only.weight_only_linear(x, w4b, g64, "int4b", 64, None)),
                ("gemv-int8-ch", lambda: weight_only.weight_only_linear(x, w8, ch, "int8", 0, None))]
    a8, a_ch, a_g64 = _e(m, k, dtype=torch.int8), torch.ones(m), torch.ones(m, -(-k // 64), dtype=torch.float16)
    small = min(m, 64)   # host-side torch ops after these kernels run on the CPU: keep them small

    def gemm_persistent():
        with switched(gemm, "PERSISTENT", True):
            return gemm.gemm_int(a8, a_ch, w8, ch, "int8", 0, 0, lr, up, None, BF16)

    return [
        ("quant-int8-token", lambda: quant_act.quantize_act(x, smooth, down, "int8", 0, False)),
        ("quant-int4_2l-g64", lambda: quant_act.quantize_act(x, smooth, down, "int4_2l", 64, False)),
        ("quant-int4-g64", lambda: quant_act.quantize_act(x, smooth, down, "int4", 64, True)),
        ("gemm-int8-ch-r32", lambda: gemm.gemm_int(a8, a_ch, w8, ch, "int8", 0, 0, lr, up, None, BF16)),
        ("gemm-int8-ch-r32-persistent", gemm_persistent),
        ("gemm-int8-g64-r32", lambda: gemm.gemm_int(a8, a_g64, w8, g64, "int8", 64, 64, lr, up, None, BF16)),
        ("gemm-int4b-ch-inloop", lambda: gemm.gemm_int(a8, a_ch, w4b, ch, "int4b", 0, 0, lr, up, None, BF16)),
        ("gemm-int4b-g64-inloop", lambda: gemm.gemm_int(a8, a_g64, w4b, g64, "int4b", 64, 64, lr, up, None, BF16)),
        ("expand-int4b-2l", lambda: weight_only.dequantize_weight(w4b, sub, "int4b", 64, k, torch.int8)),
        ("expand-int4b-bf16", lambda: weight_only.dequantize_weight(w4b, g64, "int4b", 64, k, BF16)),
        ("fp8-linear", lambda: fp8.fp8_linear(x[:small], _e(n, k, dtype=torch.float8_e4m3fn), ch, None)),
        ("nvfp4-linear", lambda: nvfp4.nvfp4_linear(x[:small], smooth, down, up, _e(n, k // 2, dtype=torch.uint8),
                                                    _e(n, k // 16, dtype=torch.float8_e4m3fn), torch.ones(()),
                                                    None)),
    ]


def conv_launches(cap: tuple[int, int]) -> list[tuple[str, Callable[[], object]]]:
    """SDXL's 3×3 convolutions at 1024² with CFG (batch 2): quantization of the NCHW input in place, im2col of
    NHWC int8 codes, and the implicit GEMM where the target has TMA (compute capability ≥ 9.0)."""
    from dmq.kernels.triton import gemm, im2col, quant_act

    out = []
    for hw, cin, cout in ((128, 320, 320), (64, 640, 640), (32, 1280, 1280)):
        img, smooth = _e(2, cin, hw, hw), torch.ones(cin, dtype=BF16)
        out += [(f"conv-quant-{qd}-{hw}x{cin}", lambda img=img, sm=smooth, qd=qd, g=g:
                 quant_act.quantize_act(img, sm, None, qd, g, False)) for qd, g in (("int8", 0), ("int4_2l", 64))]
        codes, scales = _e(2, hw, hw, cin, dtype=torch.int8), torch.ones(2, hw, hw)
        w, ws = _e(cout, 9 * cin, dtype=torch.int8), torch.ones(cout)
        lr, up = _e(2 * hw * hw, RANK), _e(RANK, cout)
        out.append((f"conv-im2col-{hw}x{cin}", lambda c=codes: im2col.im2col(c, 3, 3, 1, 1, 1, 1, 1, 1)))
        if cap >= (9, 0):
            out.append((f"conv-implicit-{hw}x{cin}", lambda c=codes, s=scales, w=w, ws=ws, lr=lr, up=up:
                        gemm.conv_gemm_int(c, s, w, ws, 3, 3, 1, 1, 1, 1, lr, up, None, BF16)))
    return out


def attention_launches(cap: tuple[int, int]) -> list[tuple[str, Callable[[], object]]]:
    """8-bit attention at FLUX (24 heads × 4608 tokens × 128), SDXL (10 × 4096 × 64, CFG) and PixArt-Σ
    (16 × 4096 × 72, CFG) shapes, where the target has fp8 tensor cores."""
    from dmq.kernels.triton import attention

    if cap < FP8_CAPABILITY:
        return []
    return [(f"attention-{name}", lambda s=shape: attention.int8_attention(_e(*s), _e(*s), _e(*s)))
            for name, shape in (("flux", (1, 24, 4608, 128)), ("sdxl", (2, 10, 4096, 64)),
                                ("pixart", (2, 16, 4096, 72)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="9.0", help="compute capability to compile for (default 9.0)")
    ap.add_argument("--cases", default="", help="comma-separated kernel_bench case names, 'conv', 'attention' "
                                                "(default: all)")
    ap.add_argument("--name", default=None, help="results name (default aot-sm<arch>-triton<version>)")
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cap = tuple(int(p) for p in args.arch.split("."))
    wanted = set(filter(None, args.cases.split(",")))
    groups = [(name, lambda m=m, k=k, n=n: linear_launches(m, k, n)) for name, m, k, n in CASES]
    groups += [("conv", lambda: conv_launches(cap)), ("attention", lambda: attention_launches(cap))]
    rows = []
    with compile_only(cap) as session:
        first_seen: dict[object, str] = {}
        for group, launches in groups:
            if wanted and group not in wanted:
                continue
            for what, call in launches():
                before = len(session.launches)
                call()
                for launch in session.launches[before:]:
                    first_seen[launch] = f"{group}/{what}"
        log.info("%d kernel specializations recorded; compiling for sm_%d%d with Triton %s",
                 len(session.launches), *cap, triton.__version__)
        for i, launch in enumerate(session.launches):
            t0 = time.perf_counter()
            build = session.build(launch)
            row = build.row()
            variant = f"{row.pop('meta')} w{row.pop('num_warps')} s{row.pop('num_stages')}"
            rows.append(dict(case=row.pop("kernel"), variant=variant, first_seen=first_seen[launch],
                             compile_s=round(time.perf_counter() - t0, 2), **row))
            flag = build.error or ("" if build.fits else "does not fit") or \
                ("spills" if build.stack_bytes else "")
            log.info("[%d/%d] %s %s: %d regs, %d B shared %s", i + 1, len(session.launches), rows[-1]["case"],
                     variant, build.registers, build.shared_bytes, flag)
    name = args.name or f"aot-sm{cap[0]}{cap[1]}-triton{triton.__version__}"
    path = write_results(name, rows, Path(args.results_dir))
    log.info("%-40s %5s %9s %9s %9s %6s", "kernel", "specs", "registers", "max stack", "programs", "failed")
    for kernel in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == kernel]
        regs, per_sm = [r["registers"] for r in rs], [r["programs_per_sm"] for r in rs]
        log.info("%-40s %5d %4d-%-4d %9d %4d-%-4d %6d", kernel, len(rs), min(regs), max(regs),
                 max(r["stack_bytes"] for r in rs), min(per_sm), max(per_sm),
                 sum(bool(r["error"]) or not r["fits"] for r in rs))
    bad = [r for r in rows if r["error"] or not r["fits"] or r["stack_bytes"]]
    log.info("%d specializations, %d failing / not fitting / spilling; wrote %s", len(rows), len(bad), path)


if __name__ == "__main__":
    main()

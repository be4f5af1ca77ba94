"""One denoiser step at 1024² on a GPU, for real model configs with random bf16 weights: bf16 eager and compiled,
fp8 row-wise (torchao, and dmq's fp8 preset on ``torch._scaled_mm``), dmq w8a8, dmq svdquant-w4a4 (rank 32) and
svdquant-w4a4 with two LoRAs (rank 32 + 16 + 16).

    python benchmarks/e2e.py --models flux-dev --batches 1 --variants bf16 bf16-compile dmq-svdquant-w4a4
    python benchmarks/e2e.py --models flux-dev --batches 1 --variants bf16-attn8 dmq-svdquant-w4a4-2l-attn8+cudagraph
    python benchmarks/e2e.py --models flux-dev --batches 1 --variants bf16-fused+compile \
        dmq-svdquant-w4a4-2l-fused+rcompile+cudagraph

Every variant runs in its own process (compile and quantization leave state behind) and first re-measures bf16
eager in that process: rows carry ``ms``, the process's ``anchor_ms`` (bf16 eager), ``ratio_vs_eager`` and
``ratio_vs_compiled`` = (bf16-compiled ms / its anchor) ÷ (ms / anchor), so ratios stay comparable across processes.
A ``+compile`` suffix compiles a variant (``torch.compile``, default mode), ``+rcompile`` compiles its repeated blocks
(:func:`dmq.compile_blocks`, regional compilation); a final ``+cudagraph`` replays the step
from a captured CUDA graph (static inputs), which removes the host's per-launch overhead without compiling. Each row also has a per-kind breakdown of GPU kernel time from the
profiler (``linear_ms``, ``attention_ms``, ``other_ms``), the peak memory of the step, the denoiser's weight bytes,
the preparation time (quantization / first compiled call) and the Amdahl ceiling of a variant whose linears ran at
the fp8 rate. Results: ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from model_configs import build_model, make_inputs  # noqa: E402

MODELS = ("flux-dev", "pixart-sigma", "sdxl")
VARIANTS = ("bf16", "bf16-compile", "torchao-fp8", "dmq-fp8", "dmq-w8a8", "dmq-svdquant-w4a4",
            "dmq-svdquant-w4a4-lora")
_LINEAR_KERNELS = ("gemm", "gemv", "matmul", "cutlass", "xmma", "nvjet", "scaled_mm", "quantize_act", "_int_mm",
                   "weight_only", "fp8_linear", "dequantize", "splitk", "gemm_int", "_token_kernel",
                   "_group_kernel", "_dequant_kernel", "nvfp4")
_ATTENTION_KERNELS = ("flash", "fmha", "attention", "sdpa", "softmax", "_attn_kernel", "_quant_kernel")


def _median_ms(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


# Inductor's own fused kernels are named after every op they fuse, the consumer included: the cat + GELU that feeds
# a quantized linear was "triton_poi_fused_cat_gelu_permute_quantize_act_view_3" (3.6 ms of a FLUX w8a8 step,
# e2e-flux-h200.json) and counted as a linear kernel, while the same kernel of another variant counted as "other".
# They count as "other" whatever their names hold (rows before December 2026 were classified without this).
_INDUCTOR_FUSED = ("triton_poi_", "triton_red_", "triton_per_")


def _kernel_kind(name: str) -> str:
    """Kind of a profiler kernel name: "attention", "linear" or "other"."""
    low = name.lower()
    if low.startswith(_INDUCTOR_FUSED):
        return "other"
    if any(k in low for k in _ATTENTION_KERNELS):
        return "attention"
    if any(k in low for k in _LINEAR_KERNELS):
        return "linear"
    return "other"


def _breakdown(fn) -> dict[str, float]:
    """GPU kernel time of one call of ``fn`` by kind, in ms, and the five slowest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    per_kernel: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = evt.self_cuda_time_total
        if us <= 0:
            continue
        kinds[_kernel_kind(evt.key)] += us / 1e3
        per_kernel[evt.key] = us / 1e3
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:5]
    return {"linear_ms": round(kinds["linear"], 3), "attention_ms": round(kinds["attention"], 3),
            "other_ms": round(kinds["other"], 3), "top_kernels": "; ".join(f"{k[:60]} {v:.2f}" for k, v in top)}


def _graphed(model: torch.nn.Module, inputs: dict):
    """A function replaying ``model(**inputs)`` from a CUDA graph (warmed up on a side stream first, so that
    autotuning and lazy initialisation happen outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**inputs)
    return lambda **_: graph.replay()


def _nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _random_loras(model: torch.nn.Module, ranks: tuple[int, ...]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One ``{module: (A (r, K), B (N, r))}`` LoRA per rank over every quantized linear, small random values."""
    from dmq.nn.base import QuantGemm

    g = torch.Generator(device="cuda").manual_seed(0)
    loras = []
    for r in ranks:
        lora = {}
        for name, m in model.named_modules():
            if isinstance(m, QuantGemm) and m.taps == 1 and m.act_spec is not None:
                k, n = m.channels, m.out_features
                lora[name] = (torch.randn(r, k, device="cuda", generator=g) / k**0.5,
                              torch.randn(n, r, device="cuda", generator=g) * 1e-2)
        loras.append(lora)
    return loras


def _prepare(model: torch.nn.Module, variant: str, fuse: bool = False) -> tuple[torch.nn.Module, str]:
    """Apply ``variant`` (without its ``+compile``) to ``model``; returns the model and a note. A ``-attn8`` suffix
    also runs self/joint attention in 8 bits (dmq.methods.attention); a ``-fused`` suffix (before ``-attn8``) fuses
    the q/k/v projections (``QuantConfig.fuse_projections`` for dmq, diffusers' ``fuse_qkv_projections`` for bf16).
    dmq variants are data-free, so they have no smoothing: ``-smooth`` (after ``-fused``) gives every SVDQuant layer
    a smoothing vector of ones (what a calibrated model runs; values do not change speed), and ``-kernelsmooth``
    (after ``-smooth``) keeps that smoothing inside the quantizer in compiled graphs
    (``dmq.kernels.linear.SMOOTH_IN_GRAPH``); ``-implicitconv`` runs stride-1 convolutions through the
    implicit-GEMM kernel (``dmq.kernels.linear.IMPLICIT_CONV``); ``-persistent`` (last) runs the per-row ×
    per-column scaled GEMMs through the persistent TMA kernel (``dmq.kernels.triton.gemm.PERSISTENT``)."""
    if variant.endswith("-persistent"):
        from dmq.kernels.triton import gemm

        gemm.PERSISTENT = True
        model, note = _prepare(model, variant.removesuffix("-persistent"), fuse)
        return model, note + ", persistent TMA GEMMs"
    if variant.endswith("-attn8"):
        from dmq.methods.attention import enable_quantized_attention

        model, note = _prepare(model, variant.removesuffix("-attn8"))
        n = len(enable_quantized_attention(model, "int8"))
        return model, f"{note + ', ' if note else ''}int8 attention on {n} modules"
    if variant.endswith("-implicitconv"):
        import dmq.kernels.linear as klinear

        klinear.IMPLICIT_CONV = True
        model, note = _prepare(model, variant.removesuffix("-implicitconv"), fuse)
        return model, note + ", implicit-GEMM convolutions"
    if variant.endswith("-kernelsmooth"):
        import dmq.kernels.linear as klinear

        klinear.SMOOTH_IN_GRAPH = False
        model, note = _prepare(model, variant.removesuffix("-kernelsmooth"), fuse)
        return model, note + ", smoothing inside the quantizer in compiled graphs too"
    if variant.endswith("-smooth"):
        model, note = _prepare(model, variant.removesuffix("-smooth"), fuse)
        layers = [m for m in model.modules() if getattr(m, "proj_down", None) is not None and m.smooth is None]
        for m in layers:   # ones: the outputs stay the same, the kernels do the work of calibrated smoothing
            m.smooth = torch.ones(m.channels, dtype=m.proj_down.dtype, device=m.proj_down.device)
        return model, f"{note}, smoothing vectors (ones) on {len(layers)} layers"
    if variant.endswith("-fused"):
        return _prepare(model, variant.removesuffix("-fused"), fuse=True)
    if variant == "bf16":
        if fuse:
            model.fuse_qkv_projections()
            return model, "q/k/v projections fused (diffusers fuse_qkv_projections)"
        return model, ""
    if variant == "torchao-fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return model, "torchao fp8 dynamic, per row"
    if variant.startswith("dmq-"):
        from dmq.config import get_preset
        from dmq.methods.lora import add_lora_to_model
        from dmq.pipelines.quantize import quantize_model
        from dmq.pipelines.roles import roles_for

        preset = variant[4:].removesuffix("-lora")
        from dmq.kernels.linear import prepare_model

        config = replace(get_preset(preset), fuse_projections=fuse)
        quantize_model(model, config, roles_for(model), "denoiser", progress=False)
        prepare_model(model)   # kernel weight layouts built eagerly, so a compiled graph only reads them
        note = f"dmq preset {preset}, data-free" + (", q/k/v projections fused" if fuse else "")
        if variant.endswith("-lora"):
            for i, lora in enumerate(_random_loras(model, (16, 16))):
                add_lora_to_model(model, lora, name=f"lora{i}")
            note += ", two LoRAs of rank 16 in the branch"
        return model, note
    raise SystemExit(f"unknown variant {variant!r}")


def worker(model_name: str, variant: str, batches: list[int]) -> list[dict]:
    """Rows of one variant, measured in this process after a bf16-eager anchor."""
    import triton

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(model_name, device="cuda", dtype=torch.bfloat16)
    bf16_bytes = _nbytes(model)
    inputs = {b: make_inputs(model_name, batch=b, device="cuda", generator=torch.Generator("cuda").manual_seed(b))
              for b in batches}
    anchors = {}
    with torch.inference_mode():
        for b in batches:
            anchors[b] = _median_ms(lambda: model(**inputs[b]))
    graphed = variant.endswith("+cudagraph")
    base = variant.removesuffix("+cudagraph")
    regional = base.endswith("+rcompile")
    base = base.removesuffix("+rcompile")
    compiled = base.endswith("+compile") or base == "bf16-compile"
    base = base.removesuffix("+compile")
    base = "bf16" if base == "bf16-compile" else base
    t0 = time.perf_counter()
    with torch.no_grad():
        model, note = _prepare(model, base)
    torch.cuda.synchronize()
    prep_s = time.perf_counter() - t0
    rows = []
    for b in batches:
        with torch.inference_mode():
            t0 = time.perf_counter()
            if regional and b == batches[0]:
                from dmq.pipelines.compile import compile_blocks

                note += f"; {len(compile_blocks(model))} blocks compiled (regional)"
            fn_model = torch.compile(model) if compiled else model
            fn_model(**inputs[b])
            if graphed:
                fn_model = _graphed(model, inputs[b])
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            ms = _median_ms(lambda: fn_model(**inputs[b]))
            peak = torch.cuda.max_memory_allocated()
            parts = _breakdown(lambda: fn_model(**inputs[b]))
        rows.append({"case": model_name, "variant": variant, "batch": b, "ms": round(ms, 3),
                     "anchor_ms": round(anchors[b], 3), "ratio_vs_eager": round(anchors[b] / ms, 3),
                     "weight_bytes": _nbytes(model), "weight_ratio_vs_bf16": round(bf16_bytes / _nbytes(model), 3),
                     "peak_mem_bytes": peak, "prepare_s": round(prep_s, 2), "first_call_s": round(first_s, 2),
                     **parts, "notes": note, "triton": triton.__version__})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _finish(rows: list[dict]) -> list[dict]:
    """Add ``ratio_vs_compiled`` (normalized by each process's anchor) and the fp8-linears Amdahl ceiling."""
    for r in rows:
        if "ms" not in r:
            continue
        comp = next((c for c in rows if c["case"] == r["case"] and c.get("batch") == r["batch"]
                     and c["variant"] == "bf16-compile" and "ms" in c), None)
        if comp is not None:
            r["ratio_vs_compiled"] = round((comp["ms"] / comp["anchor_ms"]) / (r["ms"] / r["anchor_ms"]), 3)
        eager = next((c for c in rows if c["case"] == r["case"] and c.get("batch") == r["batch"]
                      and c["variant"] == "bf16" and "ms" in c), None)
        if eager is not None and comp is not None and r["variant"] == "bf16-compile":
            total = eager["linear_ms"] + eager["attention_ms"] + eager["other_ms"]
            # the compiled step with its linears 1.63× faster (fp8 cuBLAS at FLUX shapes, HOPPER_FACTS)
            lin = eager["linear_ms"] * (r["ms"] / max(total, 1e-9))
            r["fp8_linear_ceiling_vs_compiled"] = round(r["ms"] / (r["ms"] - lin + lin / 1.63), 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--name", default="e2e-h100", help="results/<name>.json")
    parser.add_argument("--timeout-s", type=float, default=280, help="per variant process")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.batches)
        return
    rows: list[dict] = []
    for model in args.models:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", model, variant, "--batches", *map(str, args.batches)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
                got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
                if out.returncode != 0 or not got:
                    err = (out.stderr.strip().splitlines() or ["no output"])[-1]
                    got.append({"case": model, "variant": variant, "error": err[:300]})
            except subprocess.TimeoutExpired:
                got = [{"case": model, "variant": variant, "error": f"timed out after {args.timeout_s} s"}]
            for r in got:
                print(r, flush=True)
            rows += got
            write_results(args.name, _finish(rows))
    print(f"wrote {write_results(args.name, _finish(rows))}")


if __name__ == "__main__":
    main()

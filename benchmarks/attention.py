"""8-bit attention (dmq int8 QKᵀ / fp8 PV) against PyTorch SDPA (flash) in bf16, at the attention shapes of FLUX,
SD3, PixArt-Σ and SDXL at 1024², all in one process; writes ``benchmarks/results/attention-<device>.json``.

    python benchmarks/attention.py                       # CUDA GPU: every case (about 2 minutes on an H100)
    python benchmarks/attention.py --sweep               # ... and every config of the attention kernel, timed
    python benchmarks/attention.py --cases flux,sd3
    python benchmarks/attention.py --smoke               # CPU, Triton interpreter, tiny shapes: catches errors only
    python benchmarks/attention.py --fidelity --seeds 2 --num-images 20 --steps 10   # shipped DiT, any device

``--fidelity`` measures the shipped digits DiT with 8-bit attention alone, with svdquant-w4a4, and with both, against
the fp32 pipeline (PSNR/SSIM, domain-FID; as ``benchmarks/fidelity.py``) → ``results/attention-fidelity-<device>.json``.

Variants per case: ``sdpa-bf16`` (``F.scaled_dot_product_attention`` restricted to the flash backend),
``sdpa-default-bf16`` (the backend PyTorch picks, as inside a diffusers model: cuDNN on the H100), ``dmq-int8``
(the whole op: quantization pre-kernel and attention kernel; ``config`` is the autotuner's choice), ``abl-quant``
(the pre-kernel alone), ``abl-attn`` (the attention kernel on ready codes) and, with ``--sweep``, ``sweep-attn`` once
per config of the attention kernel. Times are ``triton.testing.do_bench`` medians (ms, L2 flushed before each call;
the first call, which autotunes, is not timed); ``ratio_vs_sdpa`` > 1 is faster. ``ms_graph`` is the GPU time alone
(the call captured in a CUDA graph) and ``host_us`` the host time per call (Python, allocations, launches): where
``ms`` exceeds ``ms_graph``, launch overhead shows (small shapes). Fidelity: ``cos_vs_sdpa`` is the cosine similarity
of the output with the bf16 SDPA output; ``cos_vs_ref`` / ``maxdiff_vs_ref`` compare the kernel with its PyTorch
reference (:mod:`dmq.kernels.reference.attention`, with the chosen config's key block; the GPU casts P to fp8 in
hardware and its exp2 is approximate, so agreement is at the fp8 rounding level, not bit-exact);
``codes_bit_exact``: the pre-kernel's codes and scales equal the reference's bit for bit. Inputs: Gaussian Q, V; K
Gaussian plus a per-channel offset (as in DiT keys) on a few channels. Head dims that are not a power of two
(PixArt-Σ's 72) are zero-padded to the next power of two (128) inside the kernel. A failing case or variant records
its error and the run goes on; a summary table ends the run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before any kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, device_name, write_results  # noqa: E402

# name: (batch, heads, q tokens, kv tokens, head dim) — batch 2 where the model runs classifier-free guidance
CASES = {
    "flux": (1, 24, 4608, 4608, 128),        # FLUX.1 at 1024²: 4096 image + 512 text tokens, joint attention
    "sd3": (2, 24, 4250, 4250, 64),          # SD3-medium at 1024²: 4096 image + 154 text tokens, CFG
    "pixart": (2, 16, 4096, 4096, 72),       # PixArt-Σ at 1024², self-attention, CFG
    "sdxl_64x64": (2, 10, 4096, 4096, 64),   # SDXL self-attention at 128² latents / 2 (first attention level), CFG
    "sdxl_32x32": (2, 20, 1024, 1024, 64),   # SDXL self-attention at the inner level, CFG
}
SMOKE_CASES = {"smoke_d64": (1, 2, 77, 77, 64), "smoke_d72": (1, 2, 40, 130, 72), "smoke_d128": (1, 1, 1, 65, 128)}


def slug(name: str) -> str:
    import re

    m = re.search(r"\b([HhAaBbLl]\d{2,3})\b", name)
    return m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_qkv(b, h, nq, nk, d, dev, dtype):
    g = torch.Generator(device=dev).manual_seed(nq * 31 + d)
    q = torch.randn(b, h, nq, d, device=dev, generator=g)
    k = torch.randn(b, h, nk, d, device=dev, generator=g)
    v = torch.randn(b, h, nk, d, device=dev, generator=g)
    idx = torch.randperm(d, device=dev, generator=g)[:4]
    k[..., idx] += 8.0 * torch.randn(h, 1, 4, device=dev, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def cos(a, b) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def timer(smoke: bool, rep: int = 100):
    """fn → ms: ``triton.testing.do_bench`` median on the GPU (L2 flushed before each call), one wall-clock call
    under the interpreter."""
    if smoke:
        def once(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return once
    import triton

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep))
    return bench


def graph_ms(fn) -> float:
    """GPU time alone: ``fn`` captured in a CUDA graph (already autotuned), replays timed like :func:`timer`."""
    import triton

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=100))


def host_us(fn, n: int = 50) -> float:
    """Host time per call in µs (Python, allocations, launches), measured without waiting for the GPU."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t
    torch.cuda.synchronize()
    return t / n * 1e6


def run_case(name, shape, dev, smoke, sweep, rows):
    from dmq.kernels.reference import attention as ref
    from dmq.kernels.triton import attention as tri

    b, h, nq, nk, d = shape
    dtype = torch.float16 if smoke else torch.bfloat16
    base = {"case": name, "B": b, "H": h, "Nq": nq, "Nk": nk, "D": d, "D_padded": ref.head_dim_padded(d),
            "dtype": str(dtype).replace("torch.", "")}
    bench = timer(smoke)
    flops = 4 * b * h * nq * nk * d
    q, k, v = make_qkv(b, h, nq, nk, d, dev, dtype)
    qk_scale = ref.LOG2E / math.sqrt(d)

    def record(variant, fn, timing=None, **extra):
        """Time ``fn`` (and, on the GPU, its CUDA-graph GPU time and host time); errors are recorded."""
        row = dict(base, variant=variant)
        try:
            ms = (timing or bench)(fn)
            row["ms"] = round(ms, 4)
            row["tflops"] = round(flops / ms / 1e9, 1)
            if not smoke and timing is None:
                row["ms_graph"] = round(graph_ms(fn), 4)
                row["host_us"] = round(host_us(fn), 1)
            row.update(extra)
        except Exception as e:  # noqa: BLE001 - record and go on
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        rows.append(row)
        print("  ", {k_: v_ for k_, v_ in row.items() if k_ not in base or k_ == "case"}, flush=True)
        return row

    if smoke:
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
    o_sdpa = None
    try:
        o_sdpa = sdpa()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    r_sdpa = record("sdpa-bf16" if not smoke else "sdpa-fp16", sdpa)
    # PyTorch's own backend choice (cuDNN attention on an H100 with torch 2.11), which diffusers gets in a model
    r_default = record("sdpa-default-bf16", lambda: F.scaled_dot_product_attention(q, k, v)) if not smoke else {}

    dmq = lambda: tri.int8_attention(q, k, v)  # noqa: E731
    extra = {}
    try:
        o = dmq()   # autotunes on the GPU
        cfg = None if smoke else tri.tuned_config()
        extra["config"] = None if cfg is None else tri.config_name(cfg)
        if o_sdpa is not None:
            extra["cos_vs_sdpa"] = round(cos(o, o_sdpa), 6)
        o_ref = ref.int8_attention(q, k, v, block_n=ref.BLOCK_N if cfg is None else cfg.kwargs["BN"])
        extra["cos_vs_ref"] = round(cos(o, o_ref), 6)
        extra["maxdiff_vs_ref"] = float((o.float() - o_ref.float()).abs().max())
        del o_ref
        names = ("q_codes", "q_scales", "k_codes", "k_scales", "v_codes", "v_scales")
        codes = zip(names, tri.quantize_qkv(q, k, v, qk_scale), ref.quantize_qkv(q, k, v, qk_scale), strict=True)
        differ = [n for n, x, y in codes if not torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn
                                                            else x, y.view(torch.uint8)
                                                            if y.dtype == torch.float8_e4m3fn else y)]
        extra["codes_bit_exact"] = not differ
        extra["codes_differ"] = ",".join(differ)
    except Exception as e:  # noqa: BLE001
        extra["check_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    row = record("dmq-int8", dmq, **extra)
    if "ms" in row and "ms" in r_sdpa:
        row["ratio_vs_sdpa"] = round(r_sdpa["ms"] / row["ms"], 3)
        if "ms_graph" in row and "ms_graph" in r_sdpa:
            row["ratio_vs_sdpa_graph"] = round(r_sdpa["ms_graph"] / row["ms_graph"], 3)
        if "ms" in r_default:
            row["ratio_vs_sdpa_default"] = round(r_default["ms"] / row["ms"], 3)

    record("abl-quant", lambda: tri.prepare(q, k, v, qk_scale))
    codes = tri.prepare(q, k, v, qk_scale)
    record("abl-attn", lambda: tri.attend(codes, q.dtype), config=extra.get("config"))
    if sweep:
        # every config of the main kernel, launched explicitly (compiled once, shared with the autotuner's cache)
        for cfg in tri.CONFIGS:
            r = record("sweep-attn", lambda cfg=cfg: tri.attend(codes, q.dtype, cfg), timing=timer(smoke, rep=50),
                       config=tri.config_name(cfg))
            if "ms" in r and "ms" in r_sdpa:
                r["ratio_vs_sdpa"] = round(r_sdpa["ms"] / r["ms"], 3)


def summary(rows: list[dict]) -> None:
    """One line per case: SDPA, the whole op, the pre-pass, the kernel, the chosen and the fastest config."""
    print(f"\n{'case':<12}{'sdpa ms':>9}{'dmq ms':>9}{'ratio':>7}{'graph':>7}{'quant ms':>9}{'attn ms':>9}"
          "  chosen config / fastest swept config")
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["variant"]: r for r in rows if r["case"] == case}
        sdpa = by.get("sdpa-bf16", by.get("sdpa-fp16", {}))
        ms = {v: by.get(v, {}).get("ms", float("nan")) for v in ("dmq-int8", "abl-quant", "abl-attn")}
        dm = by.get("dmq-int8", {})
        sweep = [r for r in rows if r["case"] == case and r["variant"] == "sweep-attn" and "ms" in r]
        best = min(sweep, key=lambda r: r["ms"]) if sweep else None
        print(f"{case:<12}{sdpa.get('ms', float('nan')):9.4f}{ms['dmq-int8']:9.4f}"
              f"{dm.get('ratio_vs_sdpa', float('nan')):7.3f}{dm.get('ratio_vs_sdpa_graph', float('nan')):7.3f}"
              f"{ms['abl-quant']:9.4f}{ms['abl-attn']:9.4f}  {dm.get('config')}"
              + (f" / {best['config']} {best['ms']:.4f} ms" if best else ""), flush=True)


def run_fidelity(args) -> None:
    import fidelity as fb

    import dmq
    from dmq.evaluation.digits import DigitsMetrics, generate
    from dmq.evaluation.fidelity import mean_std, psnr, ssim
    from dmq.methods.attention import enable_quantized_attention, quantized_attention_hooks
    from dmq.models import load

    dev, model, n, steps = args.device, "digits-dit", args.num_images, args.steps
    metrics = DigitsMetrics(dev)
    fp = load(model, device=dev)
    fp_images = {s: generate(fp, n, s, num_inference_steps=steps, batch_size=n, progress=False)
                 for s in range(args.seeds)}
    rows = []
    for variant in ("int8-attention", "svdquant-w4a4", "svdquant-w4a4+int8-attention"):
        pipe = load(model, device=dev)
        base, _, attn = variant.partition("+")
        if base == "int8-attention":
            enable_quantized_attention(pipe.transformer)
        else:
            cfg, calib = fb.parse_variant(base, model, args.calibration_samples, 25, 0)
            dmq.quantize_pipeline(pipe, cfg, calibration=calib, progress=False, attention="int8" if attn else None)
        p, s_, f, a = [], [], [], []
        for s in range(args.seeds):
            ref_img, labels = fp_images[s]
            img, _ = generate(pipe, n, s, num_inference_steps=steps, batch_size=n, progress=False)
            p.append(float(psnr(ref_img, img).clamp(max=100).mean()))
            s_.append(float(ssim(ref_img, img).mean()))
            f.append(metrics.fid(img, seed=s))
            a.append(metrics.accuracy(img, labels))
        hooks = quantized_attention_hooks(pipe.transformer)
        row = {"case": model, "variant": variant, "N": n, "seeds": args.seeds, "steps": steps,
               "psnr": mean_std(p)[0], "psnr_std": mean_std(p)[1], "ssim": mean_std(s_)[0],
               "ssim_std": mean_std(s_)[1], "fid": mean_std(f)[0], "fid_std": mean_std(f)[1],
               "accuracy": mean_std(a)[0], "accuracy_std": mean_std(a)[1],
               "attention_calls_int8": sum(h.quantized for h in hooks.values()),
               "attention_calls_16bit": sum(h.fallback for h in hooks.values())}
        rows.append(row)
        print(row, flush=True)
    print("wrote", write_results(f"attention-fidelity-{slug(device_name()) if dev != 'cpu' else 'cpu'}", rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="", help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--sweep", action="store_true", help="also time every config of the attention kernel")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (errors only)")
    ap.add_argument("--results-dir", default=None, help="default: benchmarks/results (a temp dir with --smoke)")
    ap.add_argument("--fidelity", action="store_true", help="the shipped DiT's fidelity instead of kernel timings")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--num-images", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="with --fidelity")
    args = ap.parse_args()
    if args.fidelity:
        return run_fidelity(args)
    if args.smoke:
        dev, cases = "cpu", SMOKE_CASES
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --smoke for a CPU check under the interpreter)")
        dev, cases = "cuda", CASES
    if args.cases:
        cases = {n: cases[n] for n in args.cases.split(",")}
    rows: list[dict] = []
    for name, shape in cases.items():
        print(f"{name}: B={shape[0]} H={shape[1]} Nq={shape[2]} Nk={shape[3]} D={shape[4]}", flush=True)
        try:
            run_case(name, shape, dev, args.smoke, args.sweep, rows)
        except Exception as e:  # noqa: BLE001 - one failing shape must not end the run
            traceback.print_exc()
            rows.append({"case": name, "variant": "dmq-int8", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if dev == "cuda":
            torch.cuda.empty_cache()
    summary(rows)
    results_dir = Path(args.results_dir) if args.results_dir else (
        Path(os.environ.get("TMPDIR", "/tmp")) if args.smoke else RESULTS_DIR)
    name = "attention-smoke" if args.smoke else f"attention-{slug(device_name())}"
    print("wrote", write_results(name, rows, results_dir))


if __name__ == "__main__":
    main()

"""Time and peak memory of svdquant-w4a4 calibration at real model scale on one GPU (issue: FLUX.1-dev in ≤ 10 min).

    python benchmarks/calibration_scale.py --model flux-dev --samples 64

The denoiser is built from its published config with random bf16 weights (no real weights reach these machines),
so the pipeline's text encoders and VAE are absent: collection runs the denoiser itself ``--samples`` times (at
timesteps spread over the schedule, in batches of ``--batch``) with dmq's streaming statistics on the inputs of every
layer that SVDQuant quantizes. Random weights give activations without outlier channels, so each hooked input is
multiplied by a fixed per-layer channel gain (a seeded 0.5% of the channels × 30, as trained DiTs show) before it
reaches the statistics. Stages, timed separately:

- ``collect_s``: the denoiser calls with the statistics hooks (per-channel abs-max for smoothing);
- ``build_s``: dmq's real layer build (:func:`dmq.pipelines.quantize.prepare_model`): smoothing factors, the rank-32
  low-rank split of the smoothed weight, 4-bit quantization of the residual, for every layer;
- ``lowrank_s``: the low-rank split alone over every layer (a second pass, to apportion ``build_s``), and
  ``exact_svd_s_est``: a full ``torch.linalg.svd`` timed on the first ``--exact-layers`` layers and scaled to all,
  with the mean residual-energy ratio randomized / exact on those layers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from model_configs import build_model, make_inputs  # noqa: E402

from dmq.calibration.estimators import channel_absmax  # noqa: E402
from dmq.calibration.stats import LayerStats, StatsConfig  # noqa: E402
from dmq.config import get_preset  # noqa: E402
from dmq.methods.lowrank import captured_energy, lowrank_split  # noqa: E402
from dmq.methods.smoothing import smoothing_factors, weight_channel_absmax  # noqa: E402
from dmq.pipelines.quantize import plan_model, prepare_model  # noqa: E402
from dmq.pipelines.roles import roles_for  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-dev")
    parser.add_argument("--preset", default="svdquant-w4a4")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--exact-layers", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default="calibration-scale-h100")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, device=dev, dtype=torch.bfloat16)
    cfg = get_preset(args.preset)
    roles = roles_for(model)
    names = [p.name for p in plan_model(model, roles, cfg) if p.action == "quantized" and not p.splits]
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    stats, handles = {}, []
    for n in names:
        k = modules[n].in_features
        gain = torch.ones(k)
        gain[torch.randperm(k, generator=g)[: max(1, k // 200)]] = 30.0
        stats[n] = LayerStats(n, -1, StatsConfig(histogram=False, reservoir=False, channel_absmax=True))

        def hook(mod, inp, _s=stats[n], _g=gain.to(dev, torch.bfloat16)):
            _s.update(inp[0] * _g)

        handles.append(modules[n].register_forward_pre_hook(hook))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    calls = -(-args.samples // args.batch)
    with torch.inference_mode():
        for i in range(calls):
            inputs = make_inputs(args.model, batch=args.batch, device=dev, cfg=False,
                                 generator=torch.Generator(dev).manual_seed(i))
            if args.model == "flux-dev":  # timesteps spread over the schedule (the others' inputs draw them)
                inputs["timestep"].fill_((i + 0.5) / calls)
            model(**inputs)
    _sync()
    collect_s = time.perf_counter() - t0
    for h in handles:
        h.remove()
    absmax = {n: channel_absmax(stats[n]) for n in names}
    t0 = time.perf_counter()
    entries, built = prepare_model(model, cfg, roles, "denoiser", progress=True, act_absmax=absmax)
    _sync()
    build_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    q_bytes = sum(layer.nbytes() for layer in built.values())
    fp_bytes = sum(e.fp_bytes for e in entries if e.action != "kept")
    del built
    smoothed = []
    t0 = time.perf_counter()
    for n in names:
        w = modules[n].weight.detach().float()
        lam = smoothing_factors(absmax[n], weight_channel_absmax(modules[n]), cfg.smooth_alpha or 0.5)
        smoothed.append(w * lam)
        lowrank_split(smoothed[-1], cfg.rank, torch.bfloat16)
        smoothed = smoothed[-args.exact_layers:]
    _sync()
    lowrank_s = time.perf_counter() - t0
    ratios, t_exact = [], 0.0
    for w in smoothed:
        _sync()
        t0 = time.perf_counter()
        exact = lowrank_split(w, cfg.rank, torch.bfloat16, method="exact")
        _sync()
        t_exact += time.perf_counter() - t0
        fast = lowrank_split(w, cfg.rank, torch.bfloat16)
        ratios.append((1 - captured_energy(w, *fast[:2])) / (1 - captured_energy(w, *exact[:2])))
    row = {"case": args.model, "variant": args.preset, "samples": args.samples, "batch": args.batch,
           "layers": len(names), "collect_s": round(collect_s, 2), "build_s": round(build_s, 2),
           "total_s": round(collect_s + build_s, 2), "lowrank_s": round(lowrank_s, 2),
           "exact_svd_s_est": round(t_exact / max(len(smoothed), 1) * len(names), 1),
           "residual_ratio_randomized_vs_exact": round(sum(ratios) / max(len(ratios), 1), 6),
           "peak_mem_bytes": peak, "quantized_bytes": q_bytes, "fp_bytes_of_those_layers": fp_bytes,
           "notes": "random bf16 weights; activation statistics carry synthetic outlier channels (0.5% × 30)"}
    print(row, flush=True)
    print(f"wrote {write_results(args.name, [row])}")


if __name__ == "__main__":
    main()

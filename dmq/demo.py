"""The README's main job: quantize a shipped digits model and compare it with the float model on the same seeds.

Writes ``<out>/grid.png`` (rows: float, quantized, |difference| × 4) and ``<out>/metrics.json`` (bytes, PSNR, SSIM,
domain-FID with its real-vs-real baseline at the same N, class accuracy for the DiT, timings) and returns the
metrics; the CLI prints them as a table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_demo", "format_table"]

logger = logging.getLogger(__name__)


def _denoiser_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def run_demo(out: str | Path = "dmq-demo", model: str = "digits-dit", preset: str = "svdquant-w4a4",
             num_images: int = 20, steps: int = 20, seed: int = 0, calibrate: bool = True,
             calibration_samples: int = 10, progress: bool = True) -> dict[str, Any]:
    """Run the demo on the CPU (or wherever torch's default device is) and return its metrics dict."""
    import dmq
    from dmq.calibration import CalibrationConfig
    from dmq.config import get_preset
    from dmq.evaluation.digits import DigitsMetrics, generate
    from dmq.evaluation.fidelity import mean_std, psnr, ssim
    from dmq.evaluation.grids import difference, save_grid
    from dmq.models import load

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fp = load(model)
    quant = load(model)
    denoiser = "transformer" if hasattr(fp, "transformer") else "unet"
    fp_bytes = _denoiser_bytes(getattr(fp, denoiser))
    calibration = None
    if calibrate and get_preset(preset).accepts_calibration:
        labels = tuple(range(10)) if denoiser == "transformer" else None
        calibration = CalibrationConfig(class_labels=labels, num_samples=calibration_samples,
                                        num_inference_steps=steps, batch_size=calibration_samples, seed=seed)
    t_q = time.perf_counter()
    dmq.quantize_pipeline(quant, preset, calibration=calibration, progress=progress)
    quantize_s = time.perf_counter() - t_q
    q_bytes = _denoiser_bytes(getattr(quant, denoiser))
    ref, labels = generate(fp, num_images, seed, batch_size=num_images, num_inference_steps=steps, progress=progress)
    img, _ = generate(quant, num_images, seed, batch_size=num_images, num_inference_steps=steps, progress=progress)
    save_grid([ref, img, difference(ref, img)], out / "grid.png", columns=10)
    metrics = DigitsMetrics()
    p, s = psnr(ref, img).tolist(), ssim(ref, img).tolist()
    result: dict[str, Any] = {
        "model": model, "preset": preset, "num_images": num_images, "steps": steps, "seed": seed,
        "calibration_samples": calibration_samples if calibration is not None else 0,
        "denoiser_bytes_fp32": fp_bytes, "denoiser_bytes_quantized": q_bytes,
        "denoiser_bytes_fp16": fp_bytes // 2, "ratio_vs_fp16": round(q_bytes / (fp_bytes / 2), 4),
        "psnr": mean_std(p)[0], "psnr_std": mean_std(p)[1], "ssim": mean_std(s)[0], "ssim_std": mean_std(s)[1],
        "fid_fp32": metrics.fid(ref), "fid_quantized": metrics.fid(img),
        "fid_real_vs_real": metrics.real_baseline(num_images), "fid_features": DigitsMetrics.feature_name,
        "quantize_s": round(quantize_s, 2), "total_s": None, "report": str(quant.dmq_report),
    }
    if labels is not None:
        result["accuracy_fp32"] = metrics.accuracy(ref, labels)
        result["accuracy_quantized"] = metrics.accuracy(img, labels)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    logger.info("dmq demo: wrote %s and %s", out / "grid.png", out / "metrics.json")
    return result


def format_table(m: dict[str, Any]) -> str:
    """The demo's metrics as a short table."""
    rows = [
        ("denoiser bytes", f"{m['denoiser_bytes_fp16'] / 2**20:.2f} MiB (fp16)",
         f"{m['denoiser_bytes_quantized'] / 2**20:.2f} MiB ({m['ratio_vs_fp16']:.2f}× fp16)"),
        ("PSNR vs fp32 (dB)", "—", f"{m['psnr']:.2f} ± {m['psnr_std']:.2f}"),
        ("SSIM vs fp32", "—", f"{m['ssim']:.4f} ± {m['ssim_std']:.4f}"),
        (f"domain-FID (N={m['num_images']}; real-vs-real {m['fid_real_vs_real']:.2f})",
         f"{m['fid_fp32']:.2f}", f"{m['fid_quantized']:.2f}"),
    ]
    if "accuracy_fp32" in m:
        rows.append(("class accuracy", f"{m['accuracy_fp32']:.2f}", f"{m['accuracy_quantized']:.2f}"))
    w = max(len(r[0]) for r in rows)
    lines = [f"{m['model']} · {m['preset']} · {m['num_images']} images · {m['steps']} steps · seed {m['seed']}",
             f"{'':<{w}}  {'fp32':>22}  {'quantized':>26}"]
    lines += [f"{a:<{w}}  {b:>22}  {c:>26}" for a, b, c in rows]
    lines.append(f"quantization {m['quantize_s']:.1f} s, total {m['total_s']:.1f} s")
    return "\n".join(lines)

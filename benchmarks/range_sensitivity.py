"""How much a calibrated static-range model's images move under tiny changes of its activation ranges.

    python benchmarks/range_sensitivity.py --variant qdiffusion-w4a8:norecon     # → results/range-sensitivity-cpu.json

Calibrates ``--variant`` on the shipped U-Net twice, with 1 and with 2 CPU threads (float summation order is the only
difference), and reports the largest relative difference between the two sets of activation ranges
(``input_scale``), then generates the same images with every range scaled by ``1 + eps`` for a few ``eps`` and reports
PSNR against fp32, per image and on average. Rows: one per thread count and one per ``eps``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from fidelity import parse_variant  # noqa: E402

import dmq  # noqa: E402
from dmq.evaluation.digits import generate  # noqa: E402
from dmq.evaluation.fidelity import psnr  # noqa: E402
from dmq.models import load  # noqa: E402


def _scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("input_scale")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="qdiffusion-w4a8:norecon")
    parser.add_argument("--num-images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--eps", type=float, nargs="*", default=[0.0, 1e-6, -1e-6, 1e-3])
    parser.add_argument("--name", default="range-sensitivity-cpu")
    args = parser.parse_args()
    fp = load("digits-unet")
    ref, _ = generate(fp, args.num_images, 0, num_inference_steps=args.steps, batch_size=args.num_images,
                      progress=False)
    rows, pipes = [], {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cfg, calib = parse_variant(args.variant, "digits-unet", args.calibration_samples, args.steps, 0)
        pipes[threads] = load("digits-unet")
        dmq.quantize_pipeline(pipes[threads], cfg, calibration=calib, progress=False)
    a, b = _scales(pipes[1].unet), _scales(pipes[2].unet)
    rel = max(float(((a[k] - b[k]).abs() / a[k].abs().clamp(min=1e-30)).max()) for k in a)
    differing = sum(not torch.equal(a[k], b[k]) for k in a)
    for threads, pipe in pipes.items():
        img, _ = generate(pipe, args.num_images, 0, num_inference_steps=args.steps, batch_size=args.num_images,
                          progress=False)
        rows.append({"case": "digits-unet", "variant": f"{args.variant} calibrated with {threads} thread(s)",
                     "psnr": float(psnr(ref, img).clamp(max=100).mean()), "ranges": len(a),
                     "ranges_differing_1_vs_2_threads": differing, "max_rel_range_diff": rel})
        print(rows[-1], flush=True)
    torch.set_num_threads(1)
    base = _scales(pipes[1].unet)
    buffers = dict(pipes[1].unet.named_buffers())
    for eps in args.eps:
        with torch.no_grad():
            for k, v in base.items():
                buffers[k].copy_(v * (1 + eps))
        img, _ = generate(pipes[1], args.num_images, 0, num_inference_steps=args.steps, batch_size=args.num_images,
                          progress=False)
        p = psnr(ref, img).clamp(max=100)
        rows.append({"case": "digits-unet", "variant": f"{args.variant} ranges × (1 + {eps:g})",
                     "psnr": float(p.mean()), "psnr_image_min": float(p.min()), "psnr_image_max": float(p.max()),
                     "psnr_first_images": " ".join(f"{float(v):.1f}" for v in p[:8])})
        print(rows[-1], flush=True)
    print(f"wrote {write_results(args.name, rows)}")


if __name__ == "__main__":
    main()

"""Denoiser weight bytes for fp16 and each dmq preset at the real model configs, built on the meta device.

    python benchmarks/memory.py            # → benchmarks/results/memory.json and a Markdown table on stdout

No weights are needed: the models are built on ``meta`` and quantized there; bytes come from the exact storage
formula of each format (codes + scales + bias), checked against real tensors in the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from model_configs import MODEL_CONFIGS, build_model  # noqa: E402

from dmq.config import get_preset, list_presets  # noqa: E402
from dmq.pipelines.quantize import quantize_model  # noqa: E402
from dmq.pipelines.roles import roles_for  # noqa: E402


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODEL_CONFIGS))
    parser.add_argument("--presets", nargs="*", default=list(list_presets()))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        fp = build_model(name, device="meta", dtype=torch.float16)
        fp_bytes = model_bytes(fp)
        rows.append({"case": name, "variant": "fp16", "bytes": fp_bytes, "gib": round(fp_bytes / 2**30, 3),
                     "ratio_vs_fp16": 1.0})
        for preset in args.presets:
            model = build_model(name, device="meta", dtype=torch.float16)
            quantize_model(model, get_preset(preset), roles_for(model), name, progress=False)
            b = model_bytes(model)
            rows.append({"case": name, "variant": preset, "bytes": b, "gib": round(b / 2**30, 3),
                         "ratio_vs_fp16": round(b / fp_bytes, 4)})
    path = write_results("memory", rows)
    variants = ["fp16", *args.presets]
    print("| model | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for name in args.models:
        cells = []
        for v in variants:
            r = next(r for r in rows if r["case"] == name and r["variant"] == v)
            cells.append(f"{r['gib']:.2f} GiB" if v == "fp16" else f"{r['gib']:.2f} GiB ({r['ratio_vs_fp16']:.2f}×)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

"""Tiling sweep of the 8-bit attention pre-pass (``dmq.kernels.triton.attention.prepare``: Q/K int8, V fp8 per
channel) on FLUX, PixArt-Σ and SDXL shapes: channels per V program (``V_CHANNELS``), tokens per V load
(``V_TOKENS``) and warps, each checked bit-identical to the default tiling's codes and scales. Writes
``benchmarks/results/attention-prepass-<device>.json``.

    python benchmarks/attention_prepass.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_results  # noqa: E402
from kernel_bench import bench, slug  # noqa: E402

from dmq.kernels.triton import attention as ta  # noqa: E402

SHAPES = {"flux": (1, 24, 4608, 128), "pixart": (2, 16, 4096, 72), "sdxl": (2, 10, 4096, 64)}


def with_warps(kernel, num_warps: int):
    """``kernel`` whose launches use ``num_warps`` (prepare() passes the module's default)."""
    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                return kernel[grid](*args, **{**kwargs, "num_warps": num_warps})
            return launch
    return Launcher()


def main() -> None:
    torch.manual_seed(0)
    rows, t0 = [], time.time()
    for case, (b, h, n, d) in SHAPES.items():
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        v[..., 5] *= 20                                     # an outlier channel
        base = ta.prepare(q, k, v, 0.1)
        codes0, scales0 = base.codes.clone(), base.scales.clone()
        defaults = (ta.V_CHANNELS, ta.V_TOKENS, ta._quant_kernel)
        try:
            for dc in (8, 16, 32):
                for tv in (256, 512, 1024, 2048):
                    if dc * tv > 32768:
                        continue
                    for nw in (4, 8):
                        ta.V_CHANNELS, ta.V_TOKENS, ta._quant_kernel = dc, tv, with_warps(defaults[2], nw)
                        r = ta.prepare(q, k, v, 0.1)
                        same = torch.equal(r.codes, codes0) and torch.equal(r.scales, scales0)
                        ms = bench(lambda: ta.prepare(q, k, v, 0.1))[0]
                        rows.append({"case": case, "variant": f"V_CHANNELS={dc},V_TOKENS={tv},w{nw}", "ms": round(ms, 5),
                                     "bit_identical": same})
                        print(f"{case:7s} {rows[-1]['variant']:32s} {ms:.4f} ms  bit-identical {same}", flush=True)
        finally:
            ta.V_CHANNELS, ta.V_TOKENS, ta._quant_kernel = defaults
    print(f"wrote {write_results(f'attention-prepass-{slug(torch.cuda.get_device_name())}', rows)} "
          f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()

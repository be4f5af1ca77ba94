"""torch.compile on the GPU: each quantized layer kind compiles to one graph (``fullgraph=True``) over dmq's Triton
custom ops and matches its eager output; compile time and the eager / compiled step time of one layer.

    python benchmarks/compile_check.py        # CUDA → benchmarks/results/compile-<device>.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402

from dmq.config import get_preset  # noqa: E402
from dmq.pipelines.quantize import quantize_model  # noqa: E402
from dmq.pipelines.roles import ArchRoles  # noqa: E402

PRESETS = ("w8a8", "svdquant-w4a4", "fp8", "w4a8", "svdquant-nvfp4")


def main() -> None:
    import triton

    rows = []
    torch.manual_seed(0)
    x = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    for preset in PRESETS:
        model = torch.nn.Sequential(torch.nn.Linear(3072, 3072)).to("cuda", torch.bfloat16)
        row = {"case": "linear 4096×3072×3072", "variant": preset}
        try:
            quantize_model(model, get_preset(preset), ArchRoles(family="generic"), progress=False)
            with torch.inference_mode():
                eager = model(x)
                torch._dynamo.reset()
                compiled = torch.compile(model, fullgraph=True)
                t0 = time.perf_counter()
                out = compiled(x)
                torch.cuda.synchronize()
                row["compile_s"] = round(time.perf_counter() - t0, 2)
                row["max_rel_err_vs_eager"] = float((out.float() - eager.float()).abs().max()
                                                    / eager.float().abs().max())
                row["eager_ms"] = round(triton.testing.do_bench(lambda: model(x)), 4)
                row["compiled_ms"] = round(triton.testing.do_bench(lambda: compiled(x)), 4)
        except Exception as exc:  # one failing preset must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(row, flush=True)
        rows.append(row)
    print(f"wrote {write_results('compile-' + torch.cuda.get_device_name().split()[1].lower(), rows)}")


if __name__ == "__main__":
    main()

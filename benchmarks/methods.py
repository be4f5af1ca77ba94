"""The diffusion methods on both shipped models: plain w4a4, SmoothQuant, SVDQuant at rank 8/16/32/64 (INT4 and
NVFP4), w4a8, Q-Diffusion and TFMQ-DM; fidelity over seeds as in fidelity.py.

    python benchmarks/methods.py        # → benchmarks/results/methods.json (a GPU makes it take minutes)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402

VARIANTS = ["w4a4", "smoothquant-w4a4", "svdquant-w4a4:r8", "svdquant-w4a4:r16", "svdquant-w4a4",
            "svdquant-w4a4:r64", "svdquant-nvfp4", "w4a8", "qdiffusion-w4a8", "tfmq-w4a8"]

if __name__ == "__main__":
    if "--variants" not in sys.argv:
        sys.argv += ["--variants", *VARIANTS]
    if "--name" not in sys.argv:
        sys.argv += ["--name", "methods"]
    fidelity.main()

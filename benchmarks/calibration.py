"""Calibration choices for the shipped U-Net at W4A8: one timestep vs the uniform, normal (PTQ4DM) and eda (EDA-DM)
samplers, with and without block reconstruction; fidelity over seeds, calibration time and peak memory.

    python benchmarks/calibration.py        # → benchmarks/results/calibration.json (rows as in fidelity.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402

VARIANTS = ["w4a8", "w4a8-static:single", "w4a8-static:uniform", "w4a8-static:normal", "w4a8-static:eda",
            "qdiffusion-w4a8:norecon", "qdiffusion-w4a8:single", "qdiffusion-w4a8", "qdiffusion-w4a8:eda"]

if __name__ == "__main__":
    if "--variants" not in sys.argv:
        sys.argv += ["--variants", *VARIANTS]
    if "--models" not in sys.argv:
        sys.argv += ["--models", "digits-unet"]
    if "--name" not in sys.argv:
        sys.argv += ["--name", "calibration"]
    fidelity.main()

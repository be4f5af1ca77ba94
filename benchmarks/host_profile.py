"""Where the host's time goes in one eager denoiser step (Python-level ``cProfile``), for finding launch overhead.

    python benchmarks/host_profile.py --model flux-dev --variant dmq-svdquant-w4a4-2l

Builds the model from its published config with random bf16 weights on the GPU, applies a variant of
``benchmarks/e2e.py``, warms up, then profiles ``--steps`` steps. Rows: the step's wall time with and without the
profiler, and the functions with the most own time (``tottime``) and the dmq functions with the most cumulative
time, per step. cProfile slows Python down, so read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from e2e import _prepare  # noqa: E402
from model_configs import build_model, make_inputs  # noqa: E402


def _step_ms(fn, steps: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux-dev")
    ap.add_argument("--variant", default="dmq-svdquant-w4a4-2l")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--name", default="host-profile-h100")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, device="cuda", dtype=torch.bfloat16)
    inputs = make_inputs(args.model, batch=1, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        model, note = _prepare(model, args.variant)
    rows = []
    with torch.inference_mode():
        step = lambda: model(**inputs)  # noqa: E731
        _step_ms(step, 2)                                  # autotuning and lazy initialisation
        wall = _step_ms(step, args.steps)
        prof = cProfile.Profile()
        prof.enable()
        profiled = _step_ms(step, args.steps)
        prof.disable()
    rows.append({"case": args.model, "variant": args.variant, "kind": "step", "wall_ms": round(wall, 2),
                 "profiled_wall_ms": round(profiled, 2), "notes": note})
    stats = pstats.Stats(prof)
    entries = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        entries.append((f"{Path(file).name}:{line}({func})", file, ncalls, tottime, cumtime))
    per = 1e3 / args.steps
    for kind, key, pick in (("tottime", 3, lambda e: True), ("dmq_cumtime", 4, lambda e: "/dmq/" in e[1])):
        for name, _, ncalls, tottime, cumtime in sorted(filter(pick, entries), key=lambda e: -e[key])[:args.top]:
            rows.append({"case": args.model, "variant": args.variant, "kind": kind, "function": name,
                         "calls_per_step": ncalls // args.steps, "tottime_ms_per_step": round(tottime * per, 2),
                         "cumtime_ms_per_step": round(cumtime * per, 2)})
    for r in rows:
        print(r)
    print(f"wrote {write_results(args.name, rows)}")


if __name__ == "__main__":
    main()

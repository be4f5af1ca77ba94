"""The ``dmq`` command line: ``dmq demo`` (the README's main job) and ``dmq presets``."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from dmq.demo import format_table, run_demo

    metrics = run_demo(out=args.out, model=args.model, preset=args.preset, num_images=args.num_images,
                       steps=args.steps, seed=args.seed, calibrate=not args.no_calibrate,
                       calibration_samples=args.calibration_samples, progress=not args.quiet)
    print(format_table(metrics))
    print(f"\nwrote {args.out}/grid.png (rows: fp32, quantized, |difference| × 4) and {args.out}/metrics.json")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from dmq.config import list_presets

    for name, desc in list_presets().items():
        print(f"{name:<18} {desc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmq", description="Diffusion-model quantization for diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a shipped digits model and compare it with fp32 (offline, CPU)")
    demo.add_argument("--out", default="dmq-demo", help="output folder (grid.png, metrics.json)")
    demo.add_argument("--model", default="digits-dit", choices=("digits-dit", "digits-unet"))
    demo.add_argument("--preset", default="svdquant-w4a4", help="a preset name (see `dmq presets`)")
    demo.add_argument("--num-images", type=int, default=20)
    demo.add_argument("--steps", type=int, default=20, help="sampler steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--calibration-samples", type=int, default=10)
    demo.add_argument("--no-calibrate", action="store_true", help="skip calibration (data-free where possible)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    presets = sub.add_parser("presets", help="list the quantization presets")
    presets.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from dmq.errors import DmqError

    try:
        return args.func(args)
    except (DmqError, FileNotFoundError, ValueError) as exc:
        print(f"dmq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

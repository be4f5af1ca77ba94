"""The ``dmq`` command line: ``dmq quantize``, ``dmq bench``, ``dmq demo`` (the README's main job), ``dmq presets``.

Each subcommand is added by an ``_add_<name>(sub)`` function listed in :func:`build_parser`. A user mistake
(unknown preset, missing model or file, bad number) exits with code 2 and one line ``dmq <cmd>: error: ...`` on
stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dmq <cmd>: error: ...``) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(minimum: int, what: str):
    """An argparse type: an int ``>= minimum``, else a one-line error naming ``what``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_class_label = _int_at_least(0, "a class label (an integer >= 0)")


# -- shared pieces -------------------------------------------------------------------------------------------------
def _load_pipeline(model: str, device: str | None, torch_dtype: str | None) -> Any:
    """A shipped digits model by name, a local pipeline folder, or a Hugging Face Hub id."""
    import os

    import torch

    from dmq.errors import DmqError
    from dmq.models import available, load
    from dmq.models.architectures import SPECS

    dtype = getattr(torch, torch_dtype) if torch_dtype else None
    if model in available():
        if SPECS[model].kind == "classifier":
            raise DmqError(f"{model} is a classifier, not a diffusion model")
        return load(model, device=device, torch_dtype=dtype)
    path = Path(model).expanduser()
    if not path.exists():
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise DmqError(f"no model folder {model!r} (and it is neither a shipped model — "
                           f"{', '.join(n for n in available() if SPECS[n].kind != 'classifier')} — nor a Hub id "
                           "like 'org/name')")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise DmqError(f"{model!r} is not a local folder and HF_HUB_OFFLINE=1 forbids downloading it")
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DmqError(f"could not load a diffusers pipeline from {model!r}: {first}") from None
    return pipe.to(device) if device else pipe


def _read_prompts(path: str) -> tuple[str, ...]:
    from dmq.errors import DmqError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DmqError(f"--calib-prompts: no such file {path!r}") from None
    except IsADirectoryError:
        raise DmqError(f"--calib-prompts: {path!r} is a folder, not a text file") from None
    except UnicodeDecodeError:
        raise DmqError(f"--calib-prompts: {path!r} is not a UTF-8 text file (one prompt per line)") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise DmqError(f"--calib-prompts: {path!r} has no prompts (one per line)")
    return prompts


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (used by presets that calibrate; any of these turns it on)")
    g.add_argument("--calib-prompts", metavar="FILE", help="text file, one prompt per line (text-to-image)")
    g.add_argument("--calib-class-labels", metavar="N", nargs="+", type=_class_label,
                   help="class labels (class-conditional pipelines such as DiT)")
    g.add_argument("--calib-samples", metavar="N", type=_positive_int, help="images generated for calibration")
    g.add_argument("--calib-steps", metavar="N", type=_positive_int, help="sampler steps of each calibration image")
    g.add_argument("--calib-batch-size", metavar="N", type=_positive_int, default=1)


def _calibration(args: argparse.Namespace, preset: Any) -> Any:
    """The CalibrationConfig the arguments ask for, or None (data-free) when none is given and the preset does not
    need one."""
    from dmq.calibration import CalibrationConfig

    given = any(getattr(args, a) is not None for a in
                ("calib_prompts", "calib_class_labels", "calib_samples", "calib_steps"))
    if not given and not preset.needs_calibration:
        return None
    kw: dict[str, Any] = {"batch_size": args.calib_batch_size, "seed": args.seed}
    if args.calib_prompts is not None:
        kw["prompts"] = _read_prompts(args.calib_prompts)
    if args.calib_class_labels is not None:
        kw["class_labels"] = tuple(args.calib_class_labels)
    if args.calib_samples is not None:
        kw["num_samples"] = args.calib_samples
    if args.calib_steps is not None:
        kw["num_inference_steps"] = args.calib_steps
    return CalibrationConfig(**kw)


def _add_model_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--model", required=default is None, default=default,
                   help="a shipped model (digits-unet, digits-dit), a local pipeline folder or a Hub id"
                        + (f" (default {default})" if default else ""))
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: where the model loads, CPU)")
    p.add_argument("--torch-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="load the model in this dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# -- quantize ------------------------------------------------------------------------------------------------------
def _quantize(args: argparse.Namespace) -> int:
    import dmq
    from dmq.config import get_preset

    preset = get_preset(args.preset)  # fail on a typo before loading anything
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    calibration = _calibration(args, preset)
    pipe = _load_pipeline(args.model, args.device, args.torch_dtype)
    dmq.quantize_pipeline(pipe, args.preset, calibration=calibration, progress=not args.quiet)
    dmq.save_quantized(pipe, out, overwrite=args.overwrite)
    print(pipe.dmq_report)
    print(f"wrote {out} (load with dmq.load_quantized({str(out)!r}, pipe) or through diffusers' from_pretrained "
          "after dmq.integrations.diffusers.register())")
    return 0


def _add_quantize(sub: Any) -> None:
    p = sub.add_parser("quantize", help="quantize a pipeline's denoiser and save it (safetensors)",
                       description="Quantize a diffusers pipeline's denoiser with a preset and save it with "
                                   "dmq.save_quantized.")
    _add_model_args(p, default=None)
    p.add_argument("--preset", required=True, help="a preset name (see `dmq presets`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_calibration_args(p)
    p.set_defaults(func=_quantize)


# -- bench ---------------------------------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> int:
    import copy

    import torch

    import dmq
    from dmq.bench import capture_denoiser_inputs, time_forward
    from dmq.config import get_preset
    from dmq.pipelines.quantize import denoiser_name

    preset = get_preset(args.preset)
    calibration = _calibration(args, preset)
    pipe = _load_pipeline(args.model, args.device, args.torch_dtype)
    fp = copy.deepcopy(getattr(pipe, denoiser_name(pipe)))
    inputs = capture_denoiser_inputs(pipe, args.batch_size, args.seed)
    dmq.quantize_pipeline(pipe, args.preset, calibration=calibration, progress=not args.quiet)
    quant = getattr(pipe, denoiser_name(pipe))
    if args.compile:
        fp, quant = torch.compile(fp), torch.compile(quant)
    elif args.compile_blocks:
        dmq.compile_blocks(fp)
        dmq.compile_blocks(quant)
    device = next(quant.parameters()).device
    ms_fp = time_forward(fp, *inputs, warmup=args.warmup, iters=args.iters)
    ms_q = time_forward(quant, *inputs, warmup=args.warmup, iters=args.iters)
    dtype = next(fp.parameters()).dtype
    label = f"{type(quant).__name__} forward, batch {args.batch_size}, {device}, {str(dtype).removeprefix('torch.')}"
    mode = " · torch.compile" if args.compile else " · dmq.compile_blocks" if args.compile_blocks else ""
    print(f"{args.model} · {label}{mode} (median of {args.iters})")
    print(f"  float       {ms_fp:10.3f} ms")
    print(f"  {args.preset:<11} {ms_q:10.3f} ms   ratio {ms_q / ms_fp:.3f}× float")
    if device.type != "cuda":
        print("  (not on a GPU: quantized layers run their pure-PyTorch reference, which simulates the formats and "
              "is slower than float)")
    return 0


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="time a denoiser forward, float vs quantized, in one process",
                       description="Time the denoiser forward of a model in float and quantized with a preset, on "
                                   "the same captured inputs, and print both and their ratio.")
    _add_model_args(p, default="digits-dit")
    p.add_argument("--preset", default="w8a8", help="a preset name (see `dmq presets`; default w8a8)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="images per forward (before CFG)")
    p.add_argument("--iters", type=_positive_int, default=10, help="timed forwards")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first")
    compile_mode = p.add_mutually_exclusive_group()
    compile_mode.add_argument("--compile", action="store_true", help="torch.compile both models first")
    compile_mode.add_argument("--compile-blocks", action="store_true",
                              help="compile the repeated blocks of both models first (dmq.compile_blocks)")
    _add_calibration_args(p)
    p.set_defaults(func=_bench)


# -- demo, presets -------------------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from dmq.demo import format_table, run_demo

    metrics = run_demo(out=args.out, model=args.model, preset=args.preset, num_images=args.num_images,
                       steps=args.steps, seed=args.seed, calibrate=not args.no_calibrate,
                       calibration_samples=args.calibration_samples, progress=not args.quiet)
    print(format_table(metrics))
    print(f"\nwrote {args.out}/grid.png (rows: fp32, quantized, |difference| × 4) and {args.out}/metrics.json")
    return 0


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="quantize a shipped digits model and compare it with fp32 (offline, CPU)")
    demo.add_argument("--out", default="dmq-demo", help="output folder (grid.png, metrics.json)")
    demo.add_argument("--model", default="digits-dit", choices=("digits-dit", "digits-unet"))
    demo.add_argument("--preset", default="svdquant-w4a4", help="a preset name (see `dmq presets`)")
    demo.add_argument("--num-images", type=_positive_int, default=20)
    demo.add_argument("--steps", type=_positive_int, default=20, help="sampler steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--calibration-samples", type=_positive_int, default=10)
    demo.add_argument("--no-calibrate", action="store_true", help="skip calibration (data-free where possible)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)


def _presets(args: argparse.Namespace) -> int:
    from dmq.config import list_presets

    for name, desc in list_presets().items():
        print(f"{name:<18} {desc}")
    return 0


def _add_presets(sub: Any) -> None:
    sub.add_parser("presets", help="list the quantization presets").set_defaults(func=_presets)


# -- eval (dmq.evaluation.runner; several processes: `accelerate launch --num_processes N -m dmq.cli eval ...`) ----
def _eval(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from dmq.evaluation.runner import evaluate, format_rows

    doc = evaluate(args.pipeline, args.out, variants=args.variants, num_images=args.num_images, seed=args.seed,
                   prompt_file=args.prompts, class_labels=args.class_labels, steps=args.steps,
                   guidance_scale=args.guidance_scale, batch_size=args.batch_size, fid_features=args.fid_features,
                   real_images=args.real_images, clip=args.clip, lpips=args.lpips,
                   calibration_samples=args.calibration_samples, progress=not args.quiet)
    if PartialState().is_main_process:
        print(format_rows(doc["rows"]) + f"\n\nwrote {args.out}/results.json, grids and images")
    return 0


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="16-bit vs quantized images on the same seeds: PSNR/SSIM/LPIPS, FID, CLIP score")
    p.add_argument("pipeline", help="a shipped digits model (digits-dit, digits-unet) or a diffusers pipeline folder")
    p.add_argument("--variants", nargs="+", default=["dmq:w8a8"],
                   help="dmq:<preset>, torchao:int8dq|fp8dq, bnb:nf4|int8, quanto:int8|int4|fp8")
    p.add_argument("--out", default="dmq-eval", help="output folder (resumable: existing images are kept)")
    p.add_argument("--num-images", type=_positive_int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: a built-in set)")
    p.add_argument("--class-labels", type=_class_label, nargs="+", default=None, help="DiT labels (default 0..9)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the pipeline's)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--fid-features", default=None,
                   help="auto | inception | fid-helper | digits | path/to/default_1.pt (default: digits for the "
                        "digits models, else auto)")
    p.add_argument("--real-images", default=None, help="folder of real images for FID (digits: the held-out split)")
    p.add_argument("--clip", default=None, help="CLIP score model: openai:ViT-B/32 (clip-anytorch) or hf:<folder>")
    p.add_argument("--lpips", default=None, choices=("alex", "vgg", "squeeze"), help="LPIPS backbone (needs weights)")
    p.add_argument("--calibration-samples", type=_positive_int, default=8, help="for presets that calibrate")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmq", description="Diffusion-model quantization for diffusers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quantize, _add_bench, _add_demo, _add_eval, _add_presets):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the subcommand's own parser, so that the message names it
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "quiet", False):
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    from dmq.errors import DmqError

    try:
        return args.func(args)
    except (DmqError, OSError, ValueError) as exc:  # user mistakes; bugs keep their traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"dmq {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

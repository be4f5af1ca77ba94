"""Train dmq's bundled digits models.

    python -m dmq.models.train --model digits-unet|digits-dit|classifier --steps N --batch-size B \\
        --out dmq/models/weights [--device cuda] [--seed 0]

Writes ``<out>/<name>/``: ``config.json``, ``model.safetensors`` (the EMA weights for the diffusion models),
``scheduler_config.json`` (the sampling scheduler), ``loss_log.json``, ``samples.png`` and ``train_info.json``
(exact command, steps, final loss, wall time, device, and, when a trained classifier is found in ``<out>``, the
classifier accuracy / FID of generated samples). Train the classifier first so that the diffusion runs can
evaluate themselves.

AdamW (fused on CUDA), linear warmup then cosine decay (or constant), gradient clipping, EMA of the weights,
bf16 autocast on CUDA. Seeded: the same command on the same device gives the same weights (on CUDA, deterministic
algorithms are requested unless ``--no-deterministic``).

The defaults (``architectures.SPECS[...].train``) are sized for about 4 minutes of training each on one H100,
where these small models are bound by Python / kernel-launch overhead (~55-80 ms a step whether the batch is
256 or 512)::

    python -m dmq.models.train --model classifier  --steps 1500 --batch-size 256 --device cuda
    python -m dmq.models.train --model digits-unet --steps 3000 --batch-size 512 --device cuda
    python -m dmq.models.train --model digits-dit  --steps 3500 --batch-size 512 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("dmq.models.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dmq.models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="digits-unet, digits-dit or classifier (digits-classifier)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's")
    p.add_argument("--out", default=None, help="weights folder; the model goes to <out>/<name> (default: the package)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=None, help="diffusion models only")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=64, help="images in samples.png (DiT: rounded to rows of 10)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps for samples.png and the evaluation")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="samples for the classifier accuracy / FID evaluation (default 1000 on CUDA, 0 on CPU; 0 = none)",
    )
    p.add_argument(
        "--save-dtype", choices=("auto", "float32", "float16"), default="auto", help="auto: float32 if <= 20 MB"
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop training early after this wall time")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training (CUDA)")
    p.add_argument("--no-deterministic", action="store_true", help="allow non-deterministic CUDA kernels")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied), with the usual warm-up."""

    def __init__(self, model, decay: float):
        import torch

        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = [p for p in self.model.parameters()]
        self._src = [p for p in model.parameters()]
        self._ema_buf = list(self.model.buffers())
        self._src_buf = list(model.buffers())
        self._torch = torch

    def update(self, step: int) -> None:
        torch = self._torch
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self._ema, self._src, 1.0 - d)
            for e, s in zip(self._ema_buf, self._src_buf):
                e.copy_(s)


class IndexStream:
    """Batches of indices from consecutive random permutations of ``range(n)`` (every image once per epoch)."""

    def __init__(self, n: int, batch_size: int, generator, device):
        self.n, self.batch_size, self.generator, self.device = n, batch_size, generator, device
        self._buf = None
        self._pos = 0

    def next(self):
        import torch

        parts, need = [], self.batch_size
        while need > 0:
            if self._buf is None or self._pos >= self.n:
                self._buf = torch.randperm(self.n, generator=self.generator, device=self.device)
                self._pos = 0
            take = min(need, self.n - self._pos)
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    def f(step: int) -> float:  # step counts from 0 (LambdaLR)
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    return dev


def _device_name(dev) -> str:
    import platform

    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _save_grid(images01, path: Path, ncol: int, upscale: int = 2, pad: int = 2) -> None:
    """Save ``(N, 1, H, W)`` images in [0, 1] as a grid PNG."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    x = images01.detach().float().cpu().clamp(0, 1)
    if upscale > 1:
        x = F.interpolate(x, scale_factor=upscale, mode="nearest")
    n, _, h, w = x.shape
    nrow = math.ceil(n / ncol)
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32) * 0.5
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = x[i, 0].numpy()
    Image.fromarray((grid * 255).round().astype(np.uint8), mode="L").save(path)


# ----------------------------------------------------------------------------------------------------------------


def _save_weights(model, folder: Path, name: str, save_dtype: str, kind: str) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_file

    from . import architectures as arch

    n_params = arch.count_params(model)
    dtype = arch.storage_dtype(n_params) if save_dtype == "auto" else getattr(torch, save_dtype)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    path = folder / arch.WEIGHTS_FILE
    save_file(state, str(path), metadata={"format": "pt", "dmq_model": name, "dtype": str(dtype)})
    if kind == "classifier":
        _write_json(folder / arch.CONFIG_FILE, {"_class_name": "DigitClassifier", **model.config})
    else:
        model.save_config(folder)
        arch.build_inference_scheduler(name).save_config(folder)
    size = path.stat().st_size
    if size > arch.MAX_WEIGHTS_BYTES:
        logger.warning("%s is %.1f MB, over the %.0f MB limit", path, size / 1e6, arch.MAX_WEIGHTS_BYTES / 1e6)
    return {"params": n_params, "weights_dtype": str(dtype).replace("torch.", ""), "weights_bytes": size}


def _train_loop(args, name: str, spec, device, gen) -> dict[str, Any]:
    """The shared optimisation loop. Returns the trained (EMA) model and the log."""
    import torch
    import torch.nn.functional as F

    from . import architectures as arch
    from .data import augment, load_split

    td = spec.train
    steps = args.steps if args.steps is not None else td.steps
    batch = args.batch_size if args.batch_size is not None else td.batch_size
    lr = args.lr if args.lr is not None else td.lr
    warmup = min(args.warmup if args.warmup is not None else td.warmup_steps, max(0, steps - 1))
    schedule = args.lr_schedule or td.lr_schedule
    wd = args.weight_decay if args.weight_decay is not None else td.weight_decay
    ema_decay = args.ema_decay if args.ema_decay is not None else td.ema_decay
    kind = spec.kind
    use_ema = kind != "classifier" and ema_decay is not None and ema_decay > 0

    train = load_split("train").to(device)
    images, labels = train.images, train.labels
    stream = IndexStream(len(train), batch, gen, device)

    model = arch.build_model(name).to(device)
    model.train()
    ema = EMA(model, ema_decay) if use_ema else None
    fwd_model = torch.compile(model) if args.compile else model
    # fused AdamW on CUDA: the for-each implementation costs ~15 ms of CPU time a step at these sizes
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=wd, **fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps, schedule, td.min_lr_ratio))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    if kind != "classifier":
        ac = arch.build_train_scheduler().alphas_cumprod.to(device=device, dtype=torch.float32)
        sqrt_ab, sqrt_1m_ab = ac.sqrt(), (1.0 - ac).sqrt()
        num_t = ac.shape[0]
        null_class = int(model.config.num_embeds_ada_norm) if kind == "dit" else None

    log: list[dict[str, Any]] = []
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    hyper = {
        "steps": steps,
        "batch_size": batch,
        "lr": lr,
        "warmup_steps": warmup,
        "lr_schedule": schedule,
        "min_lr_ratio": td.min_lr_ratio,
        "weight_decay": wd,
        "grad_clip": td.grad_clip,
        "ema_decay": ema_decay if use_ema else None,
        "label_dropout": td.label_dropout if kind == "dit" else None,
        "augment": td.augment,
    }
    logger.info("training %s on %s: %s", name, _device_name(device), hyper)
    folder = args._folder
    t_start = time.perf_counter()
    t_after_warm = None
    warm_steps = min(10, steps - 1)
    done = 0
    for step in range(1, steps + 1):
        idx = stream.next()
        x0 = augment(images[idx], gen, **td.augment)
        y = labels[idx]
        with autocast:
            if kind == "classifier":
                logits = fwd_model((x0 + 1.0) * 0.5)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=0.05)
            else:
                noise = torch.randn(x0.shape, generator=gen, device=device)
                t = torch.randint(0, num_t, (x0.shape[0],), generator=gen, device=device)
                xt = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ab[t].view(-1, 1, 1, 1) * noise
                if kind == "unet":
                    pred = fwd_model(xt, t).sample
                else:
                    drop = torch.rand(y.shape, generator=gen, device=device) < td.label_dropout
                    y_in = torch.where(drop, torch.full_like(y, null_class), y)
                    pred = fwd_model(xt, timestep=t, class_labels=y_in).sample
                loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if td.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), td.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(step)
        loss_sum += loss.detach()
        loss_n += 1
        done = step
        if step == warm_steps:
            _sync(device)
            t_after_warm = time.perf_counter()
        if step % args.log_every == 0 or step == steps:
            _sync(device)
            elapsed = time.perf_counter() - t_start
            entry = {
                "step": step,
                "loss": loss_sum.item() / max(1, loss_n),
                "lr": opt.param_groups[0]["lr"],
                "elapsed_s": round(elapsed, 3),
            }
            log.append(entry)
            logger.info("step %d/%d loss %.5f lr %.2e %.1fs", step, steps, entry["loss"], entry["lr"], elapsed)
            _write_json(folder / "loss_log.json", log)
            loss_sum.zero_()
            loss_n = 0
            if args.max_minutes is not None and elapsed > 60.0 * args.max_minutes and step < steps:
                logger.warning("stopping at step %d: --max-minutes %.1f reached", step, args.max_minutes)
                break
    _sync(device)
    t_end = time.perf_counter()  # every step ends logged: the last one, or an early stop right after a log
    step_ms = None
    if t_after_warm is not None and done > warm_steps:
        step_ms = 1000.0 * (t_end - t_after_warm) / (done - warm_steps)
    final = ema.model if ema is not None else model
    final.eval()
    return {
        "model": final,
        "hyper": hyper,
        "steps_done": done,
        "train_wall_s": t_end - t_start,
        "step_time_ms": step_ms,
        "final_loss": log[-1]["loss"] if log else None,
        "images": images,
    }


# ----------------------------------------------------------------------------------------------------------------


def _find_classifier(out_base: Path, device):
    """The trained classifier from ``out_base`` or the package, or None."""
    from . import WeightsNotFoundError, load_classifier

    for base in (out_base, None):
        try:
            return load_classifier(weights_dir=base, device=device)
        except WeightsNotFoundError:
            continue
    return None


def _generate(pipe, kind: str, n: int, steps: int, seed: int, device, guidance: float | None = None, batch: int = 500):
    import torch

    outs = []
    g = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        if kind == "unet":
            out = pipe(batch_size=m, generator=g, num_inference_steps=steps, output_type="pt").images
        else:
            labels = [(start + i) % 10 for i in range(m)]
            out = pipe(
                class_labels=labels, guidance_scale=guidance, generator=g, num_inference_steps=steps, output_type="pt"
            ).images
        outs.append(out.float())
    return torch.cat(outs)


def _evaluate(pipe, kind: str, classifier, n: int, steps: int, seed: int, device, default_guidance) -> dict[str, Any]:
    import torch

    from .data import load_split

    result: dict[str, Any] = {"num_samples": n, "num_inference_steps": steps}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:  # pragma: no cover
        FrechetInceptionDistance = None
        logger.warning("torchmetrics not installed: no FID")
    refs = {s: (load_split(s).images.to(device) + 1.0) * 0.5 for s in ("heldout", "train")}

    def fid(fake) -> dict[str, float]:
        if FrechetInceptionDistance is None:
            return {}
        res = {}
        for split, real in refs.items():
            metric = FrechetInceptionDistance(feature=classifier.feature_extractor(), normalize=True).to(device)
            metric.update(real, real=True)
            metric.update(fake, real=False)
            res[f"fid_vs_{split}"] = float(metric.compute())
        return res

    # the held-out images themselves, as a reference point for the numbers below
    with torch.no_grad():
        held = load_split("heldout")
        acc = (classifier.predict(refs["heldout"]).cpu() == held.labels).float().mean().item()
    result["classifier_heldout_accuracy"] = acc
    if FrechetInceptionDistance is not None:
        m = FrechetInceptionDistance(feature=classifier.feature_extractor(), normalize=True).to(device)
        m.update(refs["train"], real=True)
        m.update(refs["heldout"], real=False)
        result["fid_heldout_vs_train"] = float(m.compute())
    if kind == "unet":
        fake = _generate(pipe, kind, n, steps, seed, device)
        with torch.no_grad():
            pred = classifier.predict(fake).cpu()
            conf = torch.softmax(classifier(fake), dim=1).max(dim=1).values.mean().item()
        result.update(fid(fake))
        result["mean_classifier_confidence"] = conf
        result["class_histogram"] = torch.bincount(pred, minlength=10).tolist()
    else:
        for gs in sorted({1.0, 2.0, 3.0, float(default_guidance)}):
            fake = _generate(pipe, kind, n, steps, seed, device, guidance=gs)
            labels = torch.arange(n) % 10
            with torch.no_grad():
                pred = classifier.predict(fake).cpu()
            entry = {"accuracy": (pred == labels).float().mean().item(), **fid(fake)}
            result[f"guidance_{gs:g}"] = entry
            logger.info("guidance %.1f: %s", gs, entry)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts, for deterministic cuBLAS
    import torch

    import diffusers

    from . import WEIGHTS_DIR, load
    from . import architectures as arch

    name = arch.canonical_name(args.model)
    spec = arch.SPECS[name]
    device = _resolve_device(args.device)
    out_base = Path(args.out) if args.out is not None else WEIGHTS_DIR
    folder = out_base / name
    folder.mkdir(parents=True, exist_ok=True)
    args._folder = folder

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = not args.no_deterministic
        torch.use_deterministic_algorithms(not args.no_deterministic, warn_only=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    cli_args = argv if argv is not None else sys.argv[1:]
    command = "python -m dmq.models.train " + " ".join(shlex.quote(a) for a in cli_args)
    t0 = time.perf_counter()
    res = _train_loop(args, name, spec, device, gen)
    model = res["model"]
    saved = _save_weights(model, folder, name, args.save_dtype, spec.kind)
    info: dict[str, Any] = {
        "model": name,
        "command": command,
        "seed": args.seed,
        **res["hyper"],
        "steps_done": res["steps_done"],
        "final_loss": res["final_loss"],
        "train_wall_s": round(res["train_wall_s"], 2),
        "step_time_ms": None if res["step_time_ms"] is None else round(res["step_time_ms"], 3),
        "device": _device_name(device),
        "compile": bool(args.compile),
        "deterministic": device.type == "cpu" or not args.no_deterministic,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        **saved,
    }

    eval_n = args.eval_samples if args.eval_samples is not None else (1000 if device.type == "cuda" else 0)
    if spec.kind == "classifier":
        from .data import load_split

        held = load_split("heldout")
        with torch.no_grad():
            pred = model.predict((held.images.to(device) + 1.0) * 0.5).cpu()
        info["heldout_accuracy"] = (pred == held.labels).float().mean().item()
        logger.info("held-out accuracy %.4f", info["heldout_accuracy"])
        g = torch.Generator(device=device).manual_seed(args.seed)
        from .data import augment

        shown = res["images"][: args.num_samples]
        _save_grid((augment(shown, g, **spec.train.augment) + 1.0) * 0.5, folder / "samples.png", ncol=8)
    else:
        # sample through the public loader from the saved files, so that what is tested is what ships
        pipe = load(name, weights_dir=out_base, device=device)
        pipe.set_progress_bar_config(disable=True)
        steps = args.sample_steps or spec.num_inference_steps
        if spec.kind == "unet":
            imgs = _generate(pipe, "unet", args.num_samples, steps, args.seed, device)
            _save_grid(imgs, folder / "samples.png", ncol=8)
        else:
            # one row per digit; fewer than 10 samples: one row of digits 0, 1, ...
            per_class = math.ceil(args.num_samples / 10) if args.num_samples >= 10 else 0
            labels = [c for c in range(10) for _ in range(per_class)] or list(range(max(1, args.num_samples)))
            g = torch.Generator(device=device).manual_seed(args.seed)
            imgs = pipe(class_labels=labels, generator=g, num_inference_steps=steps, output_type="pt").images
            _save_grid(imgs, folder / "samples.png", ncol=per_class or len(labels))
        info["sample_steps"] = steps
        if spec.kind == "dit":
            info["sample_guidance_scale"] = spec.guidance_scale
        if eval_n > 0:
            clf = _find_classifier(out_base, device)
            if clf is None:
                logger.warning("no trained classifier in %s or the package: skipping the evaluation", out_base)
            else:
                t_eval = time.perf_counter()
                info["eval"] = _evaluate(
                    pipe, spec.kind, clf, eval_n, steps, args.seed + 1, device, spec.guidance_scale
                )
                info["eval"]["wall_s"] = round(time.perf_counter() - t_eval, 2)
                logger.info("evaluation: %s", info["eval"])
    info["total_wall_s"] = round(time.perf_counter() - t0, 2)
    _write_json(folder / "train_info.json", info)
    mb = saved["weights_bytes"] / 1e6
    logger.info("wrote %s (%s params, %s, %.1f MB)", folder, saved["params"], saved["weights_dtype"], mb)
    return info


if __name__ == "__main__":
    main()

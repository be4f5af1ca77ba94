"""The evaluation runner (``dmq eval``): 16-bit and quantized images on the same prompts / class labels and seeds,
fidelity and quality metrics, ``results.json`` and grid PNGs; resumable; sharded over processes with accelerate.

Layout of ``out``::

    run.json                     what the images were made with (a resumed run must match it)
    images/<variant>/00000.png   one PNG per item and variant (never regenerated when present)
    grid-<variant>.png           rows: 16-bit, variant, |difference| × 4 (first 8 items)
    results.json                 device, versions, command, rows (one per variant; see ``evaluate``)

Several processes (``accelerate launch --num_processes 2 -m dmq.cli eval ...``): each process generates its share of
the missing images; metrics run over a prepared DataLoader per process, and per-image values and *features* are
gathered with ``accelerator.gather_for_metrics`` before any FID is taken, so the FID is that of the whole set.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dmq.errors import ConfigError

__all__ = ["BUILTIN_PROMPTS", "Item", "pipeline_kind", "make_items", "read_prompt_file", "load_pipeline",
           "generate_images", "evaluate", "format_rows", "results_document"]

logger = logging.getLogger(__name__)

BUILTIN_PROMPTS = (
    "a photo of a red cat sitting on a wooden table",
    "a lighthouse on a rocky coast at sunset, oil painting",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a fox in a snowy forest",
    "a futuristic city skyline at night with neon signs",
    "a close-up portrait of an old man with a white beard",
    "a blue vintage car parked in front of a bakery",
)
"""The built-in prompt set for text-to-image pipelines (a user file replaces it)."""

_PSNR_CAP = 100.0  # dB: identical images have infinite PSNR; row means use per-image values capped here
_GRID_ITEMS = 8
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Item:
    """One image to generate: its index (file name), generator seed and condition (prompt, class label or none)."""

    index: int
    seed: int
    prompt: str | None = None
    class_label: int | None = None


def pipeline_kind(pipe: Any) -> str:
    """``"text"`` (takes ``prompt``), ``"class"`` (takes ``class_labels``) or ``"unconditional"``."""
    params = inspect.signature(type(pipe).__call__).parameters
    return "text" if "prompt" in params else "class" if "class_labels" in params else "unconditional"


def make_items(kind: str, num_images: int, seed: int, prompts: Sequence[str] | None = None,
               class_labels: Sequence[int] | None = None) -> list[Item]:
    """``num_images`` items cycling through ``prompts`` (text) or ``class_labels`` (class); item ``i`` has seed
    ``seed * 100003 + i``, so every variant sees the same noise for the same item."""
    if kind == "text" and not prompts:
        raise ConfigError("a text-to-image pipeline needs prompts")
    if kind == "class" and not class_labels:
        raise ConfigError("a class-conditional pipeline needs class labels")
    items = []
    for i in range(num_images):
        prompt = prompts[i % len(prompts)] if kind == "text" else None
        label = int(class_labels[i % len(class_labels)]) if kind == "class" else None
        items.append(Item(i, seed * 100003 + i, prompt, label))
    return items


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and lines starting with ``#`` skipped)."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"no prompts in {path}")
    return prompts


def load_pipeline(spec: str | Callable[[], Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A fresh pipeline: ``spec()`` for a callable, a shipped digits model by name, or a diffusers pipeline folder
    (loaded offline with ``local_files_only``); on ``device``, progress bar off."""
    if callable(spec):
        pipe = spec()
    else:
        import dmq.models

        if spec in dmq.models.available():
            pipe = dmq.models.load(spec, torch_dtype=dtype)
        elif Path(spec).is_dir():
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype, local_files_only=True)
        else:
            raise ConfigError(f"pipeline {spec!r} is neither a shipped model ({', '.join(dmq.models.available())}) "
                              "nor a diffusers pipeline folder")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _to_images(output: Any) -> torch.Tensor:
    """Pipeline images (``(N, H, W, C)`` array, ``(N, C, H, W)`` tensor, PIL list) → ``(N, C, H, W)`` float [0, 1]."""
    import numpy as np

    images = output.images if hasattr(output, "images") else output[0]
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images if images.ndim == 4 else images[..., None]))
        images = images.permute(0, 3, 1, 2)
    return images.float().clamp(0, 1).cpu()


def _save_png(image: torch.Tensor, path: Path) -> None:
    """``(C, H, W)`` in [0, 1] → 8-bit PNG, written atomically (a crash never leaves a truncated image behind)."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _load_png(path: Path) -> torch.Tensor:
    """8-bit PNG → ``(C, H, W)`` float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(path), dtype=np.float32) / 255
    return torch.from_numpy(array if array.ndim == 3 else array[..., None]).permute(2, 0, 1).contiguous()


def _image_path(folder: Path, item: Item) -> Path:
    return folder / f"{item.index:05d}.png"


@torch.no_grad()
def generate_images(pipe: Any, kind: str, items: Sequence[Item], folder: str | Path, *, batch_size: int = 4,
                    steps: int | None = None, guidance_scale: float | None = None,
                    pipeline_kwargs: dict[str, Any] | None = None, progress: bool = True, desc: str = "") -> int:
    """Write the PNGs of ``items`` that are not yet in ``folder``; returns how many were written.

    ``items`` run in fixed batches of ``batch_size`` (``items[0:b]``, ``items[b:2b]``, ...), one generator per image
    seeded by its item; a batch with any image missing is run whole, so an image comes out the same however a run
    was interrupted or sharded (CPU BLAS results can depend on the batch)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batches = [b for b in _batches(items, batch_size) if any(not _image_path(folder, it).is_file() for it in b)]
    written = 0
    for batch in tqdm(batches, desc=desc or str(folder.name), disable=not progress, leave=False):
        kwargs: dict[str, Any] = dict(pipeline_kwargs or {}, output_type="np",
                                      generator=[torch.Generator().manual_seed(it.seed) for it in batch])
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if guidance_scale is not None and kind != "unconditional":
            kwargs["guidance_scale"] = guidance_scale
        if kind == "text":
            kwargs["prompt"] = [it.prompt for it in batch]
        elif kind == "class":
            kwargs["class_labels"] = [it.class_label for it in batch]
        else:
            kwargs["batch_size"] = len(batch)
        images = _to_images(pipe(**kwargs))
        for it, image in zip(batch, images):
            if not _image_path(folder, it).is_file():
                _save_png(image, _image_path(folder, it))
                written += 1
    return written


def _batches(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    return [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


class _Files(Dataset):
    """Images from PNG files (or an in-memory tensor), optionally paired with a second file list, a prompt or a
    label per image; items are tuples."""

    def __init__(self, images: Sequence[Path] | torch.Tensor, other: Sequence[Path] | None = None,
                 prompts: Sequence[str] | None = None, labels: Sequence[int] | None = None) -> None:
        self.images, self.other, self.prompts, self.labels = images, other, prompts, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        image = self.images[i] if isinstance(self.images, torch.Tensor) else _load_png(self.images[i])
        out: tuple[Any, ...] = (image,)
        if self.other is not None:
            out += (_load_png(self.other[i]),)
        if self.prompts is not None:
            out += (self.prompts[i],)
        if self.labels is not None:
            out += (self.labels[i],)
        return out


def _sharded(accelerator: Any, dataset: Dataset, fn: Callable[..., torch.Tensor], batch_size: int) -> torch.Tensor:
    """``fn`` over ``dataset`` split across processes, per-batch results gathered (``gather_for_metrics`` drops the
    padding of the last batch): the concatenation ``(len(dataset), ...)`` in dataset order, on every process."""
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return torch.cat([accelerator.gather_for_metrics(fn(*batch)).cpu() for batch in loader])


def _fidelity_fn(lpips_metric: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from dmq.evaluation.fidelity import psnr, ssim

    def fn(ref: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        cols = [psnr(ref, img).clamp(max=_PSNR_CAP), ssim(ref, img)]
        if lpips_metric is not None:
            cols.append(lpips_metric(ref, img))
        return torch.stack([c.float().to(ref.device) for c in cols], dim=1)

    return fn


def _stats(name: str, values: torch.Tensor) -> dict[str, float]:
    from dmq.evaluation.fidelity import mean_std

    mean, std = mean_std([float(v) for v in values])
    return {name: mean, f"{name}_std": std}


def results_document(rows: list[dict[str, Any]], command: str, device: torch.device) -> dict[str, Any]:
    """A results file as DESIGN.md gives it (``benchmarks/results/*.json`` use it too): ``device`` (the GPU's
    name, or "cpu"), ``versions`` (torch, triton, diffusers, dmq), ``command`` and ``rows``."""
    import diffusers

    import dmq

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "versions": {"torch": torch.__version__, "triton": triton_version,
                                         "diffusers": diffusers.__version__, "dmq": dmq.__version__},
            "command": command, "rows": rows}


def evaluate(pipeline: str | Callable[[], Any], out: str | Path, *, variants: Sequence[str] = ("dmq:w8a8",),
             num_images: int = 16, seed: int = 0, prompts: Sequence[str] | None = None,
             prompt_file: str | Path | None = None, class_labels: Sequence[int] | None = None,
             steps: int | None = None, guidance_scale: float | None = None,
             pipeline_kwargs: dict[str, Any] | None = None, batch_size: int = 4,
             fid_features: str | torch.nn.Module | None = None, real_images: str | Path | None = None,
             clip: str | Any | None = None, lpips: str | None = None, calibration_samples: int = 8,
             dtype: torch.dtype | None = None, accelerator: Any = None, case: str | None = None,
             command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate the 16-bit reference and every variant on the same items, compute the metrics, write ``out``.

    ``pipeline``: a shipped digits model name, a diffusers pipeline folder, or a callable returning a fresh pipeline
    (called once per variant that has images to make; it must build the same weights every time). ``variants``: see
    :mod:`dmq.evaluation.backends` (``dmq:<preset>``, ``torchao:int8dq``, ``bnb:nf4``, ``quanto:int8``, ...).
    Conditions: ``prompts`` / ``prompt_file`` (default :data:`BUILTIN_PROMPTS`), ``class_labels`` (default 0..9),
    ``num_images`` for all kinds. ``dtype``: the reference's (default bf16 on CUDA, fp32 on the CPU).

    Metrics: PSNR (per image, capped at 100 dB), SSIM and ``lpips`` (a backbone name, when its weights are here)
    of each variant against the reference; ``fid_vs_ref`` (variant against reference set) and, where a real set is
    known (``real_images`` folder, or the held-out split for the digits models), ``fid`` against it, over
    ``fid_features`` (see :func:`dmq.evaluation.fid.load_feature_extractor`; default ``"digits"`` for the digits
    models, else ``"auto"``); the CLIP score with ``clip`` (a spec of :func:`dmq.evaluation.clip.load_clip_scorer` or
    a :class:`~dmq.evaluation.clip.ClipScorer`) for text pipelines; class accuracy for the digits DiT. Each row
    names its feature extractor and CLIP model. Returns the results document (on every process); the main process
    writes ``out/results.json`` and the grids.
    """
    from accelerate import Accelerator

    from dmq.evaluation.backends import apply_variant, check_variants, parse_variant
    from dmq.evaluation.fid import fid_from_features, load_feature_extractor
    from dmq.evaluation.grids import difference, save_grid

    parsed = [parse_variant(v) for v in variants]
    check_variants(parsed)
    acc = accelerator if accelerator is not None else Accelerator()
    device = acc.device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    is_digits = isinstance(pipeline, str) and pipeline.startswith("digits-")
    case = case or (pipeline if isinstance(pipeline, str) else getattr(pipeline, "__name__", "pipeline"))
    show = progress and acc.is_local_main_process
    out = Path(out)

    ref_pipe = load_pipeline(pipeline, device, dtype)
    kind = pipeline_kind(ref_pipe)
    if kind == "text":
        prompts = list(prompts or (read_prompt_file(prompt_file) if prompt_file else BUILTIN_PROMPTS))
    if kind == "class" and class_labels is None:
        den = ref_pipe.transformer
        class_labels = list(range(min(10, int(getattr(den.config, "num_embeds_ada_norm", 10) or 10))))
    items = make_items(kind, num_images, seed, prompts, class_labels)
    manifest = {"pipeline": case, "kind": kind, "dtype": _DTYPE_NAMES.get(dtype, str(dtype)), "steps": steps,
                "guidance_scale": guidance_scale, "pipeline_kwargs": pipeline_kwargs or {},
                "items": [asdict(it) for it in items]}
    manifest_path = out / "run.json"
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text())
        k = min(len(previous.get("items", [])), len(items))  # a run may grow or shrink: common items must agree
        same = all(previous.get(key) == value for key, value in manifest.items() if key != "items")
        if not same or previous["items"][:k] != manifest["items"][:k]:
            raise ConfigError(f"{out} holds images made with other settings ({manifest_path}); use another --out "
                              "or delete that folder")
    acc.wait_for_everyone()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=1))

    ref_name = _DTYPE_NAMES.get(dtype, str(dtype))
    names = [ref_name] + [v.name for v in parsed]
    folders = {name: out / "images" / re.sub(r"[^A-Za-z0-9_.-]+", "-", name) for name in names}
    calibration = None
    if any(v.backend == "dmq" for v in parsed):
        from dmq.calibration import CalibrationConfig

        calibration = CalibrationConfig(
            prompts=tuple(prompts) if kind == "text" else None,
            class_labels=tuple(class_labels) if kind == "class" else None,
            num_samples=calibration_samples, batch_size=min(calibration_samples, batch_size),
            num_inference_steps=steps or 25, guidance_scale=guidance_scale, seed=seed + 7919,
            pipeline_kwargs=pipeline_kwargs)
    timing: dict[str, tuple[int, float]] = {}
    for name, variant in zip(names, [None, *parsed]):
        # whole fixed batches are sharded, so every image is the same with any number of processes
        missing = [b for b in _batches(items, batch_size)
                   if any(not _image_path(folders[name], it).is_file() for it in b)]
        t0, count = time.perf_counter(), 0
        with acc.split_between_processes(missing) as mine:
            if mine:
                pipe = ref_pipe if variant is None else apply_variant(load_pipeline(pipeline, device, dtype),
                                                                      variant, calibration)
                count = generate_images(pipe, kind, [it for b in mine for it in b], folders[name],
                                        batch_size=batch_size, steps=steps,
                                        guidance_scale=guidance_scale, pipeline_kwargs=pipeline_kwargs,
                                        progress=show, desc=name)
                del pipe
        seconds = time.perf_counter() - t0
        acc.wait_for_everyone()
        stats = acc.gather(torch.tensor([[count, seconds]], dtype=torch.float64, device=device)).cpu()
        timing[name] = (int(stats[:, 0].sum()), float(stats[:, 1].max()))
        logger.info("%s: generated %d images in %.1f s", name, *timing[name])
    del ref_pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Metrics: per-image values and features are gathered over processes before anything is reduced.
    mb = max(batch_size, 16)
    extractor = load_feature_extractor(fid_features or ("digits" if is_digits else "auto"), device)
    paths = {name: [_image_path(folders[name], it) for it in items] for name in names}
    features = {name: _sharded(acc, _Files(paths[name]), extractor, mb) for name in names}
    real = None
    if real_images is not None:
        real_paths = sorted(p for p in Path(real_images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        real = _sharded(acc, _Files(real_paths), extractor, mb)
    elif is_digits:
        from dmq.models.data import load_split

        held = ((load_split("heldout").images + 1) / 2).clamp(0, 1)
        real = _sharded(acc, _Files(held), extractor, mb)
    lpips_metric = None
    if lpips is not None:
        from dmq.evaluation.fidelity import LPIPS

        lpips_metric = LPIPS(lpips, device)
    scorer = None
    if clip is not None and kind == "text":
        from dmq.evaluation.clip import load_clip_scorer

        scorer = load_clip_scorer(clip, device) if isinstance(clip, str) else clip
    classifier = None
    if is_digits and kind == "class":
        from dmq.models import load_classifier

        classifier = load_classifier(device=device)

    rows = []
    for name in names:
        generated, gen_s = timing[name]
        row: dict[str, Any] = {"case": case, "variant": name, "N": num_images, "steps": steps,
                               "num_processes": acc.num_processes, "fid_features": extractor.name,
                               "generated": generated, "gen_s": round(gen_s, 3)}
        if name != ref_name:
            values = _sharded(acc, _Files(paths[ref_name], other=paths[name]), _fidelity_fn(lpips_metric), mb)
            row.update(_stats("psnr", values[:, 0]))
            row.update(_stats("ssim", values[:, 1]))
            if lpips_metric is not None:
                row.update(_stats("lpips", values[:, 2]), lpips_net=lpips_metric.name)
            row["fid_vs_ref"] = fid_from_features(features[ref_name], features[name])
        if real is not None:
            row["fid"] = fid_from_features(real, features[name])
        if scorer is not None:
            scores = _sharded(acc, _Files(paths[name], prompts=[it.prompt for it in items]),
                              lambda img, txt: scorer(img, list(txt)).to(device), mb)
            row.update(_stats("clip_score", scores), clip_model=scorer.name)
        if classifier is not None:
            hits = _sharded(acc, _Files(paths[name], labels=[it.class_label for it in items]),
                            lambda img, lab: (classifier.predict(img) == lab).float(), mb)
            row["accuracy"] = float(hits.mean())
        rows.append(row)

    doc = results_document(rows, command or shlex.join(sys.argv), device)
    if acc.is_main_process:
        ref = torch.stack([_load_png(p) for p in paths[ref_name][:_GRID_ITEMS]])
        for name in names[1:]:
            img = torch.stack([_load_png(p) for p in paths[name][:_GRID_ITEMS]])
            save_grid([ref, img, difference(ref, img)], out / f"grid-{folders[name].name}.png", columns=len(ref))
        (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        logger.info("dmq eval: wrote %s", out / "results.json")
    acc.wait_for_everyone()
    return doc


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The results rows as a short table (variant, PSNR, SSIM, LPIPS, FID vs reference, FID, CLIP, accuracy)."""
    cols = [("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"), ("lpips", "LPIPS", ".4f"),
            ("fid_vs_ref", "FID vs ref", ".3f"), ("fid", "FID", ".3f"), ("clip_score", "CLIP", ".2f"),
            ("accuracy", "accuracy", ".3f"), ("gen_s", "gen s", ".1f")]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    width = max(len(r["variant"]) for r in rows)
    lines = [f"{'variant':<{width}}" + "".join(f"  {title:>10}" for _, title, _ in cols)]
    for r in rows:
        lines.append(f"{r['variant']:<{width}}" + "".join(
            f"  {format(r[key], fmt) if key in r else '—':>10}" for key, _, fmt in cols))
    lines.append(f"FID features: {rows[0]['fid_features']}" + (f"; CLIP: {rows[0]['clip_model']}"
                                                               if "clip_model" in rows[0] else ""))
    return "\n".join(lines)

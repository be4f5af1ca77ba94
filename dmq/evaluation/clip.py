"""CLIP score: ``100 · max(cos(image embedding, text embedding), 0)`` per image, as torchmetrics' ``CLIPScore``.

Two backends, both offline once the weights are on the machine:

- ``clip-anytorch`` (OpenAI's CLIP; the optional extra ``pip install 'dmq-diffusers[clip]'``): spec
  ``"openai:ViT-B/32"`` (weights in ``~/.cache/clip``) or ``"openai:/path/to/ViT-B-32.pt"``;
- transformers' ``CLIPModel``: spec ``"hf:/path/to/folder"`` (a saved ``CLIPModel`` + tokenizer, e.g. from
  ``huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR``), or a model object via
  :meth:`ClipScorer.from_transformers`.

Missing weights raise :class:`~dmq.evaluation.errors.MissingWeightsError` naming how to provide them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dmq.evaluation.errors import MissingPackageError, MissingWeightsError

__all__ = ["ClipScorer", "clip_score_from_embeddings", "load_clip_scorer", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score ``(N,)`` float32 of embeddings ``(N, D)``: ``100 · max(cosine, 0)``."""
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return (100 * cos.clamp(min=0)).float()


def _preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's preprocessing in torch: bicubic resize of the short side to ``size``, centre crop, normalize."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipScorer:
    """Scores images ``(N, C, H, W)`` in [0, 1] against one prompt each. ``name`` is stated in every result."""

    def __init__(self, name: str, encode_images: Callable[[torch.Tensor], torch.Tensor],
                 encode_texts: Callable[[list[str]], torch.Tensor], image_size: int,
                 device: torch.device) -> None:
        self.name, self.image_size, self.device = name, image_size, device
        self._encode_images, self._encode_texts = encode_images, encode_texts

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image scores ``(N,)`` float32."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        img = self._encode_images(_preprocess(images.to(self.device), self.image_size))
        txt = self._encode_texts(list(prompts))
        return clip_score_from_embeddings(img, txt).cpu()

    @classmethod
    def from_transformers(cls, model: Any, tokenizer: Any, name: str | None = None,
                          device: str | torch.device = "cpu") -> ClipScorer:
        """A scorer over a transformers ``CLIPModel`` and its tokenizer (objects, e.g. built in code)."""
        device = torch.device(device)
        model = model.to(device).eval()

        def pooled(out: Any) -> torch.Tensor:  # transformers 5 returns an output object, 4.x a tensor
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def texts(prompts: list[str]) -> torch.Tensor:
            tok = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
            return pooled(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))

        return cls(name or f"transformers CLIPModel ({model.config.name_or_path or 'in memory'})",
                   lambda x: pooled(model.get_image_features(pixel_values=x)), texts,
                   model.config.vision_config.image_size, device)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
        """A scorer over a ``CLIPModel`` + tokenizer saved in the folder ``path`` (never downloads)."""
        if not (Path(path) / "config.json").is_file():
            raise MissingWeightsError(
                f"no CLIP checkpoint in {path}: on a machine with network, save one there with "
                f"`huggingface-cli download openai/clip-vit-base-patch32 --local-dir {path}` and copy it over")
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls.from_transformers(model, tokenizer, name=f"transformers CLIPModel ({path})", device=device)

    @classmethod
    def from_clip_anytorch(cls, name: str = "ViT-B/32", download_root: str | None = None,
                           device: str | torch.device = "cpu") -> ClipScorer:
        """A scorer over clip-anytorch's ``clip.load(name)``; ``name`` is a model name whose weights are already in
        ``download_root`` (default ``~/.cache/clip``) or a path to a ``.pt`` file."""
        if importlib.util.find_spec("clip") is None:
            raise MissingPackageError("the CLIP score with OpenAI's CLIP needs clip-anytorch: "
                                      "`pip install 'dmq-diffusers[clip]'` (or use a transformers CLIPModel: hf:<dir>)")
        try:
            import clip
        except Exception as exc:  # its torchvision / pkg_resources imports fail on some installs
            raise MissingPackageError(f"clip-anytorch is installed but does not import ({exc}); see the README's "
                                      "Evaluation section, or use a transformers CLIPModel (hf:<dir>)") from exc
        device = torch.device(device)
        if not os.path.isfile(name):
            root = Path(download_root or Path.home() / ".cache" / "clip")
            if name not in clip.available_models():
                raise ValueError(f"unknown CLIP model {name!r}; choose from {clip.available_models()} or a .pt path")
            url = clip.clip._MODELS[name]
            if not (root / os.path.basename(url)).is_file():
                raise MissingWeightsError(f"CLIP {name} weights are not in {root}: copy {url} there (or pass "
                                          "openai:/path/to/file.pt); dmq does not download during evaluation")
            name = str(root / os.path.basename(url))
        model, _ = clip.load(name, device=device, jit=False)
        model = model.eval().float()
        return cls(f"clip-anytorch {Path(name).name}", model.encode_image,
                   lambda prompts: model.encode_text(clip.tokenize(prompts, truncate=True).to(device)),
                   model.visual.input_resolution, device)


def load_clip_scorer(spec: str, device: str | torch.device = "cpu") -> ClipScorer:
    """``"openai:<name or .pt path>"`` (clip-anytorch) or ``"hf:<folder>"`` (transformers ``CLIPModel``)."""
    backend, _, target = spec.partition(":")
    if backend == "openai" and target:
        return ClipScorer.from_clip_anytorch(target, device=device)
    if backend == "hf" and target:
        return ClipScorer.from_pretrained(target, device=device)
    raise ValueError(f"CLIP spec {spec!r}: use 'openai:ViT-B/32' (clip-anytorch) or 'hf:/path/to/clip' (transformers)")

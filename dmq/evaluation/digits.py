"""Domain metrics on the shipped digits models: FID over the shipped classifier's penultimate features against the
held-out split, the real-vs-real baseline at the same N, and class accuracy of class-conditional samples."""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["DigitsMetrics", "generate"]

logger = logging.getLogger(__name__)


class DigitsMetrics:
    """Domain-FID and accuracy with the shipped digit classifier (features: ``feature_extractor()``, 128-d).

    Real statistics come from the held-out split (images the models never saw). ``real_baseline(n)`` is the FID of
    two disjoint random halves of ``n`` held-out images each: the floor a perfect model reaches at that N.
    """

    feature_name = "digits-classifier penultimate features (128-d)"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from dmq.models import load_classifier
        from dmq.models.data import load_split

        self.device = torch.device(device)
        self.classifier = load_classifier(device=self.device)
        held = load_split("heldout")
        self.real = ((held.images + 1) / 2).clamp(0, 1).to(self.device)
        self.real_labels = held.labels.to(self.device)

    def _fid(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        from dmq.evaluation.fid import extract_features, fid_from_features

        features = self.classifier.feature_extractor()
        return fid_from_features(extract_features(features, real.to(self.device)),
                                 extract_features(features, fake.to(self.device)))

    def fid(self, fake: torch.Tensor, n_real: int | None = None, seed: int = 0) -> float:
        """FID of ``fake`` ``(N, 1, H, W)`` in [0, 1] against ``n_real`` held-out images (default: N, at most all)."""
        n = min(n_real or len(fake), len(self.real))
        idx = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(seed))[:n]
        return self._fid(self.real[idx.to(self.device)], fake)

    def real_baseline(self, n: int, seed: int = 0) -> float:
        """FID between two disjoint random sets of ``n`` held-out images (``2n`` ≤ the held-out size)."""
        if 2 * n > len(self.real):
            raise ValueError(f"the held-out split has {len(self.real)} images: no two disjoint sets of {n}")
        idx = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(seed)).to(self.device)
        return self._fid(self.real[idx[:n]], self.real[idx[n:2 * n]])

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``images`` the classifier reads as ``labels``."""
        pred = self.classifier.predict(images.to(self.device))
        return float((pred == labels.to(self.device)).float().mean())


@torch.no_grad()
def generate(pipe: Any, n: int, seed: int, *, batch_size: int = 50, num_inference_steps: int | None = None,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` images ``(n, 1, H, W)`` in [0, 1] from a shipped digits pipeline, deterministic in ``seed``; for the
    DiT the labels cycle 0..9 and are returned, for the unconditional U-Net labels are ``None``.
    Batch ``b`` uses generator seed ``seed * 100003 + b``, so a quantized and a float pipeline see the same noise."""
    from dmq.models.data import to_unit_images

    conditional = hasattr(pipe, "transformer")
    images, labels = [], []
    kwargs = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
    batches = range(0, n, batch_size)
    for b, start in enumerate(tqdm(batches, desc="generating", disable=not progress, leave=False)):
        m = min(batch_size, n - start)
        g = torch.Generator().manual_seed(seed * 100003 + b)
        if conditional:
            lab = [(start + i) % 10 for i in range(m)]
            out = pipe(class_labels=lab, generator=g, output_type="np", **kwargs)
            labels.extend(lab)
        else:
            out = pipe(batch_size=m, generator=g, output_type="np", **kwargs)
        images.append(to_unit_images(out.images))
    return torch.cat(images), (torch.tensor(labels) if conditional else None)

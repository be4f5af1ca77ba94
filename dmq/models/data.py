"""The digits data set that dmq's bundled models are trained and evaluated on.

scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, shipped with scikit-learn, so no download)
is upsampled bilinearly to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` and scaled to [-1, 1] (background -1, ink +1), the
range the diffusion models work in. The train / held-out split is fixed (stratified, ``SPLIT_SEED``) and does not
depend on any training seed, so every model and every evaluation sees the same held-out digits.

Everything here returns torch tensors; augmentation runs batched on whatever device the images are on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
"""Side of the images the bundled models work on (the 8x8 digits are upsampled to this)."""
NUM_CLASSES = 10
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
"""Seed of the train / held-out split. Fixed on purpose: it is *not* the training ``--seed``."""

_SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class DigitsSplit:
    """Images ``(N, 1, S, S)`` float32 in [-1, 1] and labels ``(N,)`` int64 of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray
    """Row indices into ``sklearn.datasets.load_digits()`` of these images."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> DigitsSplit:
        return DigitsSplit(self.images.to(device), self.labels.to(device), self.indices)


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "dmq.models needs scikit-learn for its digits data set: pip install 'dmq-diffusers[models]'"
        ) from exc
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return images, digits.target.astype(np.int64)


def split_indices(heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices ``(train, heldout)`` of a stratified split of ``load_digits``; disjoint, covering all."""
    from sklearn.model_selection import train_test_split

    _, labels = _load_raw()
    all_idx = np.arange(len(labels))
    train_idx, heldout_idx = train_test_split(
        all_idx, test_size=heldout_fraction, stratify=labels, random_state=seed, shuffle=True
    )
    return np.sort(train_idx), np.sort(heldout_idx)


def upsample(images01: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Bilinear upsampling of ``(N, 8, 8)`` or ``(N, 1, 8, 8)`` images (any range) to ``(N, 1, size, size)``."""
    if images01.dim() == 3:
        images01 = images01[:, None]
    if images01.shape[-1] == size and images01.shape[-2] == size:
        return images01
    return F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=False)


def load_split(split: str = "train", image_size: int = IMAGE_SIZE) -> DigitsSplit:
    """One split (``"train"``, ``"heldout"`` or ``"all"``) as float32 images in [-1, 1] on the CPU."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {_SPLITS}")
    raw, labels = _load_raw()
    if split == "all":
        idx = np.arange(len(labels))
    else:
        train_idx, heldout_idx = split_indices()
        idx = train_idx if split == "train" else heldout_idx
    x = upsample(torch.from_numpy(raw[idx]), image_size).clamp_(0.0, 1.0)
    x = x * 2.0 - 1.0
    y = torch.from_numpy(labels[idx])
    logger.debug("digits split %s: %d images of %dx%d", split, len(idx), image_size, image_size)
    return DigitsSplit(images=x.contiguous(), labels=y, indices=idx)


def augment(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    p: float = 0.5,
    max_shift: float = 1.5 / 32,
    max_rotation_deg: float = 8.0,
    scale_range: tuple[float, float] = (0.92, 1.08),
    max_shear: float = 0.08,
) -> torch.Tensor:
    """Small random affine jitter of a batch ``(N, C, H, W)`` in [-1, 1], background stays -1.

    Each image is transformed with probability ``p`` (the others pass unchanged): a shift of up to ``max_shift``
    of the image side (1.5 px at 32x32), a rotation of up to ``max_rotation_deg``, an isotropic scale in
    ``scale_range`` and a shear of up to ``max_shear``. Draws its randomness from ``generator`` (which must live on
    the images' device), so it is reproducible.
    """
    n = images.shape[0]
    if n == 0 or p <= 0:
        return images
    dev = images.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator) * (hi - lo) + lo

    apply = torch.rand(n, device=dev, generator=generator) < p
    angle = uniform(-max_rotation_deg, max_rotation_deg) * (math.pi / 180.0)
    scale = uniform(*scale_range)
    shear = uniform(-max_shear, max_shear)
    # affine_grid works in [-1, 1] coordinates: a shift of s image sides is 2 s there.
    tx = uniform(-max_shift, max_shift) * 2.0
    ty = uniform(-max_shift, max_shift) * 2.0
    cos, sin = torch.cos(angle), torch.sin(angle)
    # the grid maps output coordinates to input coordinates, hence the inverse scale
    inv = 1.0 / scale
    theta = torch.zeros(n, 2, 3, device=dev, dtype=images.dtype)
    theta[:, 0, 0] = cos * inv
    theta[:, 0, 1] = (-sin + shear) * inv
    theta[:, 1, 0] = sin * inv
    theta[:, 1, 1] = cos * inv
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    identity = torch.zeros_like(theta)  # built on the device: no host-to-device copy (and no sync) per batch
    identity[:, 0, 0] = 1.0
    identity[:, 1, 1] = 1.0
    theta = torch.where(apply[:, None, None], theta, identity)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # sample (x + 1) with zero padding so that pixels coming from outside are background (-1)
    out = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return out.clamp_(-1.0, 1.0)


def to_unit_images(images: Any) -> torch.Tensor:
    """Pipeline outputs (a list of PIL images, an ``(N, H, W, C)`` array, an ``(N, C, H, W)`` tensor) to float
    ``(N, 1, H, W)`` in [0, 1] (colour is averaged to grey; uint8 is divided by 255)."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(im) for im in images]
        arr = np.stack([a if a.ndim == 3 else a[..., None] for a in arrays])
        images = torch.from_numpy(arr).permute(0, 3, 1, 2)
    elif isinstance(images, np.ndarray):
        arr = images if images.ndim == 4 else images[..., None]
        images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"cannot convert {type(images).__name__} to images")
    if images.dim() == 3:
        images = images[:, None]
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    else:
        images = images.float()
    if images.shape[1] != 1:
        images = images.mean(dim=1, keepdim=True)
    return images

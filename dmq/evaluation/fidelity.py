"""Fidelity of quantized images to the floating-point pipeline's images on the same seeds."""

from __future__ import annotations

import math

import torch

__all__ = ["psnr", "ssim", "mean_std"]


def psnr(ref: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of ``img`` against ``ref``, both ``(N, C, H, W)`` in [0, 1]; ``inf`` where identical."""
    mse = (ref.double() - img.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse)).float()


def ssim(ref: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics, gaussian 11×11 window; 7×7 below 11 pixels), images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = 11 if min(ref.shape[-2:]) >= 11 else 7
    return structural_similarity_index_measure(img.float(), ref.float(), data_range=1.0, reduction="none",
                                               kernel_size=k)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); infinities are kept out of neither."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var) if math.isfinite(var) else var

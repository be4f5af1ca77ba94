"""Variants the runner compares with the 16-bit pipeline: dmq presets, and for comparison the quantization backends
a diffusers user would pick instead (each applied to the denoiser through diffusers' own quantization configs).

Variant strings:

- ``dmq:<preset>`` — :func:`dmq.quantize_pipeline` with that preset (calibrated on the run's prompts / class labels
  when the preset takes calibration);
- ``torchao:int8dq`` / ``torchao:fp8dq`` — diffusers ``TorchAoConfig`` with torchao's int8 (float8) dynamic
  activation + int8 (float8) weight config;
- ``bnb:nf4`` (and ``bnb:int8``) — diffusers ``BitsAndBytesConfig`` (CUDA only);
- ``quanto:int8`` / ``quanto:int4`` / ``quanto:fp8`` — diffusers ``QuantoConfig`` (weights).

The comparison backends reload the denoiser with ``from_pretrained(..., quantization_config=...)`` from a saved copy,
exactly as a user loads a quantized checkpoint. :func:`check_variants` lists every missing package at once.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from dmq.errors import ConfigError
from dmq.evaluation.errors import MissingPackageError

__all__ = ["Variant", "parse_variant", "check_variants", "apply_variant", "denoiser_name"]

logger = logging.getLogger(__name__)

# backend -> (import name, pip requirement, options)
_BACKENDS: dict[str, tuple[str | None, str | None, tuple[str, ...]]] = {
    "dmq": (None, None, ()),
    "torchao": ("torchao", "torchao>=0.15", ("int8dq", "fp8dq")),
    "bnb": ("bitsandbytes", "bitsandbytes", ("nf4", "int8")),
    "quanto": ("optimum.quanto", "optimum-quanto", ("int8", "int4", "fp8")),
}


@dataclass(frozen=True)
class Variant:
    """One quantized variant: ``backend`` (dmq, torchao, bnb, quanto) and its ``option`` (preset or type)."""

    backend: str
    option: str

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.option}"


def parse_variant(spec: str) -> Variant:
    """``"<backend>:<option>"`` → :class:`Variant`; a bare preset name means ``dmq:<preset>``."""
    backend, sep, option = spec.partition(":")
    if not sep:
        backend, option = "dmq", spec
    if backend not in _BACKENDS:
        raise ConfigError(f"unknown backend {backend!r} in {spec!r}; choose from {sorted(_BACKENDS)}")
    if backend == "dmq":
        from dmq.config import get_preset

        get_preset(option)  # raises ConfigError listing the presets
    elif option not in _BACKENDS[backend][2]:
        raise ConfigError(f"{backend} option {option!r} in {spec!r}; choose from {_BACKENDS[backend][2]}")
    return Variant(backend, option)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing
        return False


def check_variants(variants: list[Variant]) -> None:
    """Raise :class:`MissingPackageError` naming every package the variants need and this machine lacks."""
    missing = sorted({(b, _BACKENDS[b][0], _BACKENDS[b][1]) for b in (v.backend for v in variants)
                      if _BACKENDS[b][0] is not None and not _installed(_BACKENDS[b][0])})
    if missing:
        names = ", ".join(f"{b} (module {m})" for b, m, _ in missing)
        pips = " ".join(f"'{r}'" for _, _, r in missing)
        raise MissingPackageError(f"not installed: {names}. Install with `pip install {pips}`, or leave those "
                                  "variants out")


def denoiser_name(pipe: Any) -> str:
    """``"transformer"`` or ``"unet"``: the pipeline's denoiser component."""
    for name in ("transformer", "unet"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ConfigError(f"{type(pipe).__name__} has neither a transformer nor a unet")


def _diffusers_config(variant: Variant, dtype: torch.dtype) -> Any:
    import diffusers

    if variant.backend == "torchao":
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig)

        ao = {"int8dq": Int8DynamicActivationInt8WeightConfig, "fp8dq": Float8DynamicActivationFloat8WeightConfig}
        return diffusers.TorchAoConfig(ao[variant.option]())
    if variant.backend == "bnb":
        if variant.option == "nf4":
            return diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype=dtype)
        return diffusers.BitsAndBytesConfig(load_in_8bit=True)
    return diffusers.QuantoConfig(weights_dtype={"int8": "int8", "int4": "int4", "fp8": "float8"}[variant.option])


def apply_variant(pipe: Any, variant: Variant, calibration: Any = None, progress: bool = False) -> Any:
    """Quantize ``pipe``'s denoiser as ``variant`` says (in place where the backend allows; returns the pipeline).
    ``calibration`` (a :class:`dmq.CalibrationConfig`) is used by dmq presets that accept it."""
    check_variants([variant])
    if variant.backend == "dmq":
        import dmq
        from dmq.config import get_preset

        cfg = get_preset(variant.option)
        return dmq.quantize_pipeline(pipe, cfg, calibration=calibration if cfg.accepts_calibration else None,
                                     progress=progress)
    name = denoiser_name(pipe)
    den = getattr(pipe, name)
    dtype, device = den.dtype, den.device
    with tempfile.TemporaryDirectory(prefix="dmq-eval-") as tmp:
        den.save_pretrained(tmp)
        quantized = type(den).from_pretrained(tmp, quantization_config=_diffusers_config(variant, dtype),
                                              torch_dtype=dtype)
    if variant.backend != "bnb":  # bitsandbytes places its weights on the GPU while loading
        quantized = quantized.to(device)
    setattr(pipe, name, quantized.eval())
    logger.info("%s: %s reloaded with %s", variant.name, name, type(quantized).__name__)
    return pipe

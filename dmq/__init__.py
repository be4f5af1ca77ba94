"""dmq — diffusion-model quantization for Hugging Face Diffusers.

Public API (imported lazily, so ``import dmq`` stays light)::

    pipe = dmq.quantize_pipeline(pipe, "w4a8")
    dmq.save_quantized(pipe, "out/")
    pipe = dmq.load_quantized("out/", fresh_fp_pipe)
    dmq.list_presets()
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "quantize_pipeline": "dmq.pipelines.quantize",
    "compile_blocks": "dmq.pipelines.compile",
    "save_quantized": "dmq.serialization",
    "load_quantized": "dmq.serialization",
    "QuantConfig": "dmq.config",
    "CalibrationConfig": "dmq.calibration.config",
    "list_presets": "dmq.config",
    "get_preset": "dmq.config",
    "QuantSpec": "dmq.formats",
    "add_lora": "dmq.methods.lora",
    "remove_lora": "dmq.methods.lora",
    "enable_temporal_cache": "dmq.methods.temporal_cache",
    "disable_temporal_cache": "dmq.methods.temporal_cache",
    "QuantReport": "dmq.report",
    "DmqError": "dmq.errors",
    "ConfigError": "dmq.errors",
    "UnsupportedModuleError": "dmq.errors",
    "UnsupportedPipelineError": "dmq.errors",
    "NonFiniteError": "dmq.errors",
    "CheckpointMismatchError": "dmq.errors",
    "CalibrationRequiredError": "dmq.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dmq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""Calibration: timestep-aware samplers, activation collection on the real pipeline, range estimators and block
reconstruction. Submodules are imported lazily (``import dmq.calibration`` stays light)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CalibrationConfig": "dmq.calibration.config",
    "StatsConfig": "dmq.calibration.stats",
    "LayerStats": "dmq.calibration.stats",
    "SAMPLERS": "dmq.calibration.samplers",
    "get_sampler": "dmq.calibration.samplers",
    "collect": "dmq.calibration.collect",
    "collect_block_inputs": "dmq.calibration.collect",
    "CalibrationResult": "dmq.calibration.collect",
    "BlockRecord": "dmq.calibration.collect",
    "estimate_scale": "dmq.calibration.estimators",
    "estimate_bucket_scales": "dmq.calibration.estimators",
    "activation_scales": "dmq.calibration.estimators",
    "apply_input_scales": "dmq.calibration.estimators",
    "channel_absmax": "dmq.calibration.estimators",
    "static_activation_targets": "dmq.calibration.estimators",
    "calibrate_activation_scales": "dmq.calibration.estimators",
    "ReconstructionConfig": "dmq.calibration.reconstruction",
    "reconstruct_block": "dmq.calibration.reconstruction",
    "reconstruct_blocks": "dmq.calibration.reconstruction",
    "find_blocks": "dmq.calibration.reconstruction",
    "split_records": "dmq.calibration.reconstruction",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dmq.calibration' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

"""Calibration: timestep-aware samplers, activation collection on the real pipeline, range estimators and block
reconstruction.

The names are imported eagerly: ``collect`` is both a submodule and a function, and a lazy export would be shadowed
by the submodule as soon as anything imports ``dmq.calibration.collect``."""

from __future__ import annotations

from dmq.calibration.collect import BlockRecord, CalibrationResult, collect, collect_block_inputs
from dmq.calibration.config import CalibrationConfig
from dmq.calibration.estimators import (activation_scales, apply_input_scales, calibrate_activation_scales,
                                        channel_absmax, estimate_bucket_scales, estimate_scale,
                                        static_activation_targets)
from dmq.calibration.reconstruction import ReconstructionConfig, find_blocks, reconstruct_block, reconstruct_blocks, \
    split_records
from dmq.calibration.samplers import SAMPLERS, get_sampler
from dmq.calibration.stats import LayerStats, StatsConfig

__all__ = [
    "CalibrationConfig",
    "StatsConfig",
    "LayerStats",
    "SAMPLERS",
    "get_sampler",
    "collect",
    "collect_block_inputs",
    "CalibrationResult",
    "BlockRecord",
    "estimate_scale",
    "estimate_bucket_scales",
    "activation_scales",
    "apply_input_scales",
    "channel_absmax",
    "static_activation_targets",
    "calibrate_activation_scales",
    "ReconstructionConfig",
    "reconstruct_block",
    "reconstruct_blocks",
    "find_blocks",
    "split_records",
]

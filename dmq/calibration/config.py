"""``CalibrationConfig``: what data calibration runs the pipeline on, and which denoising steps it records.

Frozen plain data, validated on construction (every mistake is a :class:`dmq.errors.ConfigError` that says what to
do), with a versioned ``to_dict`` / ``from_dict`` form.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from dmq.errors import ConfigError

__all__ = ["CalibrationConfig", "CALIBRATION_CONFIG_VERSION", "RESERVED_PIPELINE_KWARGS"]

CALIBRATION_CONFIG_VERSION = 1

#: pipeline call arguments that calibration sets itself (``pipeline_kwargs`` may not override them)
RESERVED_PIPELINE_KWARGS = frozenset({
    "prompt", "class_labels", "batch_size", "num_inference_steps", "guidance_scale", "generator",
    "callback_on_step_end", "callback", "return_dict", "num_images_per_prompt",
})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data and schedule.

    Inputs (exactly one kind, matching the pipeline): ``prompts`` for text-to-image pipelines (SD, SDXL, PixArt,
    SD3, FLUX), ``class_labels`` for class-conditional ones (DiT), neither for unconditional ones (DDPM), where
    ``num_samples`` alone says how many images are generated. Prompts / labels are cycled: sample ``i`` uses
    ``prompts[i % len(prompts)]``.

    - ``num_samples``: images generated (trajectories), run ``batch_size`` per pipeline call.
    - ``num_inference_steps``: steps of each trajectory; ``guidance_scale``: passed to the pipeline (``None`` keeps
      the pipeline's default; classifier-free guidance doubles the batch the denoiser sees, FLUX-dev's value is its
      distilled guidance input).
    - ``seed``: trajectories and every random choice of calibration derive from it (same seed, same ranges).
    - ``sampler``: which (sample, timestep) pairs are recorded: ``"uniform"``, ``"normal"`` or ``"eda"`` (see
      :mod:`dmq.calibration.samplers`), with ``sampler_options`` passed to it as keywords; ``num_timesteps``: how
      many distinct timesteps of each trajectory are recorded (``None``: all of them).
    - ``timesteps``: record exactly at these scheduler timesteps (raw values as in ``pipe.scheduler.timesteps``);
      overrides the sampler; a value that is not in the schedule is an error when the pipeline runs.
    - ``per_timestep_buckets``: when > 0, statistics are also kept per bucket of normalized timestep
      (``t`` in [0, 1], 1 = pure noise; bucket ``min(int(t * n), n - 1)``), as TFMQ-DM's finite-set calibration.
    - ``cache_dir``: recorded block inputs (for reconstruction) are written there as safetensors instead of kept in
      memory.
    - ``pipeline_kwargs``: further keyword arguments of every pipeline call (``height``, ``width``,
      ``max_sequence_length``, ``negative_prompt``, ...); JSON-able values only.
    """

    prompts: tuple[str, ...] | None = None
    class_labels: tuple[int, ...] | None = None
    num_samples: int = 64
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    seed: int = 0
    sampler: str = "uniform"
    num_timesteps: int | None = None
    batch_size: int = 1
    cache_dir: str | None = None
    per_timestep_buckets: int = 0
    timesteps: tuple[float, ...] | None = None
    sampler_options: Mapping[str, Any] | None = field(default=None, hash=False)
    pipeline_kwargs: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        # inputs
        if self.prompts is not None:
            if isinstance(self.prompts, str):
                raise ConfigError("prompts must be a list of strings, not one string: use prompts=[...]")
            prompts = tuple(self.prompts)
            if not prompts:
                raise ConfigError("prompts is empty: give at least one prompt (or omit prompts for an "
                                  "unconditional pipeline)")
            bad = [p for p in prompts if not isinstance(p, str)]
            if bad:
                raise ConfigError(f"prompts must be strings, got {bad[0]!r}")
            set_("prompts", prompts)
        if self.class_labels is not None:
            if _is_int(self.class_labels):
                raise ConfigError("class_labels must be a list of ints: use class_labels=[...]")
            labels = tuple(self.class_labels)
            if not labels:
                raise ConfigError("class_labels is empty: give at least one class label")
            bad = [c for c in labels if not _is_int(c) or c < 0]
            if bad:
                raise ConfigError(f"class labels must be non-negative ints, got {bad[0]!r}")
            set_("class_labels", labels)
        if self.prompts is not None and self.class_labels is not None:
            raise ConfigError("give prompts (text-to-image) or class_labels (class-conditional), not both")
        # counts
        for name in ("num_samples", "num_inference_steps", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.guidance_scale is not None:
            if not _is_number(self.guidance_scale) or not math.isfinite(self.guidance_scale) \
                    or self.guidance_scale < 0:
                raise ConfigError(f"guidance_scale must be a finite number >= 0 or None, got {self.guidance_scale!r}")
            set_("guidance_scale", float(self.guidance_scale))
        if not _is_int(self.per_timestep_buckets) or self.per_timestep_buckets < 0:
            raise ConfigError(f"per_timestep_buckets must be an int >= 0, got {self.per_timestep_buckets!r}")
        # which steps
        from dmq.calibration.samplers import SAMPLERS, check_sampler_options

        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; valid: {', '.join(sorted(SAMPLERS))}")
        if self.num_timesteps is not None:
            if not _is_int(self.num_timesteps) or self.num_timesteps <= 0:
                raise ConfigError(f"num_timesteps must be a positive int or None, got {self.num_timesteps!r}")
            if self.num_timesteps > self.num_inference_steps:
                raise ConfigError(f"num_timesteps ({self.num_timesteps}) cannot exceed num_inference_steps "
                                  f"({self.num_inference_steps}): a trajectory has only that many timesteps")
        if self.timesteps is not None:
            if _is_number(self.timesteps):
                raise ConfigError("timesteps must be a list of numbers: use timesteps=[...]")
            ts = tuple(self.timesteps)
            if not ts:
                raise ConfigError("timesteps is empty: give at least one timestep or use None (sampler)")
            bad = [t for t in ts if not _is_number(t) or not math.isfinite(t) or t < 0]
            if bad:
                raise ConfigError(f"timesteps must be finite numbers >= 0 (scheduler timesteps), got {bad[0]!r}")
            set_("timesteps", tuple(float(t) for t in ts))
        if self.sampler_options is not None:
            opts = dict(self.sampler_options)
            check_sampler_options(self.sampler, opts)
            set_("sampler_options", opts)
        # io
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, Path)) or not str(self.cache_dir):
                raise ConfigError(f"cache_dir must be a path or None, got {self.cache_dir!r}")
            set_("cache_dir", str(self.cache_dir))
        if self.pipeline_kwargs is not None:
            kw = dict(self.pipeline_kwargs)
            clash = sorted(set(kw) & RESERVED_PIPELINE_KWARGS)
            if clash:
                raise ConfigError(f"pipeline_kwargs may not set {clash}: they are CalibrationConfig fields or set "
                                  "by calibration itself")
            try:
                json.dumps(kw)
            except TypeError as e:
                raise ConfigError(f"pipeline_kwargs must hold JSON-able values only ({e})") from None
            set_("pipeline_kwargs", kw)

    @property
    def input_kind(self) -> str:
        """``"text"``, ``"class"`` or ``"unconditional"``: which inputs this config carries."""
        if self.prompts is not None:
            return "text"
        if self.class_labels is not None:
            return "class"
        return "unconditional"

    @property
    def num_batches(self) -> int:
        """Pipeline calls per pass: ``ceil(num_samples / batch_size)``."""
        return -(-self.num_samples // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": CALIBRATION_CONFIG_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, Mapping) else v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CalibrationConfig":
        d = dict(d)
        version = d.pop("version", None)
        if version != CALIBRATION_CONFIG_VERSION:
            raise ConfigError(f"CalibrationConfig version {version!r} is not supported by this dmq "
                              f"(expects {CALIBRATION_CONFIG_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown CalibrationConfig field(s) {unknown}")
        return cls(**d)

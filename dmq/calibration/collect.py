"""Activation collection on the real pipeline.

:func:`collect` runs the pipeline itself (text prompts, class labels or unconditional, chosen by the pipeline's
call signature; guidance as the config says, so hooks see whatever batch the pipeline builds: ``[uncond, cond]``
under classifier-free guidance, DiT's ``[cond, null class 1000]``, FLUX-dev's single distilled-guidance batch) with

- a forward pre-hook on the denoiser (``pipe.unet`` / ``pipe.transformer``) that reads the timestep argument of every
  call, maps it to the trajectory's distinct timesteps (``pipe.scheduler.timesteps``; FLUX's ``t / 1000`` input is
  recognised; Heun-type schedules that evaluate one timestep twice give two calls of one step) and decides whether
  this call is recorded (the sampler's selection), and stops the run once no selected step is left;
- forward pre-hooks on the named GEMM layers that stream their inputs into :class:`~dmq.calibration.stats.LayerStats`
  (fixed memory: see that module), raising :class:`~dmq.errors.NonFiniteError` with the layer and timestep on
  NaN/Inf;
- optionally, forward pre-hooks on named blocks that keep (a bounded, uniformly chosen subset of) their call
  inputs for block reconstruction, in memory or as safetensors files under ``config.cache_dir``.

Memory bound: ``sum(StatsConfig.nbytes(C_layer, per_timestep_buckets))`` for the layer statistics (independent of
``num_samples``), plus ``max_block_records`` recorded calls per block, plus, for the ``eda`` sampler only, its
features: ``num_batches * S * D * 4`` bytes (``D <= 256``: 4 x 4 pooled latent per channel).

Nothing in the pipeline is changed: hooks are removed and the progress-bar setting restored on every exit.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from dmq.calibration.config import CalibrationConfig
from dmq.calibration.samplers import get_sampler, latent_features
from dmq.calibration.stats import LayerStats, StatsConfig
from dmq.errors import ConfigError, NonFiniteError, UnsupportedPipelineError

__all__ = ["collect", "collect_block_inputs", "CalibrationResult", "CallRecord", "BlockRecord", "find_denoiser",
           "timestep_bucket", "parse_layer_name", "match_step"]

logger = logging.getLogger(__name__)

#: FLUX pipelines pass ``t / 1000`` to the transformer
_FLUX_TIME_SCALE = 1000.0


def find_denoiser(pipe: Any) -> tuple[str, nn.Module]:
    """``("transformer" | "unet", module)`` of a diffusers pipeline."""
    for attr in ("transformer", "unet"):
        m = getattr(pipe, attr, None)
        if isinstance(m, nn.Module):
            return attr, m
    raise UnsupportedPipelineError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` component")


def _dmq_module_types() -> tuple[type, ...]:
    from dmq.nn import base

    return (getattr(base, "QuantModule", base.QuantGemm),)


def parse_layer_name(name: str) -> tuple[str, tuple[int, int] | None]:
    """``"conv1"`` → ``("conv1", None)``; ``"conv1[0:128]"`` → ``("conv1", (0, 128))``: statistics of input
    channels ``[a, b)`` only (e.g. one part of a split-shortcut layer)."""
    if not name.endswith("]") or "[" not in name:
        return name, None
    base, _, rng = name[:-1].rpartition("[")
    try:
        a, b = (int(v) for v in rng.split(":"))
    except ValueError:
        raise ConfigError(f"bad channel range in layer name {name!r}; expected 'name[a:b]'") from None
    return base, (a, b)


def match_step(raw: float, timesteps: Sequence[float], dtype: torch.dtype | None = None) -> int:
    """Index of the schedule timestep a denoiser call's timestep ``raw`` stands for, or -1 when it is off the
    schedule. Tolerance: half the distance to the neighbouring timesteps, widened to the rounding of ``dtype``
    (FLUX-dev passes ``t / 1000`` in bf16: about 2 timestep units near t = 1000, more than half the spacing of
    a 50-step shifted schedule there)."""
    d = [abs(raw - t) for t in timesteps]
    step = min(range(len(d)), key=d.__getitem__)
    near = [abs(timesteps[step] - timesteps[j]) for j in (step - 1, step + 1) if 0 <= j < len(timesteps)]
    tol = max(0.5 * min(near) if near else 1.0, 1e-3)
    if dtype is not None:
        tol = max(tol, 2 * torch.finfo(dtype).eps * max(abs(raw), 1.0))
    return step if d[step] <= tol else -1


def timestep_bucket(t_norm: float, num_buckets: int) -> int:
    """The bucket of a normalized timestep: ``min(int(t_norm * n), n - 1)``."""
    return min(max(int(t_norm * num_buckets), 0), num_buckets - 1)


# ---------------------------------------------------------------------------------------------------------------
# recorded block inputs


def _pack(obj: Any, tensors: dict[str, torch.Tensor], objects: list[Any] | None, where: str) -> Any:
    """A JSON skeleton of a nested call input; tensors go to ``tensors`` (CPU copies), other objects to ``objects``
    (memory only)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"T": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"V": obj}
    if isinstance(obj, (list, tuple)):
        return {"L" if isinstance(obj, list) else "U": [_pack(v, tensors, objects, where) for v in obj]}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"D": {k: _pack(v, tensors, objects, where) for k, v in obj.items()}}
    if objects is None:
        raise ConfigError(f"{where}: an input of type {type(obj).__name__} cannot be cached on disk; use "
                          "cache_dir=None (memory)")
    objects.append(obj)
    return {"O": len(objects) - 1}


def _unpack(node: Any, tensors: dict[str, torch.Tensor], objects: list[Any], device: Any) -> Any:
    if "T" in node:
        t = tensors[node["T"]]
        return t.to(device) if device is not None else t.clone()
    if "V" in node:
        return node["V"]
    if "L" in node:
        return [_unpack(v, tensors, objects, device) for v in node["L"]]
    if "U" in node:
        return tuple(_unpack(v, tensors, objects, device) for v in node["U"])
    if "D" in node:
        return {k: _unpack(v, tensors, objects, device) for k, v in node["D"].items()}
    return objects[node["O"]]


@dataclass
class BlockRecord:
    """One recorded call of a block: ``load()`` gives ``(args, kwargs)`` to call it with again.

    ``batch``: pipeline call index; ``step``: index into the trajectory's distinct timesteps; ``t_norm``: its
    normalized timestep. Inputs live in memory (CPU tensors) or in a safetensors file ``path`` (no pickle; the
    structure is JSON in the file's metadata).
    """

    block: str
    batch: int
    step: int
    t_norm: float
    nbytes: int
    path: str | None = None
    _skeleton: Any = None
    _tensors: dict[str, torch.Tensor] | None = None
    _objects: list[Any] = field(default_factory=list)

    @classmethod
    def capture(cls, block: str, batch: int, step: int, t_norm: float, args: tuple, kwargs: dict,
                path: str | None) -> "BlockRecord":
        tensors: dict[str, torch.Tensor] = {}
        objects: list[Any] | None = None if path else []
        skel = _pack({"args": list(args), "kwargs": kwargs}, tensors, objects, f"block {block}")
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if path:
            from safetensors.torch import save_file

            meta = {"skeleton": json.dumps(skel), "block": block, "batch": str(batch), "step": str(step),
                    "t_norm": repr(t_norm)}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file(tensors, path, metadata=meta)
            return cls(block, batch, step, t_norm, nbytes, path, skel, None, [])
        return cls(block, batch, step, t_norm, nbytes, None, skel, tensors, objects or [])

    @classmethod
    def from_file(cls, path: str) -> "BlockRecord":
        """A record written by :meth:`capture` with a path."""
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = f.metadata()
        nbytes = os.path.getsize(path)
        return cls(meta["block"], int(meta["batch"]), int(meta["step"]), float(meta["t_norm"]), nbytes, path,
                   json.loads(meta["skeleton"]), None, [])

    def load(self, device: Any = None) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the recorded call, tensors on ``device`` (fresh copies)."""
        if self.path is not None:
            from safetensors.torch import load_file

            tensors = load_file(self.path)
        else:
            tensors = self._tensors
        d = _unpack(self._skeleton, tensors, self._objects, device)
        return tuple(d["args"]), d["kwargs"]


# ---------------------------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True)
class CallRecord:
    """One denoiser call during collection. ``batch_size``: the leading dim of the denoiser's input (twice the
    number of samples under batched classifier-free guidance). ``step = -1``: a timestep off the schedule."""

    phase: str
    batch: int
    step: int
    timestep: float
    t_norm: float
    batch_size: int
    recorded: bool


@dataclass
class CalibrationResult:
    """What :func:`collect` gathered.

    ``stats``: layer name → :class:`LayerStats`; ``timesteps``: the trajectory's distinct scheduler timesteps in
    calling order, ``t_norm`` the same normalized to [0, 1]; ``mask``: bool ``(num_batches, S)``, the recorded
    (batch, step) pairs; ``calls``: every denoiser call; ``block_inputs``: block name → recorded calls.
    """

    config: CalibrationConfig
    denoiser: str
    stats: dict[str, LayerStats]
    timesteps: list[float]
    t_norm: list[float]
    mask: torch.Tensor
    calls: list[CallRecord]
    block_inputs: dict[str, list[BlockRecord]]
    seconds: float

    def nbytes(self) -> int:
        """Bytes of the layer statistics' buffers (the collectors' memory)."""
        return sum(s.nbytes() for s in self.stats.values())

    def recorded_t_norm(self) -> list[float]:
        """Normalized timestep of every recorded denoiser call."""
        return [c.t_norm for c in self.calls if c.recorded]


# ---------------------------------------------------------------------------------------------------------------
# the collector


class _StopRun(Exception):
    """Raised inside the denoiser's pre-hook once a run has nothing left to record."""


def _pipeline_kind(pipe: Any) -> tuple[str, dict[str, inspect.Parameter]]:
    params = dict(inspect.signature(pipe.__call__).parameters)
    if "prompt" in params:
        return "text", params
    if "class_labels" in params:
        return "class", params
    if "batch_size" in params:
        return "unconditional", params
    raise UnsupportedPipelineError(f"{type(pipe).__name__}.__call__ takes neither prompt, class_labels nor "
                                   "batch_size; dmq cannot drive it for calibration")


def _first_float(t: Any) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else float("nan")
    return float(t)


def _distinct(values: Sequence[float], tol: float = 1e-6) -> list[float]:
    out: list[float] = []
    for v in values:
        if not any(abs(v - u) <= tol * max(1.0, abs(u)) for u in out):
            out.append(v)
    return out


class _Collector:
    def __init__(self, pipe: Any, layer_names: list[str], config: CalibrationConfig, stats: StatsConfig,
                 blocks: list[str], max_block_records: int) -> None:
        self.pipe, self.config, self.stats_config = pipe, config, stats
        self.den_attr, self.den = find_denoiser(pipe)
        quantized = [n for n, m in self.den.named_modules() if isinstance(m, _dmq_module_types())]
        if quantized:
            raise ConfigError(f"{self.den_attr} is already quantized by dmq (e.g. {quantized[0]}); calibrate the "
                              "floating-point denoiser, before quantize_pipeline swaps its layers")
        self.kind, self.params = _pipeline_kind(pipe)
        self._check_inputs()
        modules = dict(self.den.named_modules())
        self.layers: dict[str, nn.Module] = {}
        # statistics name -> (module name, channel slice or None)
        self.targets: dict[str, tuple[str, tuple[int, int] | None]] = {}
        for name in dict.fromkeys(layer_names):
            mname, sl = parse_layer_name(name)
            m = modules.get(mname)
            if m is None:
                raise ConfigError(f"{self.den_attr} has no module {mname!r} to calibrate")
            if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                raise ConfigError(f"{self.den_attr}.{mname} is a {type(m).__name__}; collection hooks Linear and "
                                  "Conv layers only")
            cin = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            if sl is not None and not (0 <= sl[0] < sl[1] <= cin):
                raise ConfigError(f"{name}: channel range outside the layer's {cin} input channels")
            self.layers[mname] = m
            self.targets[name] = (mname, sl)
        self.blocks: dict[str, nn.Module] = {}
        for name in dict.fromkeys(blocks):
            if name not in modules:
                raise ConfigError(f"{self.den_attr} has no block {name!r}")
            self.blocks[name] = modules[name]
        if not self.layers and not self.blocks:
            raise ConfigError("nothing to collect: give layer names and/or block names")
        if max_block_records < 1:
            raise ConfigError(f"max_block_records must be >= 1, got {max_block_records}")
        self.max_block_records = max_block_records
        nb = config.per_timestep_buckets
        self.stats = {n: LayerStats(n, 1 if isinstance(self.layers[mn], nn.modules.conv._ConvNd) else -1, stats, nb,
                                    seed=config.seed * 7919 + i)
                      for i, (n, (mn, _)) in enumerate(self.targets.items())}
        self.by_module: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
        for n, (mn, sl) in self.targets.items():
            self.by_module.setdefault(mn, []).append((n, sl))
        self.records: dict[str, list[BlockRecord]] = {n: [] for n in self.blocks}
        self._record_seen = {n: 0 for n in self.blocks}
        self._record_gen = torch.Generator().manual_seed(config.seed + 104729)
        self.sampler = get_sampler(config.sampler)
        self.calls: list[CallRecord] = []
        self.timesteps: list[float] | None = None
        self.t_norm: list[float] | None = None
        self.mask: torch.Tensor | None = None
        self.features: dict[tuple[int, int], torch.Tensor] = {}
        # per-run state
        self.phase, self.batch = "record", 0
        self.run_started = False
        self.scale = 1.0
        self.recording, self.step, self.t_cur, self.raw_cur, self.bucket = False, -1, 0.0, 0.0, None

    # -- inputs ------------------------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        c, cls = self.config, type(self.pipe).__name__
        if self.kind == "text" and c.prompts is None:
            raise ConfigError(f"{cls} is a text-to-image pipeline: calibration needs prompts=[...]")
        if self.kind == "class":
            if c.class_labels is None:
                raise ConfigError(f"{cls} is class-conditional: calibration needs class_labels=[...]")
            n = getattr(self.den.config, "num_embeds_ada_norm", None)
            if n is not None and max(c.class_labels) >= n:
                raise ConfigError(f"class label {max(c.class_labels)} is out of range: {cls} has {n} classes")
        if self.kind != "text" and c.prompts is not None:
            raise ConfigError(f"{cls} takes no text prompts ({self.kind} pipeline)")
        if self.kind != "class" and c.class_labels is not None:
            raise ConfigError(f"{cls} takes no class labels ({self.kind} pipeline)")
        if c.guidance_scale is not None and "guidance_scale" not in self.params:
            raise ConfigError(f"{cls} takes no guidance_scale; leave it None")
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self.params.values())
        unknown = [k for k in (c.pipeline_kwargs or {}) if k not in self.params]
        if unknown and not has_var_kw:
            raise ConfigError(f"{cls} does not take pipeline_kwargs {unknown}")

    def call_kwargs(self, b: int) -> dict[str, Any]:
        c = self.config
        lo, hi = b * c.batch_size, min((b + 1) * c.batch_size, c.num_samples)
        kw: dict[str, Any] = {"num_inference_steps": c.num_inference_steps,
                              "generator": torch.Generator().manual_seed(c.seed * 1_000_003 + b)}
        if self.kind == "text":
            kw["prompt"] = [c.prompts[i % len(c.prompts)] for i in range(lo, hi)]
        elif self.kind == "class":
            kw["class_labels"] = [c.class_labels[i % len(c.class_labels)] for i in range(lo, hi)]
        else:
            kw["batch_size"] = hi - lo
        if c.guidance_scale is not None:
            kw["guidance_scale"] = c.guidance_scale
        if "output_type" in self.params:
            kw["output_type"] = "latent"  # skips the VAE decode where the pipeline allows it
        kw.update(c.pipeline_kwargs or {})
        return kw

    # -- schedule ----------------------------------------------------------------------------------------------
    def _start_run(self, v: float) -> None:
        sched = self.pipe.scheduler
        raw = [float(t) for t in torch.as_tensor(sched.timesteps).detach().cpu().to(torch.float64)]
        if not raw:
            raise UnsupportedPipelineError("the scheduler has no timesteps after the pipeline set them")
        distinct = _distinct(raw)
        n_train = float(getattr(sched.config, "num_train_timesteps", None) or 1000)
        # FLUX passes t / 1000: the first call of a run is at the largest timestep, so a value <= 1 there means
        # the pipeline divided.
        self.scale = _FLUX_TIME_SCALE if (max(distinct) > 1.5 and abs(v) <= 1.0 + 1e-6) else 1.0
        t_norm = [min(max(t / n_train, 0.0), 1.0) for t in distinct]
        if self.timesteps is None:
            self.timesteps, self.t_norm = distinct, t_norm
        elif len(distinct) != len(self.timesteps) or any(
                abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in zip(distinct, self.timesteps)):
            raise UnsupportedPipelineError("the pipeline's timestep schedule changed between calibration batches "
                                           f"({self.timesteps} then {distinct})")
        if self.mask is None:
            self.mask = self._make_mask()
        self.run_started = True

    def _make_mask(self) -> torch.Tensor:
        c = self.config
        s, nb = len(self.timesteps), c.num_batches
        if self.phase == "features":
            return torch.ones(nb, s, dtype=torch.bool)
        if c.timesteps is not None:
            mask = torch.zeros(nb, s, dtype=torch.bool)
            for v in c.timesteps:
                d = [abs(v - t) for t in self.timesteps]
                i = min(range(s), key=d.__getitem__)
                if d[i] > 1e-2:
                    shown = ", ".join(f"{t:g}" for t in self.timesteps)
                    raise ConfigError(f"timestep {v:g} is not in the pipeline's schedule for "
                                      f"num_inference_steps={c.num_inference_steps}: [{shown}]")
                mask[:, i] = True
            return mask
        num = min(c.num_timesteps or s, s)
        tn = torch.tensor(self.t_norm, dtype=torch.float32)
        return self.sampler(tn, num, nb, seed=c.seed, **(c.sampler_options or {}))

    # -- hooks -------------------------------------------------------------------------------------------------
    def denoiser_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t_arg = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t_arg is None:
            raise UnsupportedPipelineError(f"{self.den_attr} was called without a timestep argument")
        v = _first_float(t_arg)
        if not self.run_started:
            self._start_run(v)
        raw = v * self.scale
        dtype = t_arg.dtype if isinstance(t_arg, torch.Tensor) and t_arg.is_floating_point() else None
        step = match_step(raw, self.timesteps, dtype)
        b = self.batch
        row = self.mask[b]
        last = int(row.nonzero().max()) if row.any() else -1
        if step > last >= 0 or last < 0:
            raise _StopRun
        x = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        self.step, self.raw_cur = step, raw
        self.t_cur = self.t_norm[step] if step >= 0 else min(max(raw / 1000.0, 0.0), 1.0)
        nb = self.config.per_timestep_buckets
        self.bucket = timestep_bucket(self.t_cur, nb) if nb else None
        self.recording = step >= 0 and bool(row[step]) and self.phase == "record"
        bs = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 0
        self.calls.append(CallRecord(self.phase, b, step, raw, self.t_cur, bs, self.recording))
        if self.phase == "features" and step >= 0 and (b, step) not in self.features and isinstance(x, torch.Tensor):
            self.features[(b, step)] = latent_features(x)

    def layer_hook(self, mname: str, module: nn.Module, args: tuple) -> None:
        if not self.recording or not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        for name, sl in self.by_module[mname]:
            st = self.stats[name]
            xs = x if sl is None else x.narrow(st.channel_dim % x.dim(), sl[0], sl[1] - sl[0])
            mn, mx = st.update(xs, self.bucket)
            if not (mn == mn and mx == mx and abs(mn) != float("inf") and abs(mx) != float("inf")):
                raise NonFiniteError(
                    f"{self.den_attr}.{name}: its input contains NaN or Inf at timestep {self.raw_cur:g} "
                    f"(normalized t={self.t_cur:.4f}, step {self.step}, calibration batch {self.batch}); "
                    "calibration stopped and nothing was changed")

    def block_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.recording:
            return
        seen = self._record_seen[name]
        self._record_seen[name] = seen + 1
        recs = self.records[name]
        if len(recs) < self.max_block_records:
            slot = len(recs)
        else:  # reservoir sampling over all recorded calls (Algorithm R)
            slot = int(torch.randint(0, seen + 1, (1,), generator=self._record_gen))
            if slot >= self.max_block_records:
                return
        path = None
        if self.config.cache_dir:
            path = str(Path(self.config.cache_dir) / "block_inputs" / name / f"{slot:05d}.safetensors")
        rec = BlockRecord.capture(name, self.batch, self.step, self.t_cur, args, kwargs, path)
        if slot == len(recs):
            recs.append(rec)
        else:
            recs[slot] = rec

    # -- driver ------------------------------------------------------------------------------------------------
    def run(self, progress: bool) -> CalibrationResult:
        c = self.config
        start = time.perf_counter()
        phases = (["features"] if getattr(self.sampler, "needs_features", False) and c.timesteps is None
                  else []) + ["record"]
        handles = [self.den.register_forward_pre_hook(self.denoiser_hook, with_kwargs=True)]
        old_bar = getattr(self.pipe, "_progress_bar_config", None)
        old_bar = dict(old_bar) if isinstance(old_bar, dict) else old_bar
        try:
            for name, m in self.layers.items():
                handles.append(m.register_forward_pre_hook(lambda mod, a, _n=name: self.layer_hook(_n, mod, a)))
            for name, m in self.blocks.items():
                handles.append(m.register_forward_pre_hook(
                    lambda mod, a, k, _n=name: self.block_hook(_n, mod, a, k), with_kwargs=True))
            if hasattr(self.pipe, "set_progress_bar_config"):
                self.pipe.set_progress_bar_config(disable=True)
            bar = tqdm(total=len(phases) * c.num_batches, desc="dmq calibration", disable=not progress,
                       leave=False)
            for phase in phases:
                self.phase = phase
                if phase == "record" and "features" in phases:
                    self.mask = self._eda_mask()
                for b in range(c.num_batches):
                    bar.update(1)
                    if self.mask is not None and not bool(self.mask[b].any()):
                        continue  # nothing selected in this batch: skip the run
                    self.batch, self.run_started, self.recording = b, False, False
                    try:
                        with torch.no_grad():
                            self.pipe(**self.call_kwargs(b))
                    except _StopRun:
                        pass
                    finally:
                        self.recording = False
                    if not self.run_started:
                        raise UnsupportedPipelineError(f"the pipeline never called its {self.den_attr}")
            bar.close()
        finally:
            for h in handles:
                h.remove()
            if hasattr(self.pipe, "_progress_bar_config") or old_bar is not None:
                if old_bar is None:
                    del self.pipe._progress_bar_config
                else:
                    self.pipe._progress_bar_config = old_bar
        return CalibrationResult(c, self.den_attr, self.stats, list(self.timesteps), list(self.t_norm),
                                 self.mask.clone(), self.calls, self.records, time.perf_counter() - start)

    def _eda_mask(self) -> torch.Tensor:
        c = self.config
        s = len(self.timesteps)
        d = next(iter(self.features.values())).numel()
        feats = torch.zeros(c.num_batches, s, d)
        for (b, step), f in self.features.items():
            feats[b, step] = f
        self.features.clear()
        num = min(c.num_timesteps or s, s)
        tn = torch.tensor(self.t_norm, dtype=torch.float32)
        return self.sampler(tn, num, c.num_batches, seed=c.seed, features=feats, **(c.sampler_options or {}))


def collect(pipe: Any, layer_names: Sequence[str], config: CalibrationConfig, *,
            stats: StatsConfig = StatsConfig(), blocks: Sequence[str] = (), max_block_records: int = 32,
            progress: bool = True) -> CalibrationResult:
    """Run ``pipe`` on the calibration data and stream the inputs of ``layer_names`` (module names inside the
    denoiser, Linear or Conv; ``"name[a:b]"`` keeps statistics of input channels ``[a, b)`` only, as a
    split-shortcut layer's parts need) into fixed-size statistics, keyed by the given names; optionally record the
    call inputs of ``blocks`` (module names inside the denoiser), at most ``max_block_records`` per block (a
    uniform random subset of the recorded calls, in memory or under ``config.cache_dir``).

    Only the sampler-selected (batch, timestep) pairs are recorded; a run stops as soon as it has nothing left to
    record. With the ``eda`` sampler the pipeline runs twice (latent features first, then recording).
    Raises ConfigError (bad inputs for this pipeline, a timestep not in the schedule, unknown layer names, an
    already-quantized denoiser) and NonFiniteError (NaN/Inf input, naming layer and timestep). The pipeline is
    left as it was.
    """
    if not isinstance(config, CalibrationConfig):
        raise ConfigError(f"config must be a dmq CalibrationConfig, got {type(config).__name__}")
    return _Collector(pipe, list(layer_names), config, stats, list(blocks), max_block_records).run(progress)


def collect_block_inputs(pipe: Any, blocks: Sequence[str], config: CalibrationConfig, *,
                         max_block_records: int = 32, progress: bool = True) -> dict[str, list[BlockRecord]]:
    """Only the recorded call inputs of ``blocks`` (see :func:`collect`): block name → records."""
    return collect(pipe, [], config, blocks=blocks, max_block_records=max_block_records,
                   progress=progress).block_inputs

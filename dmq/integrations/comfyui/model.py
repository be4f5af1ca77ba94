"""Quantize, save, load and add LoRAs to ComfyUI models (``comfy.model_patcher.ModelPatcher``).

ComfyUI's ``ModelPatcher.clone()`` shares the underlying ``BaseModel``: every function here returns a *new* patcher
over a structural copy of the model (new module objects, the very same tensors) and swaps or changes layers only in
that copy, so the input patcher and every clone of it stay exactly as they were. Planning and layer building are
dmq's own (:func:`dmq.pipelines.quantize.plan_model` / ``prepare_model`` / ``commit_model``) over the ComfyUI role
view (:mod:`dmq.integrations.comfyui.roles`).

Nothing here imports ComfyUI at import time; the calibration run imports its ``nodes`` module (it runs inside
ComfyUI).
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dmq.config import QuantConfig, resolve_config
from dmq.errors import (
    CalibrationRequiredError,
    CheckpointMismatchError,
    ConfigError,
    DmqError,
)
from dmq.integrations.comfyui.roles import comfy_roles_for
from dmq.nn import LAYER_TYPES, QuantModule, outermost_quant_modules
from dmq.nn.base import QuantGemm
from dmq.pipelines.quantize import (
    DMQ_CONFIG_ATTR,
    commit_model,
    plan_model,
    prepare_model,
)

__all__ = [
    "CalibrationRun",
    "add_comfy_lora",
    "load_comfy_quantized",
    "quantize_comfy_model",
    "save_comfy_quantized",
    "unsupported_reason",
]

logger = logging.getLogger(__name__)

_PREFIX = "diffusion_model."


def unsupported_reason(config: QuantConfig) -> str | None:
    """Why a config cannot be applied inside ComfyUI, or ``None``: block reconstruction, per-timestep ranges, the
    temporal cache and fused projections hook diffusers' pipeline and denoiser classes."""
    if config.fuse_projections:
        return ("fused q/k/v projections use diffusers' fuse_qkv_projections; ComfyUI's models have their own "
                "attention layout")
    if config.reconstruct:
        return "block reconstruction runs on diffusers pipelines only"
    if config.timestep_buckets or config.temporal_cache:
        return "per-timestep ranges and the temporal cache hook diffusers' denoisers only"
    if config.smooth_alpha is not None and config.activation is not None and not config.activation.dynamic:
        return "smoothing together with static activation ranges is not supported in ComfyUI"
    return None


def _copy_structure(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are the original tensors (parameters re-wrapped, so that
    moving or swapping them in the copy leaves the original's attributes alone). Costs no tensor memory."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        memo[id(t)] = nn.Parameter(t.data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else t
    return copy.deepcopy(module, memo)


def _unpatched_copy(patcher: Any) -> nn.Module:
    """A structural copy (:func:`_copy_structure`) of the patcher's ``BaseModel`` with its *unpatched* weights.

    While a clone is loaded for sampling, ComfyUI keeps that clone's weight patches (LoRAs) applied to the shared
    model, so the model is first unloaded and unpatched the way ComfyUI does before reading weights
    (``ModelPatcher.get_key_patches``): ``unload_model_clones`` unpatches clones with other patches, and
    ``unpatch_model`` restores the backups a clone with the same patches left applied."""
    import comfy.model_management as mm

    if hasattr(mm, "unload_model_clones"):
        mm.unload_model_clones(patcher)
    if getattr(patcher, "backup", None):
        patcher.unpatch_model()
    return _copy_structure(patcher.model)


def _new_patcher(patcher: Any, base_model: nn.Module) -> Any:
    """A clone of ``patcher`` (its model options, object and weight patches) over another ``BaseModel``."""
    out = patcher.clone()
    out.model = base_model
    out.size = 0
    out.model_size()  # recomputes size and model_keys from the new model
    return out


def _check_patches(patcher: Any, layers: set[str]) -> None:
    """Weight patches (ComfyUI LoRAs) on layers that get quantized would be dropped: refuse them."""
    hit = sorted(k for k in patcher.patches if k.startswith(_PREFIX) and
                 k[len(_PREFIX):].rpartition(".")[0] in layers)
    if hit:
        raise ConfigError(f"the model carries ComfyUI weight patches (a LoRA?) on layers dmq would quantize "
                          f"({', '.join(hit[:3])}{', …' if len(hit) > 3 else ''}): quantize first, then add LoRAs "
                          "with the DMQ LoRA node")


class CalibrationRun:
    """What a calibration run samples with ComfyUI's KSampler: ``positive``/``negative`` CONDITIONING, a ``latent``
    (LATENT dict with ``samples (B, C, H, W)``), ``steps``, ``cfg``, ``seed``, sampler and scheduler names."""

    def __init__(self, positive: Any, negative: Any, latent: Mapping[str, Any], steps: int = 8, cfg: float = 7.0,
                 seed: int = 0, sampler_name: str = "euler", scheduler: str = "normal") -> None:
        if positive is None or latent is None:
            raise ConfigError("calibration needs both a positive CONDITIONING and a LATENT to sample")
        if steps < 1:
            raise ConfigError(f"calibration steps must be >= 1, got {steps}")
        self.positive, self.latent = positive, latent
        self.negative = negative if negative is not None else positive
        self.steps, self.cfg, self.seed = steps, cfg, seed
        self.sampler_name, self.scheduler = sampler_name, scheduler

    def run(self, patcher: Any) -> None:
        comfy_nodes = importlib.import_module("nodes")  # ComfyUI's own nodes.py
        comfy_nodes.common_ksampler(patcher, self.seed, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                    self.positive, self.negative, dict(self.latent))


def _collect_stats(patcher: Any, model: nn.Module, names: list[str], run: CalibrationRun) -> dict[str, Any]:
    """Per-layer input statistics (``{name: LayerStats}``) over one KSampler run of the floating-point ``patcher``;
    ``names`` may carry channel ranges (``"name[a:b]"``, split-shortcut parts)."""
    from dmq.calibration.collect import parse_layer_name
    from dmq.calibration.stats import LayerStats, StatsConfig
    from dmq.errors import NonFiniteError

    modules = dict(model.named_modules())
    stats, by_module = {}, {}
    for name in names:
        base, sl = parse_layer_name(name)
        stats[name] = LayerStats(name, 1 if isinstance(modules[base], nn.Conv2d) else -1, StatsConfig())
        by_module.setdefault(base, []).append((name, sl))

    def hook(mname: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        for name, sl in by_module[mname]:
            st = stats[name]
            xs = x if sl is None else x.narrow(st.channel_dim % x.dim(), sl[0], sl[1] - sl[0])
            mn, mx = st.update(xs.detach())
            if not (math.isfinite(mn) and math.isfinite(mx)):
                raise NonFiniteError(f"{mname}: its input contains NaN or Inf during calibration")

    handles = [modules[m].register_forward_pre_hook(lambda mod, args, m=m: hook(m, mod, args)) for m in by_module]
    try:
        with torch.no_grad():
            run.run(patcher)
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_comfy_model(patcher: Any, config: str | QuantConfig, calibration: CalibrationRun | None = None,
                         progress: bool = False) -> Any:
    """A new ModelPatcher whose diffusion model has dmq-quantized layers; ``patcher`` is not changed.

    ``config``: a preset name or a QuantConfig. ``calibration``: a :class:`CalibrationRun` (needed by presets with
    static activation ranges, used for smoothing by SmoothQuant/SVDQuant). The layer report is attached to the new
    diffusion model as ``dmq_report_entries``.
    """
    from dmq.calibration import (
        activation_scales,
        apply_input_scales,
        channel_absmax,
        static_activation_targets,
    )

    cfg = resolve_config(config)
    reason = unsupported_reason(cfg)
    if reason is not None:
        raise ConfigError(f"preset {cfg.name!r} cannot run in ComfyUI: {reason}")
    if cfg.needs_calibration and calibration is None:
        raise CalibrationRequiredError(f"preset {cfg.name!r} needs calibration: connect a CONDITIONING and a LATENT")
    base = _unpatched_copy(patcher)
    model = base.diffusion_model
    roles = comfy_roles_for(model)
    plans = [p for p in plan_model(model, roles, cfg) if p.action != "kept"]
    _check_patches(patcher, {p.name for p in plans})
    stats, act_absmax = None, None
    if calibration is not None and not cfg.accepts_calibration:
        logger.info("dmq: preset %r quantizes activations dynamically; the calibration inputs are not used", cfg.name)
    elif calibration is not None:
        names = [p.name for p in plans if p.action == "quantized"]
        if cfg.split_shortcut:
            names = [f"{p.name}[{a}:{b}]" for p in plans if p.action == "quantized"
                     for a, b in zip((0,) + p.splits, p.splits + (p.module.weight.shape[1],))]
        stats = _collect_stats(_new_patcher(patcher, base), model, names, calibration)
        if cfg.smooth_alpha is not None:
            act_absmax = {n: channel_absmax(stats[n]) for n in names}
    entries, built = prepare_model(model, cfg, roles, "diffusion_model", progress, act_absmax=act_absmax)
    targets = static_activation_targets(built)
    if targets:
        scales = activation_scales(stats, {n: layer.act_spec for n, layer in targets.items()}, cfg.act_estimator)
        apply_input_scales(targets, scales)
    commit_model(model, built, cfg)
    model.dmq_report_entries = entries
    logger.info("dmq: ComfyUI %s — %d layers quantized (%s), %d kept", type(model).__name__, len(built), cfg.name,
                len(entries) - len(built))
    return _new_patcher(patcher, base)


# -- save / load ---------------------------------------------------------------------------------------------------
def _model_config(base_model: nn.Module) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` of the model as JSON-normal data (dtypes as strings)."""
    return json.loads(json.dumps(base_model.model_config.unet_config, default=str, sort_keys=True))


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def save_comfy_quantized(patcher: Any, path: str | os.PathLike) -> Path:
    """Write the quantized diffusion model of ``patcher`` to one safetensors file: every tensor of the diffusion
    model, and in the header the dmq format version, QuantConfig, layer specs, ComfyUI's unet config and the
    fingerprint of the 16-bit weights. Written to a temporary file, then renamed."""
    from dmq import __version__
    from dmq.serialization import FORMAT_VERSION, base_fingerprint

    model = patcher.model.diffusion_model
    if not hasattr(model, DMQ_CONFIG_ATTR):
        raise DmqError("this MODEL is not dmq-quantized; run it through DMQ Quantize Model first")
    layers = outermost_quant_modules(model)
    meta = {
        "quant_method": "dmq",
        "format_version": str(FORMAT_VERSION),
        "dmq_version": __version__,
        "model_class": _class_name(model),
        "model_config": json.dumps(_model_config(patcher.model), sort_keys=True),
        "config": json.dumps(getattr(model, DMQ_CONFIG_ATTR).to_dict()),
        "layers": json.dumps({n: layer.layer_spec() for n, layer in layers.items()}),
        "fingerprint": base_fingerprint(model, set(layers)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    logger.info("dmq: saved %d quantized layers to %s", len(layers), path)
    return path


def load_comfy_quantized(path: str | os.PathLike, patcher: Any) -> Any:
    """A new ModelPatcher with the quantized model saved at ``path``, rebuilt on a copy of the floating-point model of
    ``patcher`` (which must be the model it was quantized from: class, unet config and fingerprint of the 16-bit
    weights are checked, CheckpointMismatchError otherwise). Loaded tensors are bit-identical to the saved ones."""
    from dmq.serialization import FORMAT_VERSION, base_fingerprint

    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("quant_method") != "dmq":
        raise CheckpointMismatchError(f"{path} is not a dmq checkpoint (no dmq metadata in its header)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointMismatchError(f"{path}: dmq checkpoint format {meta.get('format_version')} is not supported "
                                      f"(this dmq reads format {FORMAT_VERSION})")
    base = _unpatched_copy(patcher)  # its kept tensors are the MODEL's own (the fingerprint below proves them equal)
    model = base.diffusion_model
    if meta["model_class"] != _class_name(model):
        raise CheckpointMismatchError(f"{path} holds a {meta['model_class']}, the MODEL is a {_class_name(model)}")
    saved_cfg, cfg_now = json.loads(meta["model_config"]), _model_config(patcher.model)
    if saved_cfg != cfg_now:
        diff = sorted(k for k in set(saved_cfg) | set(cfg_now) if saved_cfg.get(k) != cfg_now.get(k))
        raise CheckpointMismatchError(f"{path} was made for another model config (differs in {', '.join(diff[:5])})")
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ConfigError("this MODEL is already quantized; load into the floating-point model")
    layers = json.loads(meta["layers"])
    if base_fingerprint(model, set(layers)) != meta["fingerprint"]:
        raise CheckpointMismatchError(f"{path}: the MODEL's weights are not the ones this checkpoint was quantized "
                                      "from (fingerprint of the 16-bit weights differs)")
    device = next(model.parameters()).device
    shells = {}
    for name, spec in layers.items():
        if spec["type"] not in LAYER_TYPES:
            raise CheckpointMismatchError(f"{path}: layer {name} has unknown type {spec['type']!r}")
        shells[name] = LAYER_TYPES[spec["type"]].from_layer_spec(spec).to_empty(device=device)
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        for name, shell in shells.items():
            try:  # copied into the shell's own fresh tensors
                shell.load_state_dict({k: f.get_tensor(f"{name}.{k}") for k in shell.state_dict()}, strict=True)
            except (RuntimeError, KeyError, safetensors.SafetensorError) as e:
                raise CheckpointMismatchError(f"{path}: tensors of {name} do not match its spec: {e}") from None
    kept = {k for k in model.state_dict() if not any(k.startswith(f"{n}.") for n in layers)}
    expected = kept | {f"{n}.{k}" for n, shell in shells.items() for k in shell.state_dict()}
    if keys != expected:
        missing, extra = sorted(expected - keys)[:5], sorted(keys - expected)[:5]
        raise CheckpointMismatchError(f"{path}: tensors do not match the model (missing {missing}, unexpected {extra})")
    commit_model(model, shells, QuantConfig.from_dict(json.loads(meta["config"])))
    logger.info("dmq: loaded %d quantized layers from %s", len(shells), path)
    return _new_patcher(patcher, base)


# -- LoRA ------------------------------------------------------------------------------------------------------------
def _lora_names(base_model: nn.Module) -> dict[str, str]:
    """LoRA module names as LoRA files spell them → module names of the diffusion model: the LDM name itself, with
    ``diffusion_model.``, kohya's ``lora_unet_<name with _>``, and diffusers' U-Net names (through ComfyUI's own
    ``comfy.utils.unet_to_diffusers`` map), plain or kohya-style."""
    model = base_model.diffusion_model
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, QuantGemm)):
            for alias in (n, _PREFIX + n, "lora_unet_" + n.replace(".", "_")):
                out[alias] = n
    try:
        import comfy.utils

        diffusers_map = comfy.utils.unet_to_diffusers(base_model.model_config.unet_config)
    except (ImportError, KeyError, TypeError):  # not a U-Net, or no ComfyUI
        diffusers_map = {}
    for dk, lk in diffusers_map.items():
        if dk.endswith(".weight") and lk.removesuffix(".weight") in out:
            d, n = dk.removesuffix(".weight"), lk.removesuffix(".weight")
            out.setdefault(d, n)
            out.setdefault("lora_unet_" + d.replace(".", "_"), n)
    return out


def add_comfy_lora(patcher: Any, lora: Mapping[str, torch.Tensor], strength: float = 1.0,
                   name: str = "default") -> Any:
    """A new ModelPatcher with a LoRA state dict (kohya ``lora_down``/``lora_up`` + ``alpha``, or peft
    ``lora_A``/``lora_B``; LDM, kohya or diffusers module names) added under ``name``: into the low-rank branch of
    dmq-quantized layers, through a forward hook on the layers that stayed floating point
    (:func:`dmq.methods.lora.add_lora_to_model`). Text-encoder entries (``lora_te*``) are left to ComfyUI's own
    LoRA loader; any other name that matches no layer is a DmqError. ``patcher`` is not changed."""
    from dmq.methods.lora import add_lora_to_model, parse_lora_state_dict

    parsed = parse_lora_state_dict(lora)
    aliases = _lora_names(patcher.model)
    text = [n for n in parsed if n.startswith(("lora_te", "text_encoder", "te_"))]
    unknown = sorted(n for n in parsed if n not in aliases and n not in text)
    if unknown:
        raise DmqError(f"LoRA module(s) {', '.join(unknown[:5])} match no layer of "
                       f"{type(patcher.model.diffusion_model).__name__}")
    if text:
        logger.info("dmq: %d text-encoder LoRA modules left to ComfyUI's LoRA loader", len(text))
    mapped = {aliases[n]: (a, b * s) for n, (a, b, s) in parsed.items() if n not in text}
    base = _unpatched_copy(patcher)
    if mapped and strength != 0:
        add_lora_to_model(base.diffusion_model, mapped, strength, name)
    return _new_patcher(patcher, base)

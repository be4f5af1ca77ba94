"""``quantize_pipeline``: swap the GEMM leaf modules of a pipeline's denoiser for quantized ones.

The work is planned and every replacement is built before the first swap, so any error (bad config, NaN weight,
unsupported targeted module) leaves the pipeline exactly as it was. With ``QuantConfig.fuse_projections`` the
denoiser's attention projections are fused first (:mod:`dmq.methods.fuse`), unfused again on any error, and the
replaced originals are dropped when the quantized layers are swapped in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dmq.config import QuantConfig, resolve_config
from dmq.errors import CalibrationRequiredError, ConfigError, UnsupportedModuleError, UnsupportedPipelineError
from dmq.formats import QuantSpec
from dmq.methods.fuse import drop_originals, fused_layers, fused_until_error, replaced_names
from dmq.methods.smoothing import smoothing_factors, weight_channel_absmax
from dmq.nn import QuantConv2d, QuantGemm, QuantLinear, QuantModule, quantize_module, why_unsupported
from dmq.nn.split import SplitQuantConv2d
from dmq.nn.svdquant import SVDQuantConv2d, SVDQuantLinear
from dmq.pipelines.roles import ArchRoles, matches_any, roles_for
from dmq.report import LayerEntry, QuantReport

__all__ = ["quantize_pipeline", "quantize_model", "prepare_model", "build_layer", "commit_model", "denoiser_name", "plan_model",
           "LayerPlan", "DMQ_CONFIG_ATTR"]

logger = logging.getLogger(__name__)

#: attribute set on every quantized component: the QuantConfig it was quantized with
DMQ_CONFIG_ATTR = "_dmq_config"
_GEMM_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one GEMM-like leaf: action ``quantized`` / ``weight-only`` / ``kept``."""

    name: str
    module: nn.Module
    action: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    reason: str = ""
    splits: tuple[int, ...] = ()


def denoiser_name(pipe: Any) -> str:
    """``"unet"`` or ``"transformer"``: the attribute holding the pipeline's denoiser."""
    for attr in ("transformer", "unet"):
        if isinstance(getattr(pipe, attr, None), nn.Module):
            return attr
    raise UnsupportedPipelineError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` component; "
                                   "dmq quantizes diffusion pipelines through their denoiser")


def _fp_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def plan_model(model: nn.Module, roles: ArchRoles, config: QuantConfig) -> list[LayerPlan]:
    """Decide, for every GEMM-like leaf of ``model``, whether and how it is quantized.

    Raises UnsupportedModuleError when an ``include`` pattern targets a module dmq cannot quantize, and ConfigError
    when an include/exclude pattern matches no GEMM layer (a typo would otherwise be silently ignored). The original
    linears that fused projections replace (:func:`dmq.methods.fuse.replaced_names`) are no layers here: they are
    unused and get dropped.
    """
    plans = []
    replaced = replaced_names(model)
    used = {p: False for p in config.include + config.exclude}
    splits = {c: (pt.split,) for pt in roles.concat_points for c in pt.consumers} if config.split_shortcut else {}
    for name, module in model.named_modules():
        if not isinstance(module, _GEMM_TYPES) or name in replaced:
            continue
        for p in used:
            used[p] = used[p] or matches_any(name, (p,))
        forced = matches_any(name, config.include)
        role, reason = roles.role_of(name)
        unsupported = why_unsupported(module)
        if matches_any(name, config.exclude):
            plans.append(LayerPlan(name, module, "kept", reason="excluded by the config's exclude patterns"))
        elif config.include and not forced:
            plans.append(LayerPlan(name, module, "kept", reason="not matched by the config's include patterns"))
        elif unsupported is not None:
            if forced:
                raise UnsupportedModuleError(f"{name}: targeted by include patterns {config.include} but "
                                             f"{unsupported}")
            plans.append(LayerPlan(name, module, "kept", reason=unsupported))
        elif isinstance(module, nn.Conv2d) and not config.quantize_convs and not forced:
            plans.append(LayerPlan(name, module, "kept", reason="convolutions are not quantized by this config"))
        elif role == "keep" and not forced:
            plans.append(LayerPlan(name, module, "kept", reason=reason))
        elif role == "modulation" and not forced:
            if config.modulation is None:
                plans.append(LayerPlan(name, module, "kept", reason="modulation (adaLN) kept 16-bit by the config"))
            else:
                plans.append(LayerPlan(name, module, "weight-only", config.modulation, None))
        else:
            action = "quantized" if config.activation is not None else "weight-only"
            plans.append(LayerPlan(name, module, action, config.weight, config.activation,
                                   splits=splits.get(name, ()) if isinstance(module, nn.Conv2d) else ()))
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        raise ConfigError(f"pattern(s) {unused} match no Linear/Conv layer of {type(model).__name__}")
    return plans


def build_layer(plan: LayerPlan, config: QuantConfig, act_absmax: torch.Tensor | None, name: str) -> QuantModule:
    """The quantized layer for one planned leaf. Main-role layers get SVDQuant's branch when ``config.rank > 0``
    and smoothing when ``config.smooth_alpha`` is set and the input's per-channel abs-max ``(Cin,)`` is known."""
    module = plan.module
    channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    weight = plan.weight.fitted(channels)
    act = plan.activation.fitted(channels) if plan.activation is not None else None
    if plan.splits:
        return SplitQuantConv2d.from_module(module, plan.splits, plan.weight, plan.activation, name)
    smooth = None
    if plan.action == "quantized" and config.smooth_alpha is not None and act_absmax is not None:
        smooth = smoothing_factors(act_absmax, weight_channel_absmax(module), config.smooth_alpha)
    if plan.action != "quantized":
        return quantize_module(module, weight, act, name=name)
    n = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    k = module.weight[0].numel()
    if config.rank or smooth is not None:
        cls = SVDQuantLinear if isinstance(module, nn.Linear) else SVDQuantConv2d
        return cls.from_module(module, weight, act, name, rank=min(config.rank, n, k), smooth=smooth)
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    return cls.from_module(module, weight, act, name, timestep_buckets=config.timestep_buckets)


def describe_layer(layer: QuantModule) -> str:
    """The format of a built layer as the report shows it, e.g. ``int4 g64 / int4 g64 + rank-32 branch``."""
    if isinstance(layer, SplitQuantConv2d):
        return f"split at {layer.splits}: " + " | ".join(describe_layer(part) for part in layer.parts)
    fmt = layer.weight_spec.describe() + (f" / {layer.act_spec.describe()}" if layer.act_spec else " / 16-bit act")
    if getattr(layer, "rank", 0):
        fmt += f" + rank-{layer.rank} branch"
    if getattr(layer, "smooth", None) is not None:
        fmt += " (smoothed)"
    return fmt


def prepare_model(model: nn.Module, config: QuantConfig, roles: ArchRoles, component: str = "model",
                  progress: bool = True, act_absmax: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[list[LayerEntry], dict[str, QuantModule]]:
    """Build (without swapping) the quantized layers of one model: its report entries and ``{name: new layer}``.
    ``act_absmax``: per-input-channel activation abs-max by layer name, from calibration (smoothing)."""
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ConfigError(f"{component} is already quantized by dmq; start from the floating-point model")
    plans = plan_model(model, roles, config)
    for p in plans:
        if p.action != "kept" and hasattr(p.module, "_hf_hook"):
            raise UnsupportedModuleError(
                f"{p.name} carries an accelerate hook (sequential CPU offload?): call dmq.quantize_pipeline before "
                "enable_sequential_cpu_offload / device_map dispatch")
    todo = [p for p in plans if p.action != "kept"]
    built: dict[str, QuantModule] = {}
    with torch.no_grad():
        for p in tqdm(todo, desc=f"quantizing {component}", disable=not progress, leave=False):
            absmax = act_absmax.get(p.name) if act_absmax else None
            built[p.name] = build_layer(p, config, absmax, f"{component}.{p.name}")
    entries = []
    for p in plans:
        fp = _fp_bytes(p.module)
        if p.action == "kept":
            entries.append(LayerEntry(component, p.name, type(p.module).__name__, "kept", "16-bit", p.reason, fp, fp))
            continue
        layer = built[p.name]
        entries.append(LayerEntry(component, p.name, type(p.module).__name__, p.action, describe_layer(layer), "",
                                  fp, layer.nbytes()))
    return entries, built


def commit_model(model: nn.Module, built: dict[str, QuantModule], config: QuantConfig) -> None:
    """Swap the built layers into ``model``, drop the originals that fused projections replace (if ``model`` was
    fused) and mark it as quantized with ``config``."""
    for name, new in built.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    drop_originals(model, fused_layers(model))
    setattr(model, DMQ_CONFIG_ATTR, config)


def quantize_model(model: nn.Module, config: QuantConfig, roles: ArchRoles, component: str = "model",
                   progress: bool = True) -> list[LayerEntry]:
    """Quantize one model in place (its attention projections fused first when ``config.fuse_projections``);
    returns its report entries. On any error the model is left as it was."""
    with fused_until_error(model, config.fuse_projections):
        entries, built = prepare_model(model, config, roles, component, progress)
    commit_model(model, built, config)
    logger.info("dmq: %s — %d layers quantized, %d kept", component, len(built), len(entries) - len(built))
    return entries


def _calibrate_bucketed(pipe: Any, built: dict[str, QuantModule], calibration: Any, method: str,
                        progress: bool) -> None:
    """One static range per timestep bucket for every static activation quantizer among ``built``."""
    from dmq.calibration import collect, estimate_bucket_scales, static_activation_targets

    targets = static_activation_targets(built)
    result = collect(pipe, list(targets), calibration, progress=progress)
    scales = {name: estimate_bucket_scales(result.stats[name], layer.act_spec, method)
              for name, layer in targets.items()}
    for name, layer in targets.items():
        layer.input_scale.copy_(scales[name].to(layer.input_scale))


def activate_runtime(pipe: Any, model: nn.Module, config: QuantConfig) -> None:
    """What a quantized denoiser needs at run time: diffusers' LoRA loading routed to dmq, the timestep context of
    per-timestep ranges, the temporal cache and 8-bit attention when the config asks for them. Called after
    quantization and after loading."""
    from dmq.methods.attention import enable_quantized_attention
    from dmq.methods.lora import route_diffusers_loras
    from dmq.methods.temporal_cache import enable_temporal_cache
    from dmq.nn.timestep import attach_timestep_state

    route_diffusers_loras(model)
    bucketed = [m for m in model.modules() if isinstance(m, QuantGemm) and m.timestep_buckets]
    if bucketed:
        n_train = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps", 1000) or 1000
        attach_timestep_state(model, bucketed, bucketed[0].timestep_buckets, n_train, roles_for(model).family)
    if config.temporal_cache and getattr(model, "dmq_temporal_cache", None) is None:
        enable_temporal_cache(pipe)
    if config.attention:
        enable_quantized_attention(model, config.attention)


def _prepare_calibrated(pipe: Any, model: nn.Module, cfg: QuantConfig, roles: ArchRoles, component: str,
                        calibration: Any, report: QuantReport, progress: bool,
                        ) -> tuple[list[LayerEntry], dict[str, QuantModule]]:
    """prepare_model on calibration data, all on the floating-point pipeline: per-channel abs-max for smoothing,
    then static activation ranges of the built layers, then block reconstruction."""
    from dmq.calibration import (CalibrationConfig, StatsConfig, calibrate_activation_scales, channel_absmax, collect,
                                 collect_block_inputs, find_blocks, reconstruct_blocks)

    if not isinstance(calibration, CalibrationConfig):
        raise ConfigError(f"calibration must be a dmq.CalibrationConfig, got {type(calibration).__name__}")
    act_absmax = None
    if cfg.smooth_alpha is not None:
        names = [p.name for p in plan_model(model, roles, cfg) if p.action == "quantized" and not p.splits]
        stats = StatsConfig(histogram=False, reservoir=False, channel_absmax=True)
        result = collect(pipe, names, calibration, stats=stats, progress=progress)
        act_absmax = {n: channel_absmax(result.stats[n]) for n in names}
        report.notes.append(f"smoothing (alpha {cfg.smooth_alpha}) from {calibration.num_samples} calibration "
                            f"samples, sampler {calibration.sampler!r}")
    entries, built = prepare_model(model, cfg, roles, component, progress, act_absmax=act_absmax)
    if cfg.timestep_buckets:
        _calibrate_bucketed(pipe, built, replace(calibration, per_timestep_buckets=cfg.timestep_buckets),
                            cfg.act_estimator, progress)
        report.notes.append(f"static activation ranges ({cfg.act_estimator}) per timestep bucket "
                            f"({cfg.timestep_buckets} buckets of normalized t) from {calibration.num_samples} samples")
    elif cfg.activation is not None and not cfg.activation.dynamic:
        calibrate_activation_scales(pipe, built, calibration, method=cfg.act_estimator, progress=progress)
        report.notes.append(f"static activation ranges ({cfg.act_estimator}) from {calibration.num_samples} "
                            f"calibration samples, sampler {calibration.sampler!r}")
    if cfg.reconstruct:
        records = collect_block_inputs(pipe, find_blocks(model), calibration, progress=progress)
        blocks = reconstruct_blocks(model, built, records, progress=progress)
        gains = [b.heldout_gain_db for b in blocks.values() if b.heldout_gain_db == b.heldout_gain_db]
        mean = f"{sum(gains) / len(gains):+.2f} dB on average" if gains else "not measured (too few records)"
        report.notes.append(f"block reconstruction on {len(blocks)} blocks: held-out output error gain {mean}")
    return entries, built


def quantize_pipeline(pipe: Any, config: str | QuantConfig, calibration: Any = None, *,
                      components: list[str] | None = None, progress: bool = True,
                      attention: str | None = None) -> Any:
    """Quantize a diffusers pipeline in place and return it, with ``pipe.dmq_report`` attached.

    ``config``: a preset name (see :func:`dmq.list_presets`) or a :class:`dmq.QuantConfig`. ``components``:
    attribute names to quantize (default: the denoiser, ``unet`` or ``transformer``); other components get a
    generic role view (every Linear/Conv2d). ``attention="int8"``: also run the denoiser's self- and joint-attention
    in 8 bits (sets ``QuantConfig.attention``; see :mod:`dmq.methods.attention`). On any error the pipeline is left
    unchanged.
    """
    cfg = resolve_config(config)
    if attention is not None:
        cfg = replace(cfg, attention=attention)
    if cfg.needs_calibration and calibration is None:
        raise CalibrationRequiredError(f"preset {cfg.name!r} needs calibration data: pass "
                                       "calibration=dmq.CalibrationConfig(...)")
    if calibration is not None and not cfg.accepts_calibration:
        raise ConfigError(f"preset {cfg.name!r} quantizes activations dynamically and takes no calibration data")
    main = denoiser_name(pipe)
    names = list(components) if components else [main]
    models = {}
    for name in names:
        model = getattr(pipe, name, None)
        if not isinstance(model, nn.Module):
            raise UnsupportedPipelineError(f"{type(pipe).__name__} has no model component {name!r}")
        models[name] = model
    roles = {name: roles_for(m) if name == main else ArchRoles("generic") for name, m in models.items()}
    report = QuantReport(config=cfg.to_dict())
    if cfg.attention:
        from dmq.methods.attention import attention_targets

        targets, kept = attention_targets(models[main])
        if not targets:
            raise ConfigError(f"{type(models[main]).__name__} has no diffusers self-attention module for "
                              f"{cfg.attention} attention")
        report.notes.append(f"{cfg.attention} attention (int8 QK, fp8 PV) on {len(targets)} self/joint-attention "
                            f"modules; {len(kept)} cross-attention modules kept 16-bit")
    if cfg.rank and cfg.smooth_alpha is not None and calibration is None:
        report.notes.append(f"{cfg.name}: no calibration data, so the low-rank branch ran data-free (SVD of W "
                            "alone, no smoothing)")
    prepared = {}
    with fused_until_error(models[main], cfg.fuse_projections) as fused:
        for name, model in models.items():  # build everything before the first swap
            if calibration is not None and name == main:
                entries, built = _prepare_calibrated(pipe, model, cfg, roles[name], name, calibration, report,
                                                     progress)
            else:
                entries, built = prepare_model(model, cfg, roles[name], name, progress)
            report.entries.extend(entries)
            prepared[name] = built
    if fused:
        report.notes.append(f"fused attention projections: {len(fused)} fused linears replace "
                            f"{sum(map(len, fused.values()))} q/k/v projections (diffusers' fuse_qkv_projections)")
    for name, built in prepared.items():
        # only the denoiser is fused: the other components record a config that says so
        commit_model(models[name], built, cfg if name == main else replace(cfg, fuse_projections=False))
    activate_runtime(pipe, models[main], cfg)
    pipe.dmq_report = report
    logger.info("%s", report)
    return pipe

"""Loading dmq checkpoints through diffusers' own ``from_pretrained``.

diffusers picks a quantization backend from a closed dict (``diffusers.quantizers.auto``), so dmq's backend is
added by an explicit, version-checked call, never by importing dmq::

    from dmq.integrations.diffusers import DmqConfig, register
    register()                                           # once per process; calling it again does nothing
    unet = UNet2DModel.from_pretrained("out/unet", quantization_config=DmqConfig())
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir,
                                             quantization_config=PipelineQuantizationConfig(
                                                 quant_mapping={"unet": DmqConfig()}))

``out/unet`` is a component folder written by :func:`dmq.save_quantized`: its ``config.json`` carries the dmq
``quantization_config`` (layer specs, QuantConfig, fingerprint of the 16-bit weights), so after :func:`register`
``from_pretrained`` also works without passing ``DmqConfig()`` (diffusers then uses the saved config; passing one
makes diffusers warn that the checkpoint's own config wins). Loading checks what :func:`dmq.load_quantized` checks
(dmq format version, layer types, tensor names and shapes, fingerprint of the 16-bit weights) and gives the same
layers, bit for bit. The model's runtime hooks (LoRA routing, per-timestep ranges) are attached; the temporal cache,
which needs the pipeline's scheduler, is not: call :func:`dmq.enable_temporal_cache` on the pipeline (outputs are
identical without it).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from enum import Enum
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from dmq.errors import CheckpointMismatchError, ConfigError, DmqError

__all__ = ["DmqConfig", "DmqQuantizer", "register", "MIN_DIFFUSERS_VERSION", "QUANT_METHOD"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "dmq"
#: the oldest diffusers whose quantizer interface this backend was written against and tested with
MIN_DIFFUSERS_VERSION = "0.42.0"


class DmqQuantizationMethod(str, Enum):
    """diffusers reads ``quant_method.value``; its own enum is closed, so dmq brings one member."""

    DMQ = QUANT_METHOD


class DmqConfig(QuantizationConfigMixin):
    """diffusers quantization config for dmq checkpoints.

    Construct it without arguments to ask ``from_pretrained`` for dmq loading; diffusers builds the full form from a
    checkpoint's ``config.json`` (the fields that :func:`dmq.save_quantized` writes: ``format_version``,
    ``dmq_version``, ``model_class``, ``config`` (QuantConfig dict), ``layers`` (module name → layer spec),
    ``fingerprint``). dmq quantizes with :func:`dmq.quantize_pipeline`, not on load: a DmqConfig on a
    floating-point checkpoint raises ConfigError.
    """

    def __init__(self, quant_method: str = QUANT_METHOD, format_version: int | None = None,
                 dmq_version: str | None = None, model_class: str | None = None, config: dict | None = None,
                 layers: dict[str, dict] | None = None, fingerprint: str | None = None, **unknown: Any) -> None:
        from dmq.serialization import check_quant_config

        if quant_method != QUANT_METHOD:
            raise ConfigError(f"DmqConfig is for quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        if format_version is not None:
            check_quant_config({"quant_method": QUANT_METHOD, "format_version": format_version}, "DmqConfig")
        if unknown:
            raise ConfigError(f"DmqConfig: unknown fields {sorted(unknown)} (a checkpoint from a newer dmq?)")
        self.quant_method = DmqQuantizationMethod.DMQ
        self.format_version = format_version
        self.dmq_version = dmq_version
        self.model_class = model_class
        self.config = config
        self.layers = layers
        self.fingerprint = fingerprint

    @property
    def from_checkpoint(self) -> bool:
        """Whether this config was read from a saved checkpoint (it then holds the layer specs)."""
        return self.layers is not None

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields that are set (diffusers' ``to_json_string`` reads this)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    def __repr__(self) -> str:
        if not self.from_checkpoint:
            return "DmqConfig()"
        return (f"DmqConfig(model_class={self.model_class!r}, preset={(self.config or {}).get('name')!r}, "
                f"layers={len(self.layers)}, format_version={self.format_version})")

    def compute_dtypes(self) -> set[torch.dtype]:
        """The float dtypes the checkpoint's quantized layers were built from."""
        return {getattr(torch, spec["compute_dtype"]) for spec in (self.layers or {}).values()}


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


class DmqQuantizer(DiffusersQuantizer):
    """The diffusers backend: before the weights load, the float layers that dmq quantized are replaced by empty
    quantized layers of the saved specs (after fusing the attention projections and dropping the originals when
    the checkpoint was quantized with ``fuse_projections``); every tensor is then taken from the checkpoint as stored
    (no dtype casts; copied into fresh allocations, as :func:`dmq.load_quantized` does); after loading, the tensor
    names, the fingerprint of the 16-bit weights and the absence of uninitialised (meta) tensors are checked."""

    requires_calibration = False
    required_packages = None
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DmqConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized or not quantization_config.from_checkpoint:
            raise ConfigError("DmqConfig loads dmq checkpoints, and this one has no dmq quantization_config (a "
                              "floating-point model?): quantize it with dmq.quantize_pipeline and save it with "
                              "dmq.save_quantized first")
        self._loaded_keys: set[str] | None = None

    # -- before loading ----------------------------------------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len({str(v) for v in device_map.values()}) > 1:
            raise ConfigError("dmq checkpoints load onto one device; a device_map that splits or offloads the model "
                              f"is not supported (got {sorted({str(v) for v in device_map.values()})})")

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        saved = self.quantization_config.compute_dtypes()
        if torch_dtype is not None and saved and saved != {torch_dtype}:
            raise ConfigError(f"this dmq checkpoint was quantized from {sorted(map(str, saved))} weights and loads "
                              f"as stored; pass torch_dtype={next(iter(saved))} or none (got {torch_dtype})")
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        self._loaded_keys = set(loaded_keys)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from dmq.config import QuantConfig
        from dmq.methods.fuse import drop_originals, fuse_projections
        from dmq.serialization import build_shells, check_tensor_names, install_layers

        qc = self.quantization_config
        where = type(model).__name__
        if qc.model_class is not None and qc.model_class != where:
            raise CheckpointMismatchError(f"this dmq checkpoint holds a quantized {qc.model_class}, not a {where}")
        if QuantConfig.from_dict(qc.config).fuse_projections:  # the same fused layers as when it was quantized
            drop_originals(model, fuse_projections(model))
        for lname in qc.layers:
            try:
                target = model.get_submodule(lname)
            except AttributeError:
                target = None
            if not isinstance(target, (nn.Linear, nn.Conv2d)):
                raise CheckpointMismatchError(f"{where} has no Linear/Conv2d {lname!r} that this dmq checkpoint "
                                              "quantized: the checkpoint was made for another model")
        install_layers(model, build_shells(qc.layers, where))
        if self._loaded_keys is not None:
            check_tensor_names(where, set(model.state_dict()), self._loaded_keys)
        return model

    # -- while loading -----------------------------------------------------------------------------------------------
    @property
    def supports_parallel_loading(self) -> bool:
        return False

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs: Any) -> bool:
        return True  # every tensor: dmq sets it as stored, diffusers would cast it to torch_dtype

    def check_quantized_param_shape(self, param_name: str, current: torch.Tensor, loaded: torch.Tensor) -> bool:
        if current.shape != loaded.shape:
            raise CheckpointMismatchError(f"{param_name}: the checkpoint holds shape {tuple(loaded.shape)}, the model "
                                          f"expects {tuple(current.shape)}")
        return True

    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device: torch.device | str, state_dict: dict[str, Any], *args: Any,
                               **kwargs: Any) -> None:
        stored = state_dict[param_name]  # param_value may have been cast to torch_dtype already
        module_name, _, leaf = param_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        value = torch.empty_like(stored, device=target_device)
        value.copy_(stored)
        old = module._parameters.get(leaf)
        if leaf in module._parameters and old is not None:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
        elif leaf in module._buffers:
            module._buffers[leaf] = value
        else:
            raise CheckpointMismatchError(f"{param_name}: the model has no such parameter or buffer")

    # -- after loading -----------------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from dmq.config import QuantConfig
        from dmq.pipelines.quantize import DMQ_CONFIG_ATTR, activate_runtime
        from dmq.serialization import base_fingerprint

        qc = self.quantization_config
        where = type(model).__name__
        empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _is_meta(t)]
        if empty:
            raise CheckpointMismatchError(f"{where}: the checkpoint does not hold {empty[:5]}")
        if base_fingerprint(model, set(qc.layers)) != qc.fingerprint:
            raise CheckpointMismatchError(f"{where}: the 16-bit weights in this checkpoint are not the ones it was "
                                          "quantized with (fingerprint differs: an edited or mixed checkpoint)")
        config = QuantConfig.from_dict(qc.config)
        setattr(model, DMQ_CONFIG_ATTR, config)
        # no pipeline here: the temporal cache (scheduler-bound) is left to dmq.enable_temporal_cache(pipe)
        activate_runtime(None, model, replace(config, temporal_cache=False))
        logger.info("dmq: loaded %d quantized layers into %s through diffusers", len(qc.layers), where)
        return model

    @property
    def is_serializable(self) -> bool:
        return False  # save with dmq.save_quantized, which writes the fingerprint and specs

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit()) if p[:1].isdigit() else ""
        parts.append(int(digits or 0))
    return tuple(parts)


def register() -> None:
    """Add dmq to diffusers' quantization backends (``quant_method "dmq"``). Idempotent. Raises DmqError for a
    diffusers older than :data:`MIN_DIFFUSERS_VERSION` or one whose backend registry is not where dmq expects it,
    and when another package already registered ``"dmq"``."""
    import diffusers

    found = getattr(diffusers, "__version__", "0")
    if _version_tuple(found) < _version_tuple(MIN_DIFFUSERS_VERSION):
        raise DmqError(f"dmq's diffusers backend needs diffusers >= {MIN_DIFFUSERS_VERSION}, found {found}; "
                       "upgrade diffusers, or load with dmq.load_quantized(path, pipe)")
    try:
        from diffusers.quantizers import auto
        registries = (auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING)
    except (ImportError, AttributeError) as exc:
        raise DmqError(f"diffusers {found} has no quantizer registry where dmq expects it ({exc}); load with "
                       "dmq.load_quantized(path, pipe)") from None
    for registry, ours in zip(registries, (DmqQuantizer, DmqConfig)):
        present = registry.get(QUANT_METHOD)
        if present is not None and (present.__module__, present.__qualname__) != (ours.__module__,
                                                                                    ours.__qualname__):
            raise DmqError(f"diffusers already has a {QUANT_METHOD!r} backend from {present.__module__}")
        registry[QUANT_METHOD] = ours
    logger.debug("dmq: registered the diffusers backend %r", QUANT_METHOD)

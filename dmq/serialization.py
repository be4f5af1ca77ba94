"""Saving and loading quantized pipelines: one directory per quantized component in diffusers' layout.

``out/dmq_index.json`` names the pipeline class, the quantized components and the report; ``out/<component>/``
holds ``config.json`` (the model's own config plus a ``quantization_config``: dmq version, QuantConfig, per-layer
specs and a fingerprint of the base weights) and ``diffusion_pytorch_model.safetensors`` (quantized codes and scales
and the kept 16-bit tensors). The write is atomic (temporary directory, then rename); nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dmq.config import QuantConfig
from dmq.errors import CheckpointMismatchError, ConfigError, DmqError
from dmq.methods.fuse import drop_originals, fused_layers, fused_until_error, replaced_names
from dmq.nn import LAYER_TYPES, QuantModule, outermost_quant_modules
from dmq.pipelines.quantize import DMQ_CONFIG_ATTR, activate_runtime, denoiser_name
from dmq.report import LayerEntry, QuantReport

__all__ = ["save_quantized", "load_quantized", "base_fingerprint", "quantized_components", "check_quant_config",
           "build_shells", "check_tensor_names", "check_tensors", "install_layers", "INDEX_FILE", "WEIGHTS_NAME", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

INDEX_FILE = "dmq_index.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FORMAT_VERSION = 1


def quantized_components(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's components that dmq quantized, by attribute name."""
    comps = getattr(pipe, "components", None) or {}
    return {name: m for name, m in comps.items() if isinstance(m, nn.Module) and hasattr(m, DMQ_CONFIG_ATTR)}




def _config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's own config as JSON-normal data (tuples become lists), private keys dropped."""
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "quantization_config"}
    return json.loads(json.dumps(cfg, default=str))


def _owned(key: str, layers: set[str] | dict) -> bool:
    """Whether a state-dict key belongs to one of the (quantized) modules named in ``layers``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))


def _kept_state(model: nn.Module, quantized: set[str] | dict) -> dict[str, torch.Tensor]:
    """The state-dict tensors that stay as they are: outside the quantized layers (``quantized``: module names) and
    outside the originals that fused projections replace (unused, dropped on commit: :mod:`dmq.methods.fuse`)."""
    gone = set(quantized) | replaced_names(model)
    return {k: t for k, t in model.state_dict().items() if not _owned(k, gone)}


def base_fingerprint(model: nn.Module, quantized: set[str]) -> str:
    """sha256 over the name, dtype, shape and bytes of every state-dict tensor that does not belong to a quantized
    layer (``quantized``: module names) nor to an original replaced by a fused projection: the weights that stay
    16-bit identify the base model, a fine-tune too."""
    h = hashlib.sha256()
    for key, t in sorted(_kept_state(model, quantized).items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_component(model: nn.Module, out: Path) -> None:
    from dmq import __version__

    layers = outermost_quant_modules(model)
    out.mkdir()
    # the fingerprint is taken over the kept tensors, which are identical before and after quantization
    qconfig = {
        "quant_method": "dmq",
        "dmq_version": __version__,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "config": getattr(model, DMQ_CONFIG_ATTR).to_dict(),
        "layers": {name: layer.layer_spec() for name, layer in layers.items()},
        "fingerprint": base_fingerprint(model, set(layers)),
    }
    config = {"_class_name": type(model).__name__, **_config_dict(model), "quantization_config": qconfig}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "quant_method": "dmq"})


def save_quantized(pipe: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save the quantized components of ``pipe`` under ``path`` (atomically) and return the path."""
    from dmq import __version__

    comps = quantized_components(pipe)
    if not comps:
        raise DmqError("this pipeline has no dmq-quantized component; call dmq.quantize_pipeline first")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, model in comps.items():
            _write_component(model, tmp / name)
        report = getattr(pipe, "dmq_report", None)
        index = {"format_version": FORMAT_VERSION, "dmq_version": __version__,
                 "pipeline_class": type(pipe).__name__, "components": sorted(comps),
                 "report": report.to_dict() if report is not None else None}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    logger.info("dmq: saved %s to %s", sorted(comps), path)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointMismatchError(f"{path} is missing: not a dmq checkpoint directory") from None


def _check_format(version: Any, where: str) -> None:
    if version != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{where}: dmq checkpoint format {version} is not supported (this dmq reads "
                                      f"format {FORMAT_VERSION})")


def check_quant_config(qc: Any, where: str) -> None:
    """CheckpointMismatchError unless ``qc`` (a component's saved ``quantization_config``) is dmq's, in a format
    this dmq reads."""
    if not isinstance(qc, dict) or qc.get("quant_method") != "dmq":
        raise CheckpointMismatchError(f"{where}: no dmq quantization_config (not a dmq-quantized model)")
    _check_format(qc.get("format_version"), where)


def build_shells(layers: dict[str, dict], where: str) -> dict[str, QuantModule]:
    """Empty quantized layers (meta buffers) for the saved layer specs ``{module name: spec}``."""
    shells = {}
    for lname, spec in layers.items():
        if spec.get("type") not in LAYER_TYPES:
            raise CheckpointMismatchError(f"{where}.{lname}: unknown layer type {spec.get('type')!r}")
        shells[lname] = LAYER_TYPES[spec["type"]].from_layer_spec(spec)
    return shells


def check_tensor_names(where: str, expected: set[str], found: set[str]) -> None:
    """CheckpointMismatchError unless a checkpoint's tensor names are exactly the ones the model expects."""
    if found != expected:
        missing, extra = sorted(expected - found)[:5], sorted(found - expected)[:5]
        raise CheckpointMismatchError(f"{where}: checkpoint tensors do not match the model (missing {missing}, "
                                      f"unexpected {extra})")


def check_tensors(where: str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """CheckpointMismatchError unless a checkpoint holds exactly the expected tensor names, each with the expected
    shape and dtype (checked before anything is installed, so that loading cannot fail halfway)."""
    check_tensor_names(where, set(expected), set(found))
    bad = [f"{k}: {tuple(found[k].shape)} {found[k].dtype}, expected {tuple(t.shape)} {t.dtype}"
           for k, t in sorted(expected.items()) if found[k].shape != t.shape or found[k].dtype != t.dtype]
    if bad:
        raise CheckpointMismatchError(f"{where}: checkpoint tensors have other shapes or dtypes than the model's "
                                      f"({'; '.join(bad[:3])})")


def install_layers(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put ``layers`` (by module name) into ``model`` in place of the modules of those names."""
    for lname, layer in layers.items():
        parent, _, child = lname.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def _prepare_component(model: nn.Module, name: str, cdir: Path, fusions: ExitStack
                       ) -> tuple[dict[str, QuantModule], dict, QuantConfig]:
    """Check that a saved component fits ``model`` and load its tensors. The model is not changed, except that it
    is fused first when the component was saved with ``fuse_projections`` (undone when ``fusions`` unwinds on an
    error; the replaced originals count as gone in every check)."""
    saved = _read_json(cdir / "config.json")
    qc = saved.get("quantization_config") or {}
    check_quant_config(qc, f"{name} ({cdir / 'config.json'})")
    if saved["_class_name"] != type(model).__name__:
        raise CheckpointMismatchError(f"{name}: checkpoint is for a {saved['_class_name']}, the pipeline has a "
                                      f"{type(model).__name__}")
    saved_cfg = {k: v for k, v in saved.items() if not k.startswith("_") and k != "quantization_config"}
    fresh_cfg = _config_dict(model)
    diff = sorted(k for k in set(saved_cfg) | set(fresh_cfg) if saved_cfg.get(k) != fresh_cfg.get(k))
    if diff:
        shown = ", ".join(f"{k}: saved {saved_cfg.get(k)!r} vs model {fresh_cfg.get(k)!r}" for k in diff[:5])
        raise CheckpointMismatchError(f"{name}: checkpoint was made for another {type(model).__name__} config "
                                      f"({shown})")
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ConfigError(f"{name} is already quantized; load into a fresh floating-point pipeline")
    config = QuantConfig.from_dict(qc["config"])
    fusions.enter_context(fused_until_error(model, config.fuse_projections))
    layers = qc["layers"]
    if base_fingerprint(model, set(layers)) != qc["fingerprint"]:
        raise CheckpointMismatchError(
            f"{name}: the pipeline's weights are not the ones this checkpoint was quantized from (fingerprint of the "
            "16-bit weights differs: another fine-tune, or another dtype?)")
    device = next(model.parameters()).device
    # materialised (not assigned from the file) so every tensor gets torch's own aligned allocation: CPU BLAS
    # kernels can pick another summation order for a misaligned mmap-ed tensor
    shells = {lname: shell.to_empty(device=device) for lname, shell in build_shells(layers, name).items()}
    state = load_file(str(cdir / WEIGHTS_NAME), device=str(device))
    expected = dict(_kept_state(model, layers))
    expected.update({f"{lname}.{k}": t for lname, shell in shells.items() for k, t in shell.state_dict().items()})
    check_tensors(name, expected, state)
    return shells, state, config


def load_quantized(path: str | os.PathLike, pipe: Any) -> Any:
    """Load a checkpoint written by :func:`save_quantized` into a fresh floating-point pipeline of the same model.

    Checks the pipeline class, each component's class and config, and the fingerprint of the base weights
    (CheckpointMismatchError otherwise); on any error the pipeline is unchanged. Returns ``pipe``.
    """
    path = Path(path)
    index = _read_json(path / INDEX_FILE)
    _check_format(index.get("format_version"), str(path))
    if index["pipeline_class"] != type(pipe).__name__:
        raise CheckpointMismatchError(f"{path} was saved from a {index['pipeline_class']}, not a "
                                      f"{type(pipe).__name__}")
    prepared = {}
    with ExitStack() as fusions:  # an error unfuses every component fused so far
        for name in index["components"]:
            model = getattr(pipe, name, None)
            if not isinstance(model, nn.Module):
                raise CheckpointMismatchError(f"the pipeline has no component {name!r} to load into")
            prepared[name] = (model, *_prepare_component(model, name, path / name, fusions))
    for name, (model, shells, state, config) in prepared.items():
        drop_originals(model, fused_layers(model))
        install_layers(model, shells)
        model.load_state_dict(state, strict=True)
        setattr(model, DMQ_CONFIG_ATTR, config)
        if name == denoiser_name(pipe):
            activate_runtime(pipe, model, config)
    rep = index.get("report")
    if rep is not None:
        pipe.dmq_report = QuantReport(rep["config"], [LayerEntry(**e) for e in rep["entries"]], rep["notes"])
    logger.info("dmq: loaded %s from %s", sorted(prepared), path)
    return pipe
